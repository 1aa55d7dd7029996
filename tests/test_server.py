"""`mlx-spec serve` through the official openai client: answers, statistics, cache reuse, load, faults, bad input."""

import contextlib
import json
import logging
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import openai
import pytest
from mlx_lm.sample_utils import make_logits_processors
from tiny_folders import write_tiny_pair

import mlx_spec
from mlx_spec import server as serving
from mlx_spec.cache import common_prefix_length
from mlx_spec.chat import conversation_tokens
from mlx_spec.generate import encode_prompt
from mlx_spec.options import NUM_PROMPT_CACHES, GenerationOptions
from mlx_spec.server import Reply, StopStrings, TokenLogprob, bind, create_app, is_loopback, uvicorn_server

END = 1  # the toy tokenizer's </s>
NO_END = {str(END): -100}  # logit_bias: a reply runs to max_tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    main_dir, draft_dir = write_tiny_pair(root)
    short_main, _ = write_tiny_pair(root / "short", max_position_embeddings=48)
    return dict(main=str(main_dir), draft=str(draft_dir), short=str(short_main))


@pytest.fixture(scope="module")
def models(folders):
    model, tokenizer = mlx_spec.load(folders["main"])
    draft, _ = mlx_spec.load(folders["draft"])
    return model, tokenizer, draft


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn on a free loopback port in a background thread; yields its base URL."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def client_for(base: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def app(models):
    model, tokenizer, draft = models
    return create_app(model, tokenizer, draft, GenerationOptions(max_tokens=64))


@pytest.fixture(scope="module")
def base(app):
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return client_for(base)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def ask_one_after_another(client: openai.OpenAI, asks: list[dict], leaver: int | None = None) -> list[str]:
    """Streamed chat clients `asks` at once, each starting once the one before has its first text; client `leaver`
    hangs up after 3 chunks of text. Each one's text."""
    started = [threading.Event() for _ in asks]
    answers = [None] * len(asks)

    def ask(i):
        if i > 0:
            started[i - 1].wait(60)
        stream = client.chat.completions.create(model="main", stream=True, **asks[i])
        text, num_chunks = "", 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                num_chunks += 1
                started[i].set()
                if i == leaver and num_chunks == 3:
                    stream.close()
                    break
        started[i].set()
        answers[i] = text

    with ThreadPoolExecutor(len(asks)) as pool:
        list(pool.map(ask, range(len(asks))))
    return answers


def fresh(models, tokens, max_tokens, logit_bias=None, **options):
    """The main model alone on fresh caches: (text, tokens, finish_reason), the answer the server must give."""
    model, tokenizer, _ = models
    processors = make_logits_processors(logit_bias={int(k): v for k, v in logit_bias.items()}) if logit_bias else None
    out = list(
        mlx_spec.stream_generate(
            model, tokenizer, tokens, max_tokens=max_tokens, logits_processors=processors, **options
        )
    )
    return "".join(r.text for r in out), [r.token for r in out], out[-1].finish_reason


def chat_reference(models, messages, max_tokens, **kwargs):
    return fresh(models, conversation_tokens(models[1], messages), max_tokens, **kwargs)


def logits_size(model) -> int:
    return model.args.vocab_size


def check_stats(stats: dict, drafted: bool = True):
    assert stats["total_draft_tokens_count"] == (
        stats["accepted_draft_tokens_count"]
        + stats["rejected_draft_tokens_count"]
        + stats["ignored_draft_tokens_count"]
    )
    assert min(stats[k] for k in stats if k.endswith("_count")) >= 0
    assert stats["rounds"] >= 1 and stats["tokens_per_round"] == pytest.approx(
        (stats["accepted_draft_tokens_count"] + stats["ignored_draft_tokens_count"] + stats["rounds"]) / stats["rounds"]
    )
    assert stats["tokens_per_second"] > 0 and stats["generation_time"] >= 0 and stats["time_to_first_token"] > 0
    assert stats["draft_model"] == ("draft" if drafted else None)
    assert 0 <= stats["lookup_accepted_tokens_count"] <= stats["lookup_draft_tokens_count"]
    if not drafted:  # only copies from the conversation (prompt lookup) were drafted
        assert stats["total_draft_tokens_count"] == stats["lookup_draft_tokens_count"]


def sse_lines(base: str, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


def wait_for(base: str, **status):
    """Poll /health until it reports `status` (e.g. generating=False)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = httpx.get(f"{base}/health").json()
        if all(health[k] == v for k, v in status.items()):
            return health
        time.sleep(0.02)
    pytest.fail(f"the server never reported {status}: {health}")


# --- stop strings and the reply (pure) ---------------------------------------------


def test_stop_strings_hold_back_what_may_start_one():
    stops = StopStrings(["END", "xyz"])
    assert stops.add("hello E") == ("hello ", False)  # "E" may begin END
    assert stops.add("N") == ("", False)
    assert stops.add("D!") == ("", True)  # cut before END; nothing of it was shown
    stops = StopStrings(["END"])
    assert stops.add("a EN") == ("a ", False)
    assert stops.add("TRY") == ("ENTRY", False)  # not a stop after all: released
    assert stops.add(" E") == (" ", False)
    assert stops.flush() == "E"


def test_stop_strings_cut_at_the_earliest_of_several():
    stops = StopStrings(["cd", "b"])
    assert stops.add("abcd") == ("a", True)
    stops = StopStrings(["bcd", "zz"])
    assert stops.add("ab") == ("a", False)
    assert stops.add("czz") == ("bc", True)  # "zz" ends the text before "bcd" could complete


def test_reply_releases_logprobs_with_their_text():
    def entry(token):
        return TokenLogprob(token, -1.0, [], 0)

    reply = Reply([" w3 w4"])
    assert reply.add("w1", entry("w1"))[:2] == ("w1", [entry("w1")])
    assert reply.add(" w3", entry("w3")) == ("", [], False)  # " w3" is held, and so is its token
    assert reply.add(" w4", entry("w4")) == ("", [], True)
    reply = Reply([" w3 w4"])
    reply.add("w1", entry("w1"))
    reply.add(" w3", entry("w3"))
    text, entries, stopped = reply.add(" w5", entry("w5"))
    assert text == " w3 w5" and [e.token for e in entries] == ["w3", "w5"] and not stopped
    assert [e.text_offset for e in entries] == [2, 5]
    assert reply.finish() == ("", [])


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.2", "example.com"]))


# --- answers -----------------------------------------------------------------------


def test_models_and_health(base, client):
    assert [m.id for m in client.models.list().data] == ["main"]
    health = httpx.get(f"{base}/health").json()
    assert health == {
        "status": "ok",
        "model": "main",
        "draft_model": "draft",
        "waiting": 0,
        "generating": False,
        "active": 0,
        "joining": 0,
        "max_batch": serving.engine.MAX_BATCH,
        "rounds": health["rounds"],
        "mean_batch_size": health["mean_batch_size"],
    }


def test_chat_is_the_main_models_answer_streamed_or_not(models, base, client):
    messages = user("w10 w20")
    tokens = conversation_tokens(models[1], messages)
    text, generated, _ = chat_reference(models, messages, 24, logit_bias=NO_END)

    answer = client.chat.completions.create(model="main", messages=messages, max_tokens=24, logit_bias=NO_END)
    assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(tokens) and answer.usage.completion_tokens == len(generated) == 24
    assert answer.usage.total_tokens == len(tokens) + 24
    assert answer.stats["stop_reason"] == "maxPredictedTokensReached"
    check_stats(answer.stats)

    chunks = list(
        client.chat.completions.create(
            model="main",
            messages=messages,
            max_tokens=24,
            logit_bias=NO_END,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    check_stats(chunks[-1].stats)

    # Without the draft model (the `draft` extension): the same answer, no draft statistics.
    alone = client.chat.completions.create(
        model="main", messages=messages, max_completion_tokens=24, logit_bias=NO_END, extra_body={"draft": False}
    )
    assert alone.choices[0].message.content == text
    check_stats(alone.stats, drafted=False)

    # The wire format: server-sent events ending with [DONE], usage and stats in the last chunk.
    body = dict(messages=messages, max_tokens=4, stream=True, num_draft_tokens=2)
    lines = sse_lines(base, "/v1/chat/completions", body)
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] is not None and "stats" in last
    assert last["stats"]["rounds"] <= 4 and last["stats"]["tokens_per_round"] <= 3.0  # at most 2 drafted + 1


def test_an_end_token_ends_the_answer(models, client):
    for i in range(50):  # a message whose answer ends with the end token
        messages = user(f"w{3 + i} w{50 + i}")
        text, generated, reason = chat_reference(models, messages, 40)
        if reason == "stop":
            break
    answer = client.chat.completions.create(model="main", messages=messages, max_tokens=40)
    assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == len(generated) and answer.stats["stop_reason"] == "eosFound"
    check_stats(answer.stats)


def test_completions_streamed_or_not_and_token_prompts(models, client):
    prompt = "w7 w8 w9"
    tokens = encode_prompt(models[1], prompt)
    text, generated, _ = fresh(models, tokens, 16, logit_bias=NO_END)
    answer = client.completions.create(model="main", prompt=prompt, max_tokens=16, logit_bias=NO_END)
    assert answer.object == "text_completion" and answer.choices[0].text == text
    assert answer.usage.prompt_tokens == len(tokens) and answer.usage.completion_tokens == 16
    check_stats(answer.stats)
    chunks = list(client.completions.create(model="main", prompt=tokens, max_tokens=16, logit_bias=NO_END, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length" and "stats" in chunks[-1].model_extra


def test_logprobs_are_the_main_models(models, client):
    model, tokenizer, _ = models
    messages = user("w30 w31 w32")
    tokens = conversation_tokens(tokenizer, messages)
    _, generated, _ = chat_reference(models, messages, 8, logit_bias=NO_END)
    logits = model(mx.array(tokens + generated)[None])[0] + mx.where(mx.arange(logits_size(model)) == END, -100, 0)
    expected = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[len(tokens) - 1 : -1]

    answer = client.chat.completions.create(
        model="main", messages=messages, max_tokens=8, logprobs=True, top_logprobs=3, logit_bias=NO_END
    )
    content = answer.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in generated]
    for i, (c, token) in enumerate(zip(content, generated)):
        assert c.logprob == pytest.approx(expected[i, token].item(), abs=1e-3)
        assert c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token  # greedy: the likeliest
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)

    completion = client.completions.create(
        model="main", prompt=tokens, max_tokens=8, logprobs=2, logit_bias=NO_END
    ).choices[0]
    assert completion.logprobs.tokens == [c.token for c in content]
    assert completion.logprobs.token_logprobs == pytest.approx([c.logprob for c in content], abs=1e-5)
    assert [len(t) for t in completion.logprobs.top_logprobs] == [2] * 8
    tokens = completion.logprobs.tokens
    assert " ".join(tokens) == completion.text  # the toy tokenizer's words, joined by spaces
    assert completion.logprobs.text_offset == [len(" ".join(tokens[:i])) for i in range(8)]
    assert client.chat.completions.create(model="main", messages=messages, max_tokens=2).choices[0].logprobs is None


def test_a_continued_conversation_prefills_only_its_new_tokens(models, client):
    _, tokenizer, _ = models
    first = user("w60 w61 w62")
    text, generated, _ = chat_reference(models, first, 12, logit_bias=NO_END)
    answer = client.chat.completions.create(model="main", messages=first, max_tokens=12, logit_bias=NO_END)
    assert answer.choices[0].message.content == text

    second = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "w63 w64"}]
    cached = conversation_tokens(tokenizer, first) + generated
    tokens = conversation_tokens(tokenizer, second)
    expected_text, _, _ = chat_reference(models, second, 12, logit_bias=NO_END)
    answer = client.chat.completions.create(model="main", messages=second, max_tokens=12, logit_bias=NO_END)
    assert answer.choices[0].message.content == expected_text  # token-exact with a fresh run
    # The cache kept the shared prefix; its last token goes in again to give the next logits.
    num_cached = common_prefix_length(cached, tokens) - 1
    assert num_cached > len(conversation_tokens(tokenizer, first))  # the first reply was reused too
    assert answer.usage.prompt_tokens_details.cached_tokens == num_cached


def test_stop_strings_end_the_text_before_them(models, client):
    messages = user("w40 w41")
    text, _, _ = chat_reference(models, messages, 30, logit_bias=NO_END)
    words = text.split()
    for stop in (words[8], [words[12], words[6]], f"{words[5]} {words[6]}"):
        first = min(text.index(s) for s in ([stop] if isinstance(stop, str) else stop))
        kwargs = dict(model="main", messages=messages, max_tokens=30, logit_bias=NO_END, stop=stop)
        answer = client.chat.completions.create(**kwargs)
        assert answer.choices[0].message.content == text[:first] and answer.choices[0].finish_reason == "stop"
        assert answer.stats["stop_reason"] == "stopStringFound"
        check_stats(answer.stats)
        # Streamed: no part of the stop string is ever sent, though it arrives a token at a time.
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[:first]
        assert chunks[-1].choices[0].finish_reason == "stop"
    # Draft tokens accepted beyond the stop string are computed but never used: LM Studio's "ignored". The
    # prompt's pass gives the first token; the round after it drafts 8.
    kwargs = dict(model="main", messages=messages, max_tokens=30, logit_bias=NO_END, stop=words[2])
    answer = client.chat.completions.create(**kwargs, extra_body={"num_draft_tokens": 8})
    stats, used = answer.stats, answer.usage.completion_tokens - 1
    assert stats["rounds"] == 2 and stats["accepted_draft_tokens_count"] == used > 0
    assert stats["ignored_draft_tokens_count"] == 8 - stats["rejected_draft_tokens_count"] - used
    assert stats["ignored_draft_tokens_count"] > 0
    # A stop string that begins but never completes holds text back, then lets it all out.
    kwargs = dict(model="main", messages=messages, max_tokens=30, logit_bias=NO_END, stop=f"{words[3]} w0")
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_seed_repeats_a_sampled_answer_with_or_without_the_draft(client):
    def sample(seed, draft, num_draft_tokens="auto"):
        answer = client.chat.completions.create(
            model="main",
            messages=user("w70 w71"),
            max_tokens=24,
            temperature=1.0,
            seed=seed,
            logit_bias=NO_END,
            extra_body={"draft": draft, "num_draft_tokens": num_draft_tokens},
        )
        return answer.choices[0].message.content

    first = sample(5, True)
    assert sample(5, True) == first == sample(5, False) == sample(5, True, 4)
    assert sample(6, True) != first


# --- load ----------------------------------------------------------------------------


def test_eight_concurrent_clients_get_the_sequential_answers(client):
    requests = [dict(messages=user(f"w{11 + i} w{22 + i}"), max_tokens=16 + i) for i in range(8)]
    sequential = [client.chat.completions.create(model="main", **r).choices[0].message.content for r in requests]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: client.chat.completions.create(model="main", **r), requests))
    assert [a.choices[0].message.content for a in answers] == sequential


def test_a_full_queue_answers_503_and_loses_nothing(models):
    model, tokenizer, draft = models
    app = create_app(model, tokenizer, draft, GenerationOptions(max_tokens=100_000), max_queue=1)
    app.state.server.engine.max_batch = 1  # one generates, one waits
    with running(app) as base:
        client = client_for(base)
        long = client.chat.completions.create(
            model="main", messages=user("w80"), logit_bias=NO_END, stream=True
        )  # runs until this client hangs up
        next(iter(long))
        wait_for(base, generating=True, waiting=0)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.chat.completions.create, model="main", messages=user("w81"), max_tokens=8)
            wait_for(base, waiting=1)
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(model="main", messages=user("w82"), max_tokens=8)
            assert refused.value.status_code == 503
            assert int(refused.value.response.headers["retry-after"]) >= 1
            assert refused.value.response.json()["error"]["code"] == "queue_full"
            long.close()  # the engine stops the long answer and takes the waiting request
            answer = waiting.result()
    expected, _, _ = chat_reference(models, user("w81"), 8)
    assert answer.choices[0].message.content == expected


def test_a_client_that_hangs_up_stops_its_generation(models, base, client, caplog):
    caplog.set_level(logging.INFO, logger="mlx_spec.server")
    messages = user("w90 w91")
    stream = client.chat.completions.create(
        model="main", messages=messages, max_tokens=100_000, logit_bias=NO_END, stream=True
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()
    wait_for(base, generating=False)
    stopped = [r.getMessage() for r in caplog.records if "the client left" in r.getMessage()]
    assert len(stopped) == 1, "the generation did not stop"
    assert int(re.search(r"after (\d+) tokens", stopped[-1]).group(1)) < 100_000

    # A client that gives up waiting for a whole (not streamed) answer stops it too.
    body = dict(messages=messages, max_tokens=100_000, logit_bias=NO_END)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    wait_for(base, generating=False)
    assert len([r for r in caplog.records if "the client left" in r.getMessage()]) == 2

    # The caches of the stopped answer are reused, and the next answer is exact.
    expected, _, _ = chat_reference(models, messages, 20)
    answer = client.chat.completions.create(model="main", messages=messages, max_tokens=20)
    assert answer.choices[0].message.content == expected
    # All but the prompt's last two tokens: its last goes in again to give the next logits, and the cache
    # never holds its own last token.
    assert answer.usage.prompt_tokens_details.cached_tokens == answer.usage.prompt_tokens - 2


def rss_mb() -> float:
    """This process's resident memory now (Linux), or its peak where /proc is missing (macOS: bytes)."""
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def test_a_soak_of_short_requests_keeps_memory_bounded(app, client):
    rng = random.Random(0)

    def one(i):
        words = " ".join(f"w{rng.randrange(3, 97)}" for _ in range(rng.randrange(1, 6)))
        start = time.perf_counter()
        if i % 3:
            answer = client.chat.completions.create(model="main", messages=user(words), max_tokens=2 + i % 3)
            finished = answer.choices[0].finish_reason in ("stop", "length")
        else:
            chunks = list(client.completions.create(model="main", prompt=words, max_tokens=4, stream=True))
            finished = chunks[-1].choices[0].finish_reason in ("stop", "length")
        return finished, time.perf_counter() - start

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(40)))  # warm-up
        before = rss_mb()
        results = list(pool.map(one, range(300)))
    growth = rss_mb() - before
    latencies = sorted(seconds for _, seconds in results)
    print(
        f"soak: {len(results)} requests from 4 clients, {sum(ok for ok, _ in results)} answered, "
        f"p50 {1000 * latencies[len(latencies) // 2]:.0f} ms, p95 {1000 * latencies[int(0.95 * len(latencies))]:.0f} ms, "
        f"RSS {growth:+.1f} MB"
    )
    assert all(ok for ok, _ in results)
    assert growth < 100
    assert len(app.state.server.engine.caches.entries) <= NUM_PROMPT_CACHES


# --- faults and bad input ------------------------------------------------------------


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    body = e.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return e.value.status_code, body["error"]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(extra_body={"top_k": -2}), "top_k"),
        (dict(extra_body={"min_p": 1.5}), "min_p"),
        (dict(extra_body={"num_draft_tokens": 99}), "num_draft_tokens"),
        (dict(extra_body={"num_draft_tokens": "many"}), "num_draft_tokens"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_completion_tokens=-5), "max_completion_tokens"),
        (dict(n=2), "n"),
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(stop=["w5", ""]), "stop"),
        (dict(logit_bias={"100000": 1}), "logit_bias"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(temperature="hot"), "temperature"),
        (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (
            dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content[0]",
        ),
        (dict(messages=[]), "messages"),
    ],
)
def test_a_bad_value_is_a_400_naming_the_field(client, kwargs, param):
    kwargs = {"model": "main", "messages": user("w5"), **kwargs}
    status, error = error_of(lambda: client.chat.completions.create(**kwargs))
    assert (status, error["param"], error["type"]) == (400, param, "invalid_request_error")
    assert param.split("[")[0] in error["message"]


def test_bad_requests_of_every_other_kind(base, client):
    status, error = error_of(lambda: client.chat.completions.create(model="gpt-4o", messages=user("w5")))
    assert (status, error["param"], error["code"]) == (404, "model", "model_not_found") and "gpt-4o" in error["message"]
    status, error = error_of(lambda: client.completions.create(model="main", prompt=[5, 100_000]))
    assert (status, error["param"]) == (400, "prompt")
    status, error = error_of(lambda: client.completions.create(model="main", prompt=["w5", "w6"]))
    assert (status, error["param"]) == (400, "prompt")

    for body, message in (
        (b'{"messages": [', "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "must be a JSON object"),
        (b'{"model": "main"}', "messages: Field required"),
    ):
        response = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and message in response.json()["error"]["message"]
    response = httpx.get(f"{base}/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    response = httpx.get(f"{base}/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_limits_and_the_api_key(models, folders):
    model, tokenizer = mlx_spec.load(folders["short"])  # a context of 48 tokens
    app = create_app(model, tokenizer, None, GenerationOptions(max_tokens=1000), api_key="sesame", max_body=4096)
    with running(app) as base:
        client = client_for(base, api_key="sesame")
        status, error = error_of(lambda: client_for(base, api_key="guess").models.list())
        assert (status, error["type"], error["code"]) == (401, "authentication_error", "invalid_api_key")
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "w5"}).status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200  # for probes: no key
        assert [m.id for m in client.models.list().data] == ["main"]

        # The prompt must fit the context; max_tokens is cut to what is left of it.
        status, error = error_of(lambda: client.completions.create(model="main", prompt=[5] * 48))
        assert (status, error["param"], error["code"]) == (400, "prompt", "context_length_exceeded")
        answer = client.completions.create(model="main", prompt=[5] * 40, logit_bias=NO_END)
        assert answer.usage.completion_tokens == 8 and answer.choices[0].finish_reason == "length"

        # 413 by Content-Length, and for a body streamed in chunks without one.
        status, error = error_of(lambda: client.completions.create(model="main", prompt="w5 " * 2000))
        assert status == 413 and "4096 bytes" in error["message"]
        chunked = httpx.post(f"{base}/v1/completions", content=(b" " * 1024 for _ in range(8)))
        assert chunked.status_code == 413 and "4096 bytes" in chunked.json()["error"]["message"]


def test_an_internal_failure_is_a_500_in_one_line(client, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr("mlx_spec.server.engine.begin_call", broken)  # where the engine thread calls it
    status, error = error_of(lambda: client.chat.completions.create(model="main", messages=user("w5")))
    assert (status, error["type"]) == (500, "server_error")
    assert error["message"] == "internal error: RuntimeError: the device fell over"
    with pytest.raises(openai.APIError, match="the device fell over"):
        list(client.chat.completions.create(model="main", messages=user("w5"), stream=True))
    assert "Traceback" in caplog.text and "the device fell over" in caplog.text  # logged for the operator

    monkeypatch.setattr(serving.Server, "chat_tokens", lambda self, *args: 1 / 0)  # a failure in a handler
    status, error = error_of(lambda: client.chat.completions.create(model="main", messages=user("w5")))
    assert status == 500 and "\n" not in error["message"] and "ZeroDivisionError" in error["message"]
    monkeypatch.undo()
    assert client.chat.completions.create(model="main", messages=user("w5"), max_tokens=3).usage.completion_tokens


# --- the command line ------------------------------------------------------------------


def start_cli(*flags):
    """`mlx-spec serve` in a subprocess; returns it and its base URL once it says it is ready."""
    child = subprocess.Popen(
        [sys.executable, "-m", "mlx_spec.cli", "serve", "--port", "0", *flags],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in child.stderr:
        lines.append(line)
        if match := re.search(r"at (http://\S+)/v1 \(Ctrl-C stops\)", line):
            return child, match.group(1), lines
    child.wait()
    pytest.fail("".join(lines))


def stop_cli(child, sig, lines):
    """Send `sig` (None: none) and wait; the exit must be clean."""
    if sig is not None:
        child.send_signal(sig)
    _, rest = child.communicate(timeout=60)
    output = "".join(lines) + rest
    assert child.returncode == 0, output
    assert "Traceback" not in output
    return output


def test_serve_on_the_command_line(folders):
    child, base, lines = start_cli("--model", folders["main"], "--draft-model", folders["draft"], "--max-tokens", "5")
    try:
        assert "serving main, draft draft at http://127.0.0.1:" in lines[-1]
        client = client_for(base)
        answer = client.chat.completions.create(model="main", messages=user("w5 w6"))
        assert answer.usage.completion_tokens <= 5 and answer.stats["draft_model"] == "draft"
        # SIGTERM while an answer streams: the answer ends with an error event, the server exits cleanly.
        stream = client.chat.completions.create(
            model="main", messages=user("w5"), max_tokens=100_000, logit_bias=NO_END, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        child.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="the server is stopping"):
            list(chunks)
        output = stop_cli(child, None, lines)
    finally:
        if child.poll() is None:
            child.kill()
    assert re.search(r"POST /v1/chat/completions 200 [\d.]+s: \d+ prompt tokens \(0 cached\), \d+ tokens", output)
    assert "generation stopped after" in output and output.rstrip().endswith("mlx-spec: stopped")


def test_a_busy_port_is_one_line(folders, capsys):
    from mlx_spec.cli import main

    with bind("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", folders["main"], "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mlx-spec: error: cannot listen on 127.0.0.1:{port}: ") and err.count("\n") == 1


@pytest.mark.slow
def test_the_default_pair_through_mlx_spec_serve():
    child, base, lines = start_cli("--max-tokens", "32")
    try:
        client = client_for(base)
        messages = user("Write a quicksort algorithm in Python. Write code only.")
        answer = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages)
        assert "def quicksort" in answer.choices[0].message.content
        stats = answer.stats
        assert stats["draft_model"] and 0 < stats["accepted_draft_tokens_count"] <= stats["total_draft_tokens_count"]
        chunks = list(client.chat.completions.create(model=answer.model, messages=messages, stream=True, max_tokens=32))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
        print(stats)
        stop_cli(child, signal.SIGINT, lines)
    finally:
        if child.poll() is None:
            child.kill()
