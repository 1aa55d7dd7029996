"""Rollback of every cache kind in both models, early stop, and reuse across calls."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_make_prompt_cache
from tiny import make_model, perturbed, reference, spec

from mlx_spec import GenerationStats, make_prompt_cache, speculative_generate_step, verify
from mlx_spec.cache import SLACK, SlackRotatingCache, reuse_prefix
from mlx_spec.generate import MAX_FOLDED


@pytest.fixture(scope="module")
def pair():
    # qwen2: mlx-lm honours max_kv_size for it (llama's own make_cache ignores it, in mlx-lm and here)
    main = make_model("qwen2", layers=4)
    return main, perturbed(main, 0.005)


@pytest.mark.parametrize("prompt_len", [3, 12, 40])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_rotating_cache_matches_mlx_lm_long_after_the_wrap(pair, prompt_len, k):
    main, draft = pair
    window = 16
    prompt = [(7 * i + 3) % 90 + 3 for i in range(prompt_len)]
    expected = reference(main, prompt, 10 * window, max_kv_size=window)
    assert expected != reference(main, prompt, 10 * window)  # the window really changes the output
    stats = GenerationStats()
    got = spec(prompt, main, draft, num_draft_tokens=k, max_tokens=10 * window, max_kv_size=window, stats=stats)
    assert got == expected
    assert 0 < stats.accepted_draft_tokens < stats.total_draft_tokens


def test_all_accepted_with_a_rotating_cache(pair):
    main, _ = pair
    prompt = [5, 6, 7]
    stats = GenerationStats()
    got = spec(prompt, main, main, num_draft_tokens=6, max_tokens=120, max_kv_size=12, stats=stats)
    assert got == reference(main, prompt, 120, max_kv_size=12)
    assert stats.acceptance_rate == 1.0


def windowed_argmax_mismatches(model, tokens, num_prompt):
    """Positions where a full forward over the whole text (window mask) disagrees with the text."""
    logits = model(mx.array(tokens)[None])[0].astype(mx.float32)
    bad = []
    for t in range(num_prompt - 1, len(tokens) - 1):
        row = np.array(logits[t])
        top2 = np.sort(row)[-2:]
        if int(row.argmax()) != tokens[t + 1] and top2[1] - top2[0] > 1e-4:
            bad.append(t)
    return bad


@pytest.mark.parametrize("k", [1, 3, 8])
def test_sliding_window_model(k):
    main = make_model("gemma3_text", layers=4, window=8)
    draft = perturbed(main, 0.005)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]  # longer than the window
    expected = reference(main, prompt, 100)
    got = spec(prompt, main, draft, num_draft_tokens=k, max_tokens=100)
    assert got == expected
    assert windowed_argmax_mismatches(main, prompt + got, len(prompt)) == []


def test_quantized_kv_cache_matches_mlx_lm():
    main = make_model("qwen2", layers=4, hidden=128)  # head dim 32: one quantization group
    draft = perturbed(main, 0.005)
    prompt = [1, 5, 9, 22, 3]
    kw = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=20)
    expected = reference(main, prompt, 80, **kw)
    assert expected != reference(main, prompt, 80)
    cache = make_prompt_cache(main, draft)
    got = spec(prompt, main, draft, num_draft_tokens=5, max_tokens=80, prompt_cache=cache, **kw)
    assert got == expected
    assert all(isinstance(c, QuantizedKVCache) for c in cache.main + cache.draft)


@pytest.mark.parametrize("start", [0, 1, 3, 30], ids=["at 0", "at 1", "at k", "mid-generation"])
@pytest.mark.parametrize("k", [3, "auto"])
def test_quantization_from_any_start_matches_mlx_lm(start, k):
    """An empty cache (the draft's, a 1-token prompt's) is quantized once it has entries, as in mlx-lm."""
    main = make_model("qwen2", layers=4, hidden=128)  # head dim 32: one quantization group
    draft = perturbed(main, 0.005)
    kw = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=start)
    for prompt in ([1, 5, 9, 22, 3], [7]):
        theirs = mlx_lm_make_prompt_cache(main)
        expected = reference(main, prompt, 60, prompt_cache=theirs, **kw)
        cache = make_prompt_cache(main, draft)
        stats = GenerationStats()
        got = spec(prompt, main, draft, num_draft_tokens=k, max_tokens=60, prompt_cache=cache, stats=stats, **kw)
        assert got == expected
        assert stats.accepted_draft_tokens > 0
        assert all(isinstance(c, QuantizedKVCache) for c in cache.main)
        next_turn = spec([40, 41], main, draft, num_draft_tokens=k, max_tokens=10, prompt_cache=cache, **kw)
        assert next_turn == reference(main, [40, 41], 10, prompt_cache=theirs, **kw)


def check_consistent(cache):
    """Both caches hold a prefix of the conversation, ending before its last token."""
    assert cache.main_offset == len(cache.tokens) - 1
    assert cache.draft_offset <= len(cache.tokens) - 1


@pytest.mark.parametrize("max_kv_size", [None, 16])
def test_early_stop_then_continue_equals_a_fresh_run(pair, max_kv_size):
    main, draft = pair
    prompt = [1, 5, 9, 22, 3]
    cache = make_prompt_cache(main, draft, max_kv_size=max_kv_size)
    steps = speculative_generate_step(prompt, main, draft, num_draft_tokens=5, max_tokens=100, prompt_cache=cache)
    first = [next(steps)[0] for _ in range(23)]  # stop in the middle of a round
    steps.close()
    assert cache.tokens == prompt + first
    check_consistent(cache)

    turn = [30, 31, 32]
    stats = GenerationStats()
    cont = spec(turn, main, draft, num_draft_tokens=5, max_tokens=30, prompt_cache=cache, stats=stats, max_kv_size=None)
    assert stats.prompt_tokens == len(turn) + 1  # only the new tokens (and the last one generated)
    fresh = make_prompt_cache(main, draft, max_kv_size=max_kv_size)
    prefix = spec(prompt, main, draft, num_draft_tokens=5, max_tokens=23, prompt_cache=fresh)
    assert prefix == first
    assert cont == spec(turn, main, draft, num_draft_tokens=5, max_tokens=30, prompt_cache=fresh)


def test_exception_in_the_consumer_leaves_caches_consistent(pair):
    main, draft = pair
    cache = make_prompt_cache(main, draft)
    seen = []
    with pytest.raises(RuntimeError):
        for token, _, _ in speculative_generate_step([4, 8], main, draft, num_draft_tokens=4, prompt_cache=cache):
            seen.append(token)
            if len(seen) == 9:
                raise RuntimeError("consumer failed")
    assert cache.tokens == [4, 8] + seen
    check_consistent(cache)
    more = spec([9], main, draft, num_draft_tokens=4, max_tokens=20, prompt_cache=cache)
    assert more == reference(main, [4, 8] + seen + [9], 20)


def test_cache_reuse_across_turns_equals_one_long_prompt(pair):
    main, draft = pair
    cache = make_prompt_cache(main, draft)
    turn1 = spec([2, 3, 4], main, draft, max_tokens=15, prompt_cache=cache)
    turn2 = spec([50, 51], main, draft, max_tokens=15, prompt_cache=cache)
    assert turn2 == reference(main, [2, 3, 4] + turn1 + [50, 51], 15)
    check_consistent(cache)


def test_the_next_call_reads_the_last_token_before_with_its_prompt(pair, monkeypatch):
    """The reply's last token, not yet in the caches, goes in with the next call's prompt: one main pass
    reads both and gives the next call's first token (mlx-lm feeds that token in a pass of its own)."""
    main, draft = pair
    cache = make_prompt_cache(main, draft)
    turn1 = spec([2, 3, 4], main, draft, num_draft_tokens=2, max_tokens=15, prompt_cache=cache)
    passes = []
    body = type(main.model).__call__

    def counted(self, inputs, *args, **kwargs):
        if self is main.model:
            passes.append(inputs.shape[1])
        return body(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(main.model), "__call__", counted)
    steps = speculative_generate_step([50, 51], main, draft, num_draft_tokens=2, max_tokens=15, prompt_cache=cache)
    first = next(steps)[0]
    assert passes == [3]
    assert [first] + [t for t, _, _ in steps] == reference(main, [2, 3, 4] + turn1 + [50, 51], 15)
    check_consistent(cache)


def test_cache_kinds_after_a_rotating_run(pair):
    main, draft = pair
    cache = make_prompt_cache(main, draft, max_kv_size=16)
    spec([1, 2, 3], main, draft, max_tokens=50, prompt_cache=cache)
    assert all(isinstance(c, SlackRotatingCache) for c in cache.main + cache.draft)
    assert all(c.keys.shape[2] == 16 + SLACK for c in cache.main)  # bounded memory


def test_slack_cache_refuses_rollback_beyond_its_slack():
    cache = SlackRotatingCache(max_size=8, keep=4)
    kv = mx.zeros((1, 1, 1, 4))
    for _ in range(100):
        cache.update_and_fetch(kv, kv)
    assert cache.can_trim_to(100 - SLACK)
    assert not cache.can_trim_to(100 - SLACK - 1)
    with pytest.raises(AssertionError):
        cache.trim(SLACK + 1)


def test_plain_kv_cache_stays_plain_without_kv_bits(pair):
    main, draft = pair
    cache = make_prompt_cache(main, draft)
    spec([1, 2], main, draft, max_tokens=10, prompt_cache=cache)
    assert all(type(c) is KVCache for c in cache.main + cache.draft)


def test_adaptive_plain_streaks_with_a_rotating_cache(pair):
    """Plain rounds leave the draft behind; each probe feeds it the missed tokens within the slack."""
    main, _ = pair
    stranger = make_model("qwen2", layers=2, seed=9)
    stats = GenerationStats()
    got = spec([1, 2, 3], main, stranger, max_tokens=160, max_kv_size=16, stats=stats)
    assert got == reference(main, [1, 2, 3], 160, max_kv_size=16)
    assert stats.draft_lengths[0] > 0 and stats.draft_lengths[1] > 0  # plain streaks and probes


NO_DRAFT_OPTIONS = [
    dict(max_kv_size=16),
    dict(kv_bits=4, kv_group_size=32, quantized_kv_start=20),
    dict(logits_processors="repetition"),
]


@pytest.mark.parametrize("options", NO_DRAFT_OPTIONS, ids=["rotating", "quantized", "processors"])
def test_no_draft_is_mlx_lm_plain_decoding_with_every_cache_kind(options):
    """Without a draft each step is scheduled before the previous token is read: same tokens, same caches."""
    from mlx_lm.sample_utils import make_logits_processors

    main = make_model("qwen2", layers=4, hidden=128)  # head dim 32: one quantization group
    kw = dict(options)
    if kw.get("logits_processors"):
        kw["logits_processors"] = make_logits_processors(repetition_penalty=2.0)
    prompt = [(7 * i + 3) % 90 + 3 for i in range(20)]  # its first step reaches quantized_kv_start
    expected = list(generate_step(mx.array(prompt), main, max_tokens=60, **kw))
    assert [t for t, _ in expected] != reference(main, prompt, 60)
    cache = make_prompt_cache(main, max_kv_size=kw.get("max_kv_size"))
    got = list(
        speculative_generate_step(prompt, main, None, max_tokens=60, prompt_cache=cache, prompt_lookup=False, **kw)
    )
    assert [t for t, _, _ in got] == [t for t, _ in expected]
    for (_, ours, _), (_, theirs) in zip(got, expected):  # each step saw the cache mlx-lm's step saw
        assert np.allclose(np.array(ours), np.array(theirs), atol=1e-4)
    check_consistent(cache)
    if "kv_bits" in kw:
        assert all(isinstance(c, QuantizedKVCache) for c in cache.main)


@pytest.mark.parametrize("max_kv_size", [None, 16])
def test_no_draft_early_stop_drops_the_step_scheduled_ahead(pair, max_kv_size):
    main, _ = pair
    prompt = [1, 5, 9, 22, 3]
    cache = make_prompt_cache(main, max_kv_size=max_kv_size)
    steps = speculative_generate_step(prompt, main, None, max_tokens=100, prompt_cache=cache, prompt_lookup=False)
    first = [next(steps)[0] for _ in range(23)]
    assert cache.main_offset == len(cache.tokens)  # the 24th step is already in the cache
    steps.close()
    assert cache.tokens == prompt + first
    check_consistent(cache)
    fresh = make_prompt_cache(main, max_kv_size=max_kv_size)
    assert spec(prompt, main, None, max_tokens=23, prompt_cache=fresh) == first  # nothing scheduled past the end
    cont = spec([30, 31], main, None, max_tokens=30, prompt_cache=cache)
    assert cont == spec([30, 31], main, None, max_tokens=30, prompt_cache=fresh)
    if max_kv_size is None:
        assert cont == reference(main, prompt + first + [30, 31], 30)


@pytest.mark.parametrize("k", [5, 8, 11])
def test_rotating_cache_after_a_long_rejected_round_that_wrapped(k):
    """A round that writes past the ring's end and is rolled back, then a one-token step: the slots it wrote
    beyond the window must not pass for the kept first positions."""
    main = make_model("qwen2", layers=4)
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, 90, 90)]
    plain = make_prompt_cache(main, max_kv_size=16).main
    expected = [np.array(main(mx.array([[t]]), cache=plain)[0, -1]) for t in tokens]
    layers = make_prompt_cache(main, max_kv_size=16).main
    main(mx.array([tokens[:1]]), cache=layers)
    layers = [SlackRotatingCache.from_rotating(c) for c in layers]
    position = 1
    while position + k + 1 <= len(tokens):
        for num_draft in (0, k):  # a plain step, then a round whose drafts are all rejected
            out = main(mx.array([tokens[position : position + 1] + [5] * num_draft]), cache=layers)[0, 0]
            assert np.allclose(np.array(out), expected[position], atol=1e-3), (position, num_draft)
            for c in layers:
                c.trim(num_draft)
            position += 1


@pytest.mark.parametrize("max_kv_size", [None, 16])
def test_reuse_prefix_keeps_the_shared_prefix_and_one_token_to_go_in(pair, max_kv_size):
    main, draft = pair
    cache = make_prompt_cache(main, draft, max_kv_size)
    first = [5, 6, 7, 8]
    generated = spec(first, main, draft, max_tokens=6, prompt_cache=cache)
    other = (generated[2] + 1) % 97  # where the new tokens part from the cached ones
    assert reuse_prefix(cache, first + generated[:2] + [other, 10]) == 6
    assert cache.tokens == first + generated[:2] and cache.main_offset == 5 and cache.draft_offset <= 5
    assert reuse_prefix(cache, first + generated[:2]) == 5  # all of it shared: the last token goes in again
    # The reused cache continues as a fresh run over the whole conversation would.
    assert spec([generated[1]], main, draft, max_tokens=8, prompt_cache=cache) == spec(
        first + generated[:2], main, draft, max_tokens=8, max_kv_size=max_kv_size
    )


def test_reuse_prefix_leaves_a_rotating_cache_that_cannot_go_back_unchanged(pair):
    main, draft = pair
    cache = make_prompt_cache(main, draft, max_kv_size=16)
    prompt = [5, 6, 7]
    generated = spec(prompt, main, draft, max_tokens=3 * SLACK, prompt_cache=cache)
    tokens = list(cache.tokens)
    assert reuse_prefix(cache, prompt + [9]) is None
    assert cache.tokens == tokens and tokens == prompt + generated


class Scripted:
    """A policy that plays `script` in a loop (plain rounds as 0, draft lengths as k): each entry is either
    chosen, or, plain, the answer to whether a queued plain round may queue the next one."""

    def __init__(self, script):
        from mlx_spec.adaptive import DRAFT, PLAIN, Choice

        self.choices = [Choice(DRAFT, k) if k else Choice(PLAIN, 0) for k in script]
        self.next, self.chosen, self.asked, self.played = 0, 0, 0, []

    def choose(self, match=None, behind=1, left=None):
        self.chosen += 1
        self.next += 1
        return self.choices[(self.next - 1) % len(self.choices)]

    def keeps_plain(self, match=None, behind=1, left=None):
        self.asked += 1
        plain = self.choices[self.next % len(self.choices)].num_draft == 0
        self.next += plain
        return plain

    def record(self, choice, num_accepted, seconds, catch_up=None, unused=None):
        self.played.append(choice.num_draft)


@pytest.mark.parametrize("max_kv_size", [None, 16])
def test_a_plain_round_queues_the_next_step_and_the_policy_takes_over_after_it(pair, max_kv_size, monkeypatch):
    """A plain round queues a plain step before its token is read: the next round is that step, whatever
    the policy would choose; the policy then decides again. Output and caches stay the main model's."""
    import importlib

    main, draft = pair
    policy = Scripted([0, 0, 0, 3, 0, 2])
    monkeypatch.setattr(importlib.import_module("mlx_spec.generate"), "_policy", lambda *args: policy)
    monkeypatch.setattr(verify, "HEADED_TYPES", ())  # the output layer stays whole: a long prompt is read
    prompt = [(7 * i + 3) % 90 + 3 for i in range(MAX_FOLDED + 12)]  # before the first round, the policy's
    cache = make_prompt_cache(main, draft, max_kv_size=max_kv_size)
    got = spec(prompt, main, draft, max_tokens=80, prompt_cache=cache, prompt_lookup=False)
    assert got == reference(main, prompt, 80, max_kv_size=max_kv_size)
    check_consistent(cache)
    # chosen plain, then queued: plain, plain and one more, since the draft's 3 waits for the queued round
    assert policy.played[:8] == [0, 0, 0, 0, 3, 0, 0, 2]
    assert policy.chosen + policy.asked == len(policy.played)  # each round asks once: chosen, or queued


@pytest.mark.parametrize("max_kv_size", [None, 16])
def test_stopping_with_a_plain_step_queued_then_continuing_equals_a_fresh_run(pair, max_kv_size, monkeypatch):
    """The caller stops while a plain round has the next step queued: the caches drop it, and the next call
    over them answers as a fresh run does."""
    import importlib

    main, draft = pair
    monkeypatch.setattr(importlib.import_module("mlx_spec.generate"), "_policy", lambda *args: Scripted([0]))
    prompt = [1, 5, 9, 22, 3]
    cache = make_prompt_cache(main, draft, max_kv_size=max_kv_size)
    steps = speculative_generate_step(prompt, main, draft, max_tokens=100, prompt_cache=cache)
    first = [next(steps)[0] for _ in range(21)]
    steps.close()
    assert first == reference(main, prompt, 21, max_kv_size=max_kv_size)
    assert cache.tokens == prompt + first
    check_consistent(cache)
    turn = [30, 31, 32]
    cont = spec(turn, main, draft, max_tokens=30, prompt_cache=cache)
    fresh = make_prompt_cache(main, draft, max_kv_size=max_kv_size)
    spec(prompt, main, draft, max_tokens=21, prompt_cache=fresh)
    assert cont == spec(turn, main, draft, max_tokens=30, prompt_cache=fresh)
