"""Batched rounds (batch.py): each request's tokens equal its solo output, whoever else is in the batch."""

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import pytest
from tiny import make_model, perturbed, repetitive, spec

from mlx_spec.adaptive import DRAFT, LOOKUP
from mlx_spec.batch import PRIOR_ROW_SHARE, Batch, GatheredCache, Request, RowCost, batched_logits, plan_rows
from mlx_spec.cache import make_prompt_cache
from mlx_spec.generate import begin_call
from mlx_spec.options import GenerationOptions
from mlx_spec.stats import GenerationStats

PROMPTS = [
    [5, 9, 14, 5, 9, 14, 22, 5, 9],
    list(range(3, 40)),
    [7, 8],
    [11, 12, 13, 14, 11, 12, 13, 14, 11, 12, 13, 50, 60, 11, 12],
]


@pytest.fixture(scope="module")
def model():
    return repetitive(make_model("qwen2", layers=2, seed=3))


def start(model, prompt, draft=None, **options):
    """A Request for `prompt` on fresh caches, as the server's engine starts one."""
    opts = GenerationOptions(**options)
    caches = make_prompt_cache(model, draft, opts.max_kv_size)
    call = begin_call(list(prompt), model, draft, opts, caches, GenerationStats())
    return Request(call.decoding, opts.token_limit, call.plain_first), call


def run_batched(model, jobs, draft=None, leave=None):
    """Run `jobs` = [(prompt, join_round, options)] through one Batch; requests join at their round, leave when
    done (or at `leave` = {index: round}); returns each one's tokens, and the batch with `sources`: the sources
    of the drafts of rounds run with others."""
    batch, active, out, round_no = Batch(model), {}, {i: [] for i in range(len(jobs))}, 0
    batch.sources = Counter()
    while round_no == 0 or active or any(j[1] >= round_no for j in jobs):
        for i, (prompt, join, options) in enumerate(jobs):
            if join == round_no:
                active[i] = start(model, prompt, draft, **options)
        if leave:
            for i, at in leave.items():
                if at == round_no and i in active:
                    request, call = active.pop(i)
                    request.leave_alone()
                    call.end(len(out[i]))
        if active:
            order = list(active)
            rounds = batch.step([active[i][0] for i in order])
            if len(order) > 1:
                batch.sources.update(r.source for r in rounds)
            for i, round_ in zip(order, rounds):
                out[i].extend(round_.tokens)
                request, call = active[i]
                if request.left <= 0:
                    del out[i][call.opts.token_limit :]
                    request.leave_alone()
                    call.end(len(out[i]))
                    del active[i]
        round_no += 1
    return [out[i] for i in range(len(jobs))], batch


def test_gathered_forward_equals_solo_forwards(model):
    """One forward over ragged sequences gives each one's logits as its own forward does (float32)."""
    caches = [make_prompt_cache(model).main for _ in PROMPTS]
    for layers, prompt in zip(caches, PROMPTS):
        model(mx.array(prompt)[None], cache=layers)
    solo_caches = [make_prompt_cache(model).main for _ in PROMPTS]
    for layers, prompt in zip(solo_caches, PROMPTS):
        model(mx.array(prompt)[None], cache=layers)
    rows = [[3, 4, 5], [6], [7, 8], [9, 10, 11]]
    length = max(len(r) for r in rows)
    tokens = mx.array([r + [0] * (length - len(r)) for r in rows])
    gathered = [GatheredCache([c[i] for c in caches]) for i in range(len(model.layers))]
    out = model(tokens, cache=gathered)
    for b, (r, layers) in enumerate(zip(rows, solo_caches)):
        alone = model(mx.array(r)[None], cache=layers)[0]
        assert mx.allclose(out[b, : len(r)], alone, atol=1e-4).item()
        assert caches[b][0].offset == len(PROMPTS[b]) + length
        for c in layers:
            c.trim(len(r))
    # the same through batched_logits, the output layer over the scored rows only
    for layers in caches:
        for c in layers:
            c.trim(length)
    scored = [1, 1, 2, 2]
    out = batched_logits(model, [mx.array(r) for r in rows], caches, scored)
    for b, (r, layers, n) in enumerate(zip(rows, solo_caches, scored)):
        alone = model(mx.array(r)[None], cache=layers)[0, len(r) - n :]
        assert out[b].shape == alone.shape and mx.allclose(out[b], alone, atol=1e-4).item()


def test_greedy_joining_at_different_times_equals_solo(model):
    jobs = [(p, join, dict(max_tokens=n)) for p, join, n in zip(PROMPTS, [0, 0, 3, 7], [40, 25, 30, 12])]
    batched, batch = run_batched(model, jobs)
    for (prompt, _, options), tokens in zip(jobs, batched):
        assert tokens == spec(prompt, model, None, **options)
    assert batch.stats.mean_batch_size > 1.5 and batch.sources[LOOKUP] > 0


def test_sampled_with_seed_equals_solo(model):
    jobs = [
        (PROMPTS[0], 0, dict(max_tokens=30, temp=0.8, seed=7)),
        (PROMPTS[1], 1, dict(max_tokens=30)),
        (PROMPTS[3], 2, dict(max_tokens=20, temp=1.0, top_p=0.9, seed=11)),
    ]
    batched, _ = run_batched(model, jobs)
    for (prompt, _, options), tokens in zip(jobs, batched):
        assert tokens == spec(prompt, model, None, **options)


@pytest.mark.parametrize("acceptance", [0.5, 0.95])
def test_with_a_draft_model_and_lookup_equals_solo(model, acceptance, monkeypatch):
    """The draft model drafts for several requests at once (one draft forward per step, sequences of different
    lengths at the first), greedy and seeded; a fixed length's prior acceptance sets how long (0.95: 3)."""
    monkeypatch.setattr("mlx_spec.batch.PRIOR_ACCEPTANCE", acceptance)
    draft = perturbed(model, 0.05)
    options = [dict(num_draft_tokens=3), dict(num_draft_tokens=2, temp=0.8, seed=3), dict(), dict(num_draft_tokens=3)]
    jobs = [(p, join, dict(max_tokens=24, **o)) for p, join, o in zip(PROMPTS, [0, 1, 1, 4], options)]
    batched, batch = run_batched(model, jobs, draft)
    for (prompt, _, options), tokens in zip(jobs, batched):
        assert tokens == spec(prompt, model, draft, **options)
    assert batch.sources[DRAFT] > 0


def test_drafting_together_proposes_what_each_drafts_alone(model):
    """Batched draft steps over sequences that start behind by different amounts propose each one's solo drafts."""
    from mlx_spec.adaptive import Choice
    from mlx_spec.batch import propose_together
    from mlx_spec.decode import situation

    draft = perturbed(model, 0.05)
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[3]]

    def started():
        return [start(model, p, draft, max_tokens=8, num_draft_tokens=4)[0] for p in prompts]

    together, alone = started(), started()
    plans = [(situation(r.d, r.left), Choice(DRAFT, 4)) for r in together]
    proposed = propose_together(together, plans, mx.zeros((0,), mx.int32))
    for request, (draft_tokens, *_) in zip(alone, proposed):
        solo, _ = request.d.sources[DRAFT].propose(4, None, None)
        assert draft_tokens.tolist() == solo.tolist()
    for a, b in zip(together, alone):
        assert a.d.caches.draft_offset == b.d.caches.draft_offset


def test_a_request_leaving_leaves_the_others_exact(model):
    jobs = [(p, 0, dict(max_tokens=30)) for p in PROMPTS]
    batched, _ = run_batched(model, jobs, leave={1: 3})
    for i, ((prompt, _, options), tokens) in enumerate(zip(jobs, batched)):
        if i != 1:
            assert tokens == spec(prompt, model, None, **options)


def test_caches_that_cannot_be_gathered_forward_alone_in_the_round():
    """Rotating (max_kv_size) and quantized (kv_bits) caches, and a model with sliding-window layers, are not
    gathered: those requests forward alone within the batch's rounds, still exact."""
    jobs = [
        (PROMPTS[1], 0, dict(max_tokens=30, max_kv_size=12)),
        (PROMPTS[0], 0, dict(max_tokens=30, kv_bits=8, kv_group_size=32, quantized_kv_start=12)),
        (PROMPTS[3], 1, dict(max_tokens=30)),
        (PROMPTS[2], 2, dict(max_tokens=20)),
    ]
    wide = make_model("qwen2", layers=2, seed=5, hidden=128)  # heads of 32: a quantization group
    batched, _ = run_batched(wide, jobs)
    for (prompt, _, options), tokens in zip(jobs, batched):
        assert tokens == spec(prompt, wide, None, **options)
    windowed = make_model("gemma3_text", layers=2, seed=4)
    jobs = [(p, join, dict(max_tokens=20)) for p, join in zip(PROMPTS, [0, 0, 2, 3])]
    batched, _ = run_batched(windowed, jobs)
    for (prompt, _, options), tokens in zip(jobs, batched):
        assert tokens == spec(prompt, windowed, None, **options)


def test_draft_length_shrinks_as_rows_cost():
    expected = [1.0, 1.8, 2.4, 2.8, 3.0]  # tokens a round emits with k = 0..4 drafts

    def rows(*args):
        return plan_rows(*args)[0]

    assert rows([expected], [None], 0.0) == 5  # rows free: the longest draft
    assert rows([expected] * 4, [None] * 4, 0.1) == 3
    assert rows([expected] * 4, [None] * 4, 0.5) == 2
    assert rows([expected] * 4, [None] * 4, 2.0) == 1  # compute-bound: plain batched steps
    assert rows([[1.0]] * 3 + [expected], [None] * 4, 0.1) == 1  # one match does not pad the whole batch
    # the draft model: taken where it expects more than a copy, its steps paid for
    assert plan_rows([[1.0]] * 4, [expected] * 4, 0.0, 0.3) == (3, [True] * 4)
    assert plan_rows([expected, [1.0]], [[1.0, 1.2], [1.0, 1.2]], 0.0, 0.3) == (5, [False, False])
    assert rows([[1.0]] * 4, [expected] * 4, 0.0, 5.0) == 1  # a draft dearer than what it saves
    cost = RowCost()
    for n in [4, 8, 12, 16] * 5:
        cost.record(n, 1.0 + 0.25 * n)  # t1 / t0 = 0.25
    assert cost.row_share() == pytest.approx(0.25, rel=0.05)
    assert RowCost().row_share() == PRIOR_ROW_SHARE


# --- the server: several clients at once ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tiny_folders import write_tiny_pair

    import mlx_spec

    main_dir, draft_dir = write_tiny_pair(tmp_path_factory.mktemp("models"))
    model, tokenizer = mlx_spec.load(str(main_dir))
    draft, _ = mlx_spec.load(str(draft_dir))
    return model, tokenizer, draft


@pytest.mark.parametrize("join_chunk", [512, 3])
def test_clients_at_once_each_get_their_solo_answer(served, join_chunk, monkeypatch):
    """Streamed clients joining one after another (each once the one before has its first text), one sampled with
    a seed, one hanging up mid-batch, prompts read whole or in chunks of 3 tokens between rounds: every answer
    that completes equals its solo answer."""
    from test_server import NO_END, ask_one_after_another, chat_reference, client_for, running, user

    from mlx_spec.server import create_app

    monkeypatch.setattr("mlx_spec.server.engine.JOIN_CHUNK", join_chunk)
    models = served
    app = create_app(*models, GenerationOptions(max_tokens=64))
    asks = [
        dict(messages=user("w10 w20 w30"), max_tokens=40),
        dict(messages=user("w5 w6 w7 w5 w6 w7 w5"), max_tokens=25),
        dict(messages=user("w40 w41"), max_tokens=30, temperature=0.9, seed=5),
        dict(messages=user("w60 w61 w62 w63 w64 w65 w66 w67 w68"), max_tokens=60),  # hangs up after 3 chunks
        dict(messages=user("w70"), max_tokens=12),
    ]
    leaver = 3
    with running(app) as base:
        answers = ask_one_after_another(client_for(base), [dict(a, logit_bias=NO_END) for a in asks], leaver)
        health = httpx.get(f"{base}/health").json()
    assert health["mean_batch_size"] > 1.0 and health["active"] == 0  # some rounds ran batched (how many: timing)
    for i, ask_ in enumerate(asks):
        if i == leaver:
            continue
        options = {"temp": ask_["temperature"], "seed": ask_["seed"]} if "seed" in ask_ else {}
        expected, _, _ = chat_reference(models, ask_["messages"], ask_["max_tokens"], logit_bias=NO_END, **options)
        assert answers[i] == expected, f"client {i}"


@pytest.mark.slow
def test_real_pair_four_clients_at_once_equal_their_solo_answers():
    """`mlx-spec serve` on the default pair: 4 different prompts at once, each answer its solo answer."""
    import re
    import signal
    import subprocess
    import sys

    import openai

    prompts = [
        "Write a quicksort algorithm in Python. Write code only.",
        "Explain what a hash table is in two sentences.",
        "Write a Python function that reverses a linked list.",
        "List three uses of binary search.",
    ]
    child = subprocess.Popen(
        [sys.executable, "-m", "mlx_spec.cli", "serve", "--port", "0", "--max-tokens", "24"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in child.stderr:
            if match := re.search(r"at (http://\S+/v1) \(Ctrl-C stops\)", line):
                break
        else:
            pytest.fail(f"the server exited with {child.wait()}")
        threading.Thread(target=child.stderr.read, daemon=True).start()
        client = openai.OpenAI(base_url=match.group(1), api_key="unused", max_retries=0, timeout=1800)
        model = client.models.list().data[0].id

        def ask(prompt):
            messages = [{"role": "user", "content": prompt}]
            return client.chat.completions.create(model=model, messages=messages).choices[0].message.content

        alone = [ask(p) for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(ask, prompts))
        health = httpx.get(match.group(1).removesuffix("/v1") + "/health").json()
    finally:
        child.send_signal(signal.SIGINT)
        child.wait(timeout=120)
    assert together == alone
    assert health["mean_batch_size"] > 1
