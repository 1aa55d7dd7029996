"""Two local ranks (ring backend): the main model sharded, the same rounds on every rank, the tokens of one process."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import mlx.core as mx
import openai
import pytest
from ranks import ROOT, free_ports, run_ranks, start_ranks
from tiny import make_model, perturbed, toy_tokenizer
from tiny_folders import save_model_folder, write_tiny_pair

import mlx_spec
from mlx_spec.chat import conversation_tokens
from mlx_spec.distributed import HUNG_EXIT

PROMPT = [3, 4, 5, 6, 7, 8, 9, 10, 3, 4, 5]
RUNS = [  # name, draft model or not, keyword arguments
    ("draft", True, {"max_tokens": 24}),
    ("draft_fixed_k", True, {"max_tokens": 16, "num_draft_tokens": 3, "prompt_lookup": False}),
    ("lookup", False, {"max_tokens": 24}),
    ("plain", False, {"max_tokens": 24, "prompt_lookup": False}),
    ("seeded", True, {"max_tokens": 24, "temp": 1.0, "seed": 5}),
    ("sampled", True, {"max_tokens": 16, "temp": 1.0}),
]


def pair_folders(root, arch):
    if arch == "llama":
        return write_tiny_pair(root)
    main = make_model(arch, layers=2)
    return (
        save_model_folder(main, toy_tokenizer(), root / "main"),
        save_model_folder(perturbed(main, 0.01), toy_tokenizer(), root / "draft"),
    )


def launch(tmp_path, main, draft, runs=RUNS, timeout=150, grace=None, env=None, **spec):
    spec_file = tmp_path / "spec.json"
    runs = [{"name": n, "prompt": PROMPT, "draft": d, "kwargs": k} for n, d, k in runs]
    spec_file.write_text(json.dumps({"main": str(main), "draft": str(draft), "runs": runs, **spec}))
    return run_ranks(["tests/sharded_rank.py", str(spec_file)], tmp_path, timeout=timeout, grace=grace, env=env)


def one_process(main, draft) -> dict:
    model, _ = mlx_spec.load(str(main))
    draft_model, _ = mlx_spec.load(str(draft))
    out = {}
    for name, with_draft, kwargs in RUNS:
        steps = mlx_spec.speculative_generate_step(
            mx.array(PROMPT), model, draft_model if with_draft else None, **kwargs
        )
        out[name] = [t for t, _, _ in steps]
    return out


@pytest.mark.parametrize("arch, split", [("llama", "tensor"), ("qwen2", "pipeline")])
def test_sharded_ranks_give_one_process_tokens(tmp_path, arch, split):
    """Greedy with a draft, a fixed k, lookup alone and plain, and seeded sampling: every rank gives the tokens of
    one process; unseeded sampling: the same text on both ranks. Rank 1's clock runs oddly (a different time
    every round): it still makes rank 0's choices, round by round."""
    main, draft = pair_folders(tmp_path / arch, arch)
    ranks = launch(tmp_path, main, draft, pipeline=split == "pipeline", skew=1)
    for r in ranks:
        assert r.returncode == 0, f"rank {r.rank}: {r.stderr[-2000:]}"
    results = [{x["name"]: x for x in r.lines("RESULT ")} for r in ranks]
    expected = one_process(main, draft)
    for name, _, _ in RUNS:
        assert results[0][name]["tokens"] == results[1][name]["tokens"], name
        assert results[0][name]["rounds"] == results[1][name]["rounds"], name
        if name != "sampled":  # unseeded: rank 0's generator, not this process's
            assert results[0][name]["tokens"] == expected[name], name
    sources = {tuple(r[0] for r in results[0][name]["rounds"]) for name in ("draft", "lookup")}
    assert any("draft" in s or "lookup" in s for s in sources)  # the controller did speculate


def test_a_lost_or_hung_rank_stops_rank_0_with_a_clear_error(tmp_path):
    """Rank 1 exits mid-generation: rank 0 raises DistributedError naming it. Rank 1 hangs (SIGSTOP): rank 0's
    watchdog stops it after MLX_SPEC_TIMEOUT seconds with one line."""
    main, draft = write_tiny_pair(tmp_path / "llama")
    runs = [("draft", True, {"max_tokens": 64})]
    ranks = launch(tmp_path, main, draft, runs, stop={"rank": 1, "after": 5, "how": "exit"}, timeout=60)
    assert ranks[1].returncode == 9
    assert ranks[0].returncode not in (0, None)
    assert "DistributedError: rank 0 of 2: generating: another rank stopped answering" in ranks[0].stderr

    start = time.monotonic()
    ranks = launch(
        tmp_path,
        main,
        draft,
        runs,
        stop={"rank": 1, "after": 5, "how": "hang"},
        timeout=40,
        grace=2,
        env={"MLX_SPEC_TIMEOUT": "3"},
    )
    assert ranks[0].returncode == HUNG_EXIT, ranks[0].stderr[-2000:]
    assert "rank 0 of 2: generating: no answer from the other ranks within 3 s" in ranks[0].stderr
    assert ranks[1].returncode is None  # still stopped: killed at the timeout
    assert time.monotonic() - start < 40


def test_cli_generate_runs_sharded_and_only_rank_0_prints(tmp_path, capsys):
    """`mlx-spec generate` on two ranks: rank 0 prints the JSON of one process (same tokens), rank 1 nothing."""
    from mlx_spec.cli import main

    main_folder, draft_folder = write_tiny_pair(tmp_path / "llama")
    args = ["--model", str(main_folder), "--draft-model", str(draft_folder), "--max-tokens", "20", "--json"]
    args += ["--prompt", "w5 w6 w7 w8 w5 w6 w7", "--ignore-chat-template", "--timeout", "60"]
    ranks = run_ranks(["-m", "mlx_spec.cli", "generate", *args], tmp_path, timeout=120)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    assert ranks[1].stdout == "" and ranks[1].stderr == ""
    assert main(["generate", *args]) == 0
    alone = json.loads(capsys.readouterr().out)
    sharded = json.loads(ranks[0].stdout)
    assert sharded["tokens"] == alone["tokens"] and sharded["text"] == alone["text"]


def replies(chat_output: str) -> list[str]:
    """The replies in a chat's output (--no-color): the text after each prompt, but the commands' answers."""
    return [line[4:] for line in chat_output.splitlines() if line.startswith(">>> w")]


def test_cli_chat_runs_sharded_rank_0_reads_every_rank_runs(tmp_path):
    """`mlx-spec chat` on two ranks: rank 0 reads the lines and prints; turns and commands (/draft, /system,
    /reset) run on both ranks; the replies are one process's."""
    main_folder, draft_folder = write_tiny_pair(tmp_path / "llama")
    args = ["-m", "mlx_spec.cli", "chat", "--model", str(main_folder), "--draft-model", str(draft_folder)]
    args += ["--max-tokens", "12", "--no-color"]
    lines = "w5 w6 w7 w5 w6\n/draft 2\nw8 w9 w8 w9\n/system w3\nw10\n/reset\nw11 w12\n"
    ranks = run_ranks([*args, "--timeout", "60"], tmp_path, stdin=lines, timeout=120)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    assert ranks[1].stdout == "" and ranks[1].stderr == ""
    alone = subprocess.run([sys.executable, *args], input=lines, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert alone.returncode == 0, alone.stderr
    assert len(replies(alone.stdout)) == 4
    assert replies(ranks[0].stdout) == replies(alone.stdout)
    assert "drafting 2 tokens per round" in ranks[0].stdout and "system prompt set" in ranks[0].stdout


class Serving:
    """`mlx-spec serve` on two local ranks, its output gathered as it comes."""

    def __init__(self, tmp_path, *args):
        self.port = free_ports(1)[0]
        command = ["-m", "mlx_spec.cli", "serve", *args, "--port", str(self.port), "--timeout", "30"]
        self.procs = start_ranks(command, tmp_path)
        self.out = [[], []]
        for rank, proc in enumerate(self.procs):
            for stream in (proc.stdout, proc.stderr):
                threading.Thread(target=lambda s=stream, r=rank: self.out[r].extend(s), daemon=True).start()
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and all(p.poll() is None for p in self.procs):
            try:
                if httpx.get(f"{self.base}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server did not start: {self.text(0)} {self.text(1)}")

    def text(self, rank: int) -> str:
        return "".join(self.out[rank])

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()


def test_cli_serve_runs_sharded_clients_get_one_process_answers(tmp_path):
    """`mlx-spec serve` on two ranks: rank 0 serves HTTP, both run the rounds. Clients at once (greedy with the
    draft, seeded sampling, a logit bias and a presence penalty, one hanging up mid-reply), then one more: each
    answer equals one process's; Ctrl-C on rank 0 stops both ranks cleanly."""
    from mlx_lm.sample_utils import make_logits_processors
    from test_server import NO_END, ask_one_after_another, user

    main_folder, draft_folder = write_tiny_pair(tmp_path / "llama")
    serving = Serving(tmp_path, "--model", str(main_folder), "--draft-model", str(draft_folder))
    asks = [
        dict(messages=user("w10 w20 w30"), max_tokens=40, logit_bias=NO_END),
        dict(messages=user("w5 w6 w7 w5 w6 w7 w5"), max_tokens=25, logit_bias={**NO_END, "7": 5}),
        dict(messages=user("w40 w41"), max_tokens=30, temperature=0.9, seed=5, logit_bias=NO_END),
        dict(messages=user("w60 w61 w62 w63"), max_tokens=60, logit_bias=NO_END),  # hangs up after 3 chunks
        dict(messages=user("w70"), max_tokens=20, presence_penalty=1.5, logit_bias=NO_END),
    ]
    leaver = 3
    client = openai.OpenAI(base_url=f"{serving.base}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        answers = ask_one_after_another(client, asks, leaver)
        last = dict(messages=user("w9 w8 w7"), max_tokens=16, logit_bias=NO_END)
        asks.append(last)
        answers.append(client.chat.completions.create(model="main", **last).choices[0].message.content)
        health = httpx.get(f"{serving.base}/health").json()
        serving.procs[0].send_signal(signal.SIGINT)
        codes = [p.wait(60) for p in serving.procs]
    finally:
        serving.stop()
    assert codes == [0, 0], serving.text(0)[-3000:] + serving.text(1)[-3000:]
    assert serving.text(1) == ""  # only rank 0 prints
    assert "mlx-spec: stopped" in serving.text(0)
    assert health["active"] == 0 and health["rounds"] > 0

    model, tokenizer = mlx_spec.load(str(main_folder))
    for i, ask_ in enumerate(asks):
        if i == leaver:
            continue
        bias = {int(k): v for k, v in ask_["logit_bias"].items()}
        processors = make_logits_processors(logit_bias=bias, presence_penalty=ask_.get("presence_penalty"))
        options = {"temp": ask_["temperature"], "seed": ask_["seed"]} if "seed" in ask_ else {}
        prompt = conversation_tokens(tokenizer, ask_["messages"])
        steps = mlx_spec.stream_generate(
            model, tokenizer, prompt, max_tokens=ask_["max_tokens"], logits_processors=processors, **options
        )
        assert answers[i] == "".join(r.text for r in steps), f"client {i}"


def test_a_lost_rank_stops_the_sharded_server_with_a_clear_error(tmp_path):
    """Rank 1 killed while the server waits for requests: rank 0 tells why and exits 1 within seconds."""
    main_folder, _ = write_tiny_pair(tmp_path / "llama")
    serving = Serving(tmp_path, "--model", str(main_folder))
    try:
        serving.procs[1].kill()
        start = time.monotonic()
        code = serving.procs[0].wait(60)
    finally:
        serving.stop()
    assert code == 1 and time.monotonic() - start < 30
    assert "mlx-spec: error: rank 0 of 2: serving: another rank stopped answering" in serving.text(0)


def memory_available() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


@pytest.mark.slow
def test_real_pair_over_two_ranks_gives_one_process_tokens(tmp_path):
    """The default pair, the main model tensor parallel over two local ranks: greedy (draft and lookup, auto) and
    seeded sampling give the tokens of one process."""
    from mlx_lm.utils import load_tokenizer

    from mlx_spec.bench import PROMPTS
    from mlx_spec.fetch import fetch_default_pair

    main, draft = fetch_default_pair(progress=lambda *_: None)
    weights = sum(f.stat().st_size for folder in (main, draft) for f in folder.glob("*.safetensors"))
    if memory_available() < 1.8 * weights:  # two ranks: half the main model each, the draft whole on both
        pytest.skip(f"two ranks of the default pair need about {1.8 * weights / 1e9:.0f} GB of free memory")
    tokenizer = load_tokenizer(main)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS["quicksort"]}], add_generation_prompt=True
    )
    runs = [("greedy", True, {"max_tokens": 32}), ("seeded", True, {"max_tokens": 12, "temp": 0.7, "seed": 3})]
    spec_file = tmp_path / "spec.json"
    spec = {
        "main": str(main),
        "draft": str(draft),
        "runs": [{"name": n, "prompt": prompt, "draft": d, "kwargs": k} for n, d, k in runs],
        "openblas": True,
    }
    spec_file.write_text(json.dumps(spec))
    ranks = run_ranks(["tests/sharded_rank.py", str(spec_file)], tmp_path, timeout=900)
    for r in ranks:
        assert r.returncode == 0, f"rank {r.rank}: {r.stderr[-2000:]}"
    results = [{x["name"]: x for x in r.lines("RESULT ")} for r in ranks]
    one = subprocess.run(
        [sys.executable, "tests/sharded_rank.py", str(spec_file)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert one.returncode == 0, one.stderr[-2000:]
    alone = {
        x["name"]: x for x in (json.loads(line[7:]) for line in one.stdout.splitlines() if line.startswith("RESULT "))
    }
    for name, _, _ in runs:
        assert results[0][name]["tokens"] == results[1][name]["tokens"] == alone[name]["tokens"], name
        assert results[0][name]["rounds"] == results[1][name]["rounds"], name
