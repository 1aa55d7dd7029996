"""The command line as people use it: chat in a pseudo-terminal, generate (--json), convert, every bad input."""

import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys

import mlx.core as mx
import pexpect
import pytest
from tiny import make_model, toy_tokenizer
from tiny_folders import save_model_folder, write_tiny_pair

import mlx_spec
from mlx_spec.chat import (
    CYAN,
    GREEN,
    LEAVE_HINT,
    ChatSession,
    conversation_tokens,
    interact,
    paint,
    typeahead_kept,
    use_color,
)
from mlx_spec.cli import main
from mlx_spec.load import model_name
from mlx_spec.options import GenerationOptions

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TURN_LINE = re.compile(
    r"\[(\d+) tokens, [\d.]+ tokens/s, accepted (\d+)/(\d+) draft tokens \([\d.]+%\), "
    r"(?:\d+ copied from the conversation, )?([\d.]+) tokens per round, (?:draft length [\d.]+ on average, )?(\d+) prompt tokens processed\]"
)
SHORT = 60  # a reply that ends within this many tokens
LONG = 1000  # a reply still running after this many tokens: Ctrl-C lands in its middle, however fast the models


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    main_dir, draft_dir = write_tiny_pair(root)
    short_main, short_draft = write_tiny_pair(root / "short", max_position_embeddings=48)
    other = save_model_folder(make_model("llama", layers=2, seed=5), toy_tokenizer(prefix="v"), root / "other")
    return dict(
        main=str(main_dir),
        draft=str(draft_dir),
        short_main=str(short_main),
        short_draft=str(short_draft),
        other=str(other),
    )


@pytest.fixture(scope="module")
def models(folders):
    model, tokenizer = mlx_spec.load(folders["main"])
    draft, _ = mlx_spec.load(folders["draft"])
    return model, tokenizer, draft


def fresh_reply(models, messages, max_tokens, **kwargs):
    """A fresh, non-interactive greedy run over the conversation: (text, whether it ended with the end token)."""
    model, tokenizer, _ = models
    text, last = "", None
    for last in mlx_spec.stream_generate(
        model, tokenizer, conversation_tokens(tokenizer, messages), max_tokens=max_tokens, **kwargs
    ):
        text += last.text
    return text, last.finish_reason == "stop"


def find_message(models, history, short: bool, start: int):
    """A user message whose fresh reply ends within SHORT tokens (short) or runs past LONG tokens."""
    for i in range(start, start + 500):
        message = f"w{3 + i % 94} w{3 + (7 * i) % 94}"
        messages = history + [{"role": "user", "content": message}]
        text, stopped = fresh_reply(models, messages, SHORT if short else LONG)
        if stopped == short:
            return message, text
    pytest.fail("no user message gives the reply length this test needs")


def words(text: str) -> str:
    return " ".join(ANSI.sub("", text).replace("^C", " ").split())


def echoed(message: str) -> str:
    """The line editor's echo of `message` and Enter, as a pattern."""
    return re.escape(message) + r"\r+\n"


def send_turn(child, message):
    """Type `message`, wait for the reply's statistics line; return what was shown and the line's numbers."""
    child.sendline(message)
    child.expect(echoed(message))
    child.expect(TURN_LINE)
    names = ("tokens", "accepted", "drafted", "per_round", "processed")
    return child.before, dict(zip(names, map(float, child.match.groups())))


@pytest.fixture(scope="module")
def long_message(models):
    """A first message whose reply runs past LONG tokens."""
    return find_message(models, [], short=False, start=200)[0]


def spawn_chat(folders, max_tokens: int):
    """`mlx-spec chat` on the tiny pair in a pseudo-terminal, at its first prompt."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["TERM"] = "dumb"  # the line editor without escape sequences
    args = ["-m", "mlx_spec.cli", "chat", "--model", folders["main"], "--draft-model", folders["draft"]]
    child = pexpect.spawn(
        sys.executable,
        args + ["--max-tokens", str(max_tokens)],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 500),
        # Ctrl-C interrupts, even where pytest was started in the background (`cmd &` ignores SIGINT, and a
        # Python started so installs no KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    child.expect_exact(">>> ")
    return child


def test_chat_in_a_terminal(folders, models, long_message):
    _, tokenizer, draft = models
    first, first_reply = find_message(models, [], short=True, start=0)
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": first_reply}]
    second, second_reply = find_message(models, history, short=True, start=100)

    child = spawn_chat(folders, max_tokens=100000)
    assert GREEN in child.before and "draft tokens the main model accepted" in child.before  # the legend

    # Two turns; the second prefills only its new tokens and still answers as a fresh run would.
    shown, line = send_turn(child, first)
    assert GREEN in shown and words(shown) == words(first_reply)
    assert line["processed"] == len(conversation_tokens(tokenizer, history[:1]))
    assert 0 < line["accepted"] <= line["drafted"]
    cached = line["processed"] + line["tokens"]  # the first reply ended with </s>
    shown, line = send_turn(child, second)
    assert words(shown) == words(second_reply)
    conversation = conversation_tokens(tokenizer, history + [{"role": "user", "content": second}])
    assert line["processed"] == len(conversation) - cached + 1  # + the last token, never in a cache yet

    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense: /help lists the commands")
    child.sendline("/draft 2")
    child.expect_exact("drafting 2 tokens per round")
    child.sendline("/stats")
    child.expect_exact("2 turns")
    child.sendline("/reset")
    child.expect_exact("new conversation")

    # Ctrl-C in the middle of a long reply keeps what was shown and returns to the prompt.
    child.sendline(long_message)
    child.expect(echoed(long_message))
    child.expect(r"w\d+|<s>|<unk>")  # the reply's first word
    shown = child.after
    child.sendcontrol("s")  # the terminal holds the reply back (XOFF): it cannot end before Ctrl-C lands
    child.sendintr()
    child.sendcontrol("q")
    child.expect_exact("[stopped]")
    shown = words(shown + child.before)
    child.expect(TURN_LINE)
    history = [{"role": "user", "content": long_message}, {"role": "assistant", "content": shown}]
    assert float(child.match.group(5)) == len(conversation_tokens(tokenizer, history[:1]))  # after /reset: all

    # The next turn answers exactly as a fresh run over the same conversation.
    last, _ = find_message(models, history, short=True, start=300)
    messages = history + [{"role": "user", "content": last}]
    expected, _ = fresh_reply(models, messages, SHORT, draft_model=draft, num_draft_tokens=2)
    shown, line = send_turn(child, last)
    assert words(shown) == words(expected)
    assert line["drafted"] > 0 and line["per_round"] <= 3.0  # at most 2 drafted + 1
    cached = len(conversation_tokens(tokenizer, history[:1])) + len(history[1]["content"].split())
    assert line["processed"] == len(conversation_tokens(tokenizer, messages)) - cached + 1

    # Ctrl-C at the prompt drops a half-typed line and says how to leave; the conversation goes on.
    child.expect_exact(">>> ")
    child.send("w40 w4")
    child.expect_exact("w40 w4")
    child.sendintr()
    child.expect_exact(LEAVE_HINT)
    cached = len(conversation_tokens(tokenizer, messages)) + line["tokens"]  # the last reply ended with </s>
    history = messages + [{"role": "assistant", "content": words(shown)}]
    after, expected = find_message(models, history, short=True, start=400)
    shown, line = send_turn(child, after)
    assert words(shown) == words(expected)
    conversation = conversation_tokens(tokenizer, history + [{"role": "user", "content": after}])
    assert line["processed"] == len(conversation) - cached + 1  # the caches kept the whole conversation

    # Ctrl-D leaves.
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_during_a_reply_discards_neither_the_words_on_their_way_nor_what_was_typed():
    """A terminal flushes its queues on Ctrl-C: words the chat wrote that the screen had not shown yet would
    be lost from view, though kept in the conversation, and so would a line typed ahead (seen with a slow reader)."""

    def pending(fd):
        data = b""
        while select.select([fd], [], [], 0.2)[0]:
            data += os.read(fd, 4096)
        return data

    screen, terminal = os.openpty()
    with open(terminal, closefd=False) as stdin, typeahead_kept(stdin):
        os.write(screen, b"w7 w8")  # typed while the reply streams
        os.write(terminal, b" w40 w41")  # the reply's words, not yet read by the screen
        os.write(screen, b"\x03")  # Ctrl-C
        assert pending(screen) == b" w40 w41"
        assert pending(terminal) == b"w7 w8"
    os.close(screen)
    os.close(terminal)


def test_chat_keeps_what_is_typed_while_a_reply_streams(folders, models, long_message):
    cap = 600  # tokens per reply: the long message's reply streams for a while, then ends by itself
    expected_long, _ = fresh_reply(models, [{"role": "user", "content": long_message}], cap)
    history = [{"role": "user", "content": long_message}, {"role": "assistant", "content": expected_long}]
    typed, typed_reply = find_message(models, history, short=True, start=500)
    history += [{"role": "user", "content": typed}, {"role": "assistant", "content": typed_reply}]
    started, started_reply = find_message(models, history, short=True, start=600)  # begun during the reply
    begun, rest = started.split(" ", 1)

    child = spawn_chat(folders, max_tokens=cap)
    child.sendline(long_message)
    child.expect(echoed(long_message))
    child.expect(r"w\d+|<s>|<unk>")  # the reply has begun
    shown = child.after
    os.kill(child.pid, signal.SIGSTOP)  # held in the middle of its reply while the user types
    try:
        assert child.expect([TURN_LINE, pexpect.TIMEOUT], timeout=1) == 1, "the reply ended before the typing"
        child.send(f"{typed}\r{begun}")
    finally:
        os.kill(child.pid, signal.SIGCONT)
    child.expect(TURN_LINE)
    assert words(shown + child.before) == words(expected_long)  # nothing typed shows inside the reply

    child.expect(">>> " + echoed(typed))  # the next prompt reads the typed line: it is the next message
    child.expect(TURN_LINE)
    assert words(child.before) == words(typed_reply)
    child.expect_exact(">>> " + begun)  # the line begun during the reply waits at the prompt, to be finished
    shown, _ = send_turn(child, " " + rest)
    assert words(shown) == words(started_reply)
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_context_full_and_end_of_input(folders):
    model, tokenizer = mlx_spec.load(folders["short_main"])
    draft, _ = mlx_spec.load(folders["short_draft"])
    out = io.StringIO()
    session = ChatSession(model, tokenizer, draft, GenerationOptions(max_tokens=1000), out=out)
    assert session.context_limit == 48
    for line in ["w10 w11", "w12 w13", "w14 w15", "w16", "w17", "w18", "w19"]:
        session.handle(line)
        assert len(session.cache.tokens) <= 48
    assert "context full" in out.getvalue()
    session.handle("/reset")
    session.handle("w20 w21")
    assert session.cache.tokens[:5] == conversation_tokens(tokenizer, [{"role": "user", "content": "w20 w21"}])

    lines = iter(["/temp 0.5", "/temp -1", "/draft 0", "/system w3"])

    def read(_prompt):
        line = next(lines, None)
        if line is None:
            raise EOFError  # Ctrl-D at the prompt
        return line

    assert interact(session, read=read) == 0
    text = out.getvalue()
    assert (
        "temperature 0.5" in text
        and "/temp takes a number >= 0" in text
        and "/draft takes 'auto' or a whole number" in text
    )
    assert session.settings.temp == 0.5 and session.system_prompt == "w3"


def test_the_banner_names_each_model_and_where_it_came_from(folders, models, tmp_path):
    model, tokenizer, draft = models
    out = io.StringIO()
    ChatSession(model, tokenizer, draft, GenerationOptions(num_draft_tokens=3), out=out).intro()
    assert out.getvalue().splitlines()[:3] == [
        "mlx-spec chat",
        f"main  {folders['main']} (float32)",
        f"draft {folders['draft']} (float32); 3 draft tokens per round",
    ]
    # A folder converted from the hub keeps the hub id in its config.
    shutil.copytree(folders["main"], tmp_path / "copy")
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    (tmp_path / "copy" / "config.json").write_text(json.dumps(dict(config, _name_or_path="org/Tiny-Main")))
    copy, _ = mlx_spec.load(str(tmp_path / "copy"))
    assert model_name(copy) == f"org/Tiny-Main (float32, {tmp_path / 'copy'})"


def test_color_switches(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(Terminal()) and not use_color(Terminal(), no_color=True) and not use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(Terminal())


def test_generate_json(folders, models):
    _, tokenizer, _ = models
    messages = [{"role": "user", "content": "w10 w11"}]
    expected, _ = fresh_reply(models, messages, 20)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_spec.cli",
            "generate",
            "--model",
            folders["main"],
            "--draft-model",
            folders["draft"],
            "--prompt",
            "w10 w11",
            "--max-tokens",
            "20",
            "--num-draft-tokens",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert stats["text"] == expected
    assert stats["prompt_tokens"] == len(conversation_tokens(tokenizer, messages))
    assert 0 < stats["generation_tokens"] <= 20
    assert stats["accepted_draft_tokens"] + stats["rejected_draft_tokens"] == stats["total_draft_tokens"] > 0
    assert stats["num_draft_tokens"] == 3 and max(map(int, stats["draft_lengths"])) <= 3
    assert stats["generation_tokens"] == stats["accepted_draft_tokens"] + stats["num_rounds"]


def test_generate_text_then_statistics(folders, models, capsys):
    expected, _ = fresh_reply(models, [{"role": "user", "content": "w10 w11"}], 20)
    argv = ["generate", "--model", folders["main"], "--no-draft", "--no-prompt-lookup", "-p", "w10 w11", "-m", "20"]
    assert main(argv + ["--verbose"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "Generation:" in err and "Time to first token" in err and "Accepted" not in err


def test_convert(tmp_path, capsys):
    from test_gguf import write_model

    write_model(tmp_path / "m.gguf")
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    model, _ = mlx_spec.load(str(tmp_path / "out"))
    assert model.model.embed_tokens.weight.dtype == mx.float16


BAD = {
    "missing model path": ["generate", "--model", "/no/such/model", "-p", "hi"],
    "incompatible draft": ["generate", "--model", "{main}", "--draft-model", "{other}", "-p", "w10"],
    "negative temperature": ["generate", "--model", "{main}", "-p", "w10", "--temp", "-1"],
    "zero draft tokens": ["chat", "--model", "{main}", "--num-draft-tokens", "0"],
    "top-p above 1": ["chat", "--model", "{main}", "--top-p", "2"],
    "kv bits": ["generate", "--model", "{main}", "-p", "w10", "--kv-bits", "7"],
    "not a number": ["generate", "--model", "{main}", "-p", "w10", "--max-tokens", "many"],
    "kv bits with a window": ["generate", "--model", "{main}", "-p", "w10", "--kv-bits", "4", "--max-kv-size", "64"],
    "no prompt": ["generate", "--model", "{main}"],
    "unknown flag": ["chat", "--model", "{main}", "--colour"],
    "no command": [],
    "convert a missing file": ["convert", "/no/such.gguf", "{tmp}/out"],
    "convert a non-GGUF file": ["convert", "{main}/config.json", "{tmp}/out"],
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_line(name, folders, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, **folders) for a in BAD[name]]
    assert main(argv) != 0
    out, err = capsys.readouterr()
    assert err.startswith("mlx-spec: error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_debug_shows_the_traceback(capsys):
    assert main(["generate", "--model", "/no/such/model", "-p", "hi", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_unreachable_hub_id_in_a_real_process():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "mlx_spec.cli", "generate", "--model", "nobody-xyz/no-such-model", "-p", "hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if not line.startswith("mlx-spec: warning:")]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("mlx-spec: error: "), result.stderr
    assert "could not fetch nobody-xyz/no-such-model from the Hugging Face hub" in lines[0]


def test_copied_tokens_have_their_own_colour():
    assert paint("x", True, True, "lookup") == f"{CYAN}x\x1b[0m"
    assert paint("x", True, True, "draft") == f"{GREEN}x\x1b[0m"
    assert paint("x", False, True, None) == "x" and paint("x", True, False, "lookup") == "x"


def test_generate_without_prompt_lookup_or_draft_decodes_plainly(folders, capsys):
    code = main(
        ["generate", "--model", folders["main"], "--no-prompt-lookup", "-p", "w5 w6 w5 w6", "-m", "12", "--json"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_draft_tokens"] == 0 and out["num_rounds"] == 12 and out["rounds_by_source"] == {"plain": 12}
    code = main(["generate", "--model", folders["main"], "-p", "w5 w6 w5 w6 w5 w6 w5 w6", "-m", "24", "--json"])
    out_lookup = json.loads(capsys.readouterr().out)
    assert code == 0 and out_lookup["lookup_draft_tokens"] == out_lookup["total_draft_tokens"]
