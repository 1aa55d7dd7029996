"""Hybrid and recurrent models (mlx-lm's ArraysCache layers): rollback, sampling, prompt caches, server reuse."""

import importlib
import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import generate as mlx_lm_generate
from mlx_lm import stream_generate as mlx_lm_stream_generate
from mlx_lm.models.cache import ArraysCache, KVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_make_prompt_cache
from test_accept import CRITICAL, chi_squared
from tiny import make_model, perturbed, reference, spec, toy_tokenizer

import mlx_spec
from mlx_spec import GenerationStats, make_prompt_cache, speculative_generate_step
from mlx_spec.accept import accept_greedy
from mlx_spec.cache import CachePair
from mlx_spec.decode import prefill
from mlx_spec.generate import MAX_FOLDED
from mlx_spec.recurrent import RecurrentCache, leaves, recurrent
from mlx_spec.sampling import SamplingParams
from mlx_spec.server import PromptCaches
from mlx_spec.verify import score

VOCAB = 97
K = 4  # draft tokens per round
PROMPT = [5, 17, 42, 9, 88, 23, 61, 7]
GREEDY = SamplingParams()
NO_DRAFT = mx.zeros((0,), mx.int32)


def sharpened(model_type: str, config: dict, seed: int = 0, scale: float = 2.5, noise: float = 0.4):
    """A float32 mlx-lm model with random weights that make context and state matter: every weight matrix
    but the embeddings times `scale`, and N(0, noise) added to the 1-d parameters (A_log, dt_bias, norms,
    biases: constants in mlx-lm's initialisation)."""
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    params = []
    for key, w in tree_flatten(model.parameters()):
        if "embed" not in key:
            w = w * scale if w.ndim >= 2 else w + mx.array(rng.normal(0.0, noise, w.shape).astype(np.float32))
        params.append((key, w))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def hybrid(vocab: int = VOCAB, layers: int = 4, seed: int = 0, scale: float = 2.5):
    """Qwen3.5's text model: GatedDeltaNet (recurrent) layers and attention layers in turn."""
    text = dict(
        model_type="qwen3_5",
        hidden_size=64,
        num_hidden_layers=layers,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        full_attention_interval=2,
        head_dim=16,
        max_position_embeddings=1000,
        tie_word_embeddings=False,
        rope_parameters={
            "type": "default",
            "mrope_section": [2, 1, 1],
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
    )
    return sharpened("qwen3_5", dict(model_type="qwen3_5", text_config=text), seed, scale)


def mamba(seed: int = 0):
    """A pure state-space model: every layer recurrent, no layer that counts its tokens."""
    config = dict(
        model_type="mamba",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        state_size=8,
        num_hidden_layers=2,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        time_step_rank=8,
    )
    return sharpened("mamba", config, seed)


@pytest.fixture(scope="module")
def main():
    model = hybrid()
    assert [type(c).__name__ for c in model.make_cache()] == ["ArraysCache", "KVCache"] * 2
    return model


@pytest.fixture(scope="module")
def draft(main):
    return perturbed(main, 0.02)  # agrees about half the time: many partial acceptances


@pytest.fixture(scope="module")
def ssm():
    model = mamba()
    return model, perturbed(model, 0.02)


# --- 1. a partial acceptance commits exactly what sequential decoding holds -----------------------------


def sequential(model, tokens: list[int]):
    """A fresh mlx-lm cache fed `tokens` one at a time: the last position's log-probabilities, and the cache."""
    cache = mlx_lm_make_prompt_cache(model)
    logits = None
    for token in tokens:
        logits = model(mx.array([[token]]), cache=cache)
    mx.eval([c.state for c in cache])
    return (None if logits is None else logits[0, -1] - mx.logsumexp(logits[0, -1])), cache


def assert_same_caches(ours: list, theirs: list, num_tokens: int):
    """Our cache holds what the sequential one does: the recurrent states, the KV entries, `num_tokens` each."""
    assert len(ours) == len(theirs)
    for mine, other in zip(ours, theirs):
        assert mine.offset == num_tokens
        if isinstance(mine, RecurrentCache):
            assert type(other) is ArraysCache
            for a, b in zip(mine.cache, other.cache, strict=True):
                np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
        else:
            assert isinstance(mine, KVCache) and other.offset == num_tokens
            for a, b in ((mine.keys, other.keys), (mine.values, other.values)):
                np.testing.assert_allclose(
                    np.array(a[..., :num_tokens, :]), np.array(b[..., :num_tokens, :]), atol=1e-4
                )


def one_round(model, pair: CachePair, drafts: list[int], num_accepted: int) -> int:
    """A greedy round as decode.rounds runs it: the pending tokens and `drafts` in one forward, `num_accepted`
    of them accepted (the drafts are chosen so), rollback. Returns the main cache's offset at the round's start."""
    start = pair.main_offset
    logprobs, _ = score(model, pair.main, mx.array(pair.tokens[start:]), mx.array(drafts, mx.int32), GREEDY)
    accepted, next_token = accept_greedy(mx.array(drafts, mx.int32), logprobs)
    assert accepted.item() == num_accepted
    pair.tokens.extend(drafts[:num_accepted] + [next_token.item()])
    assert pair.rollback()
    return start


def drafts_for(model, tokens: list[int], num_accepted: int) -> list[int]:
    """K drafts of which the main model accepts the first `num_accepted`: its own tokens, then a wrong one."""
    own = reference(model, tokens, K)
    return (
        own if num_accepted == K else own[:num_accepted] + [(own[num_accepted] + 1) % VOCAB] + own[num_accepted + 1 :]
    )


@pytest.mark.parametrize("num_accepted", range(K + 1))
def test_a_partial_acceptance_commits_what_sequential_decoding_holds(main, num_accepted):
    """After a round that accepted a of k drafts, the main cache is back at the round's start (a recurrent layer
    cannot drop the rejected tokens; the attention layers are cut to the same length), or at all tokens but
    the last when all were accepted; what the next round reads then gives the logits and leaves the states
    of sequential decoding. A second round starts with those pending tokens, drafts, and is rolled back too."""
    pair = make_prompt_cache(main)
    pair.tokens = list(PROMPT)
    prefill(main, pair.main, PROMPT[:-1], pair, lambda caches: None)
    prompt_state = [list(c.cache) for c in recurrent(pair.main)]

    start = one_round(main, pair, drafts_for(main, pair.tokens, num_accepted), num_accepted)
    assert start == len(PROMPT) - 1
    assert len(pair.tokens) == len(PROMPT) + num_accepted + 1
    assert pair.main_offset == (len(pair.tokens) - 1 if num_accepted == K else start)
    assert_same_caches(pair.main, sequential(main, pair.tokens[: pair.main_offset])[1], pair.main_offset)
    if num_accepted < K:  # the very arrays kept before the forward
        assert all(a is b for c, s in zip(recurrent(pair.main), prompt_state) for a, b in zip(c.cache, s))

    # the next round reads the pending tokens with its drafts; one accepted, rolled back to its own start
    start = one_round(main, pair, drafts_for(main, pair.tokens, 1), 1)
    assert start == (len(PROMPT) + K if num_accepted == K else len(PROMPT) - 1)
    assert pair.main_offset == start
    assert_same_caches(pair.main, sequential(main, pair.tokens[:start])[1], start)

    # and a round without drafts reads them all: the logits and the states of sequential decoding
    logprobs, _ = score(main, pair.main, mx.array(pair.tokens[pair.main_offset :]), NO_DRAFT, GREEDY)
    expected, cache = sequential(main, pair.tokens)
    np.testing.assert_allclose(np.array(logprobs[-1]), np.array(expected), atol=1e-4)
    assert_same_caches(pair.main, cache, len(pair.tokens))


# --- 2. the tests see a rollback that forgets to restore the state ----------------------------------


def offset_only_trim(self, n):
    """A broken RecurrentCache.trim: moves the offset back, keeps the state that read the rejected tokens."""
    if n <= 0:
        return 0
    self.offset -= n
    return n


@pytest.mark.parametrize("kind", ["hybrid", "mamba"])
def test_a_rollback_that_keeps_the_rejected_state_changes_the_output(main, draft, ssm, kind, monkeypatch):
    model, drafter = (main, draft) if kind == "hybrid" else ssm
    expected = reference(model, PROMPT, 30)
    stats = GenerationStats()
    assert spec(PROMPT, model, drafter, num_draft_tokens=K, max_tokens=30, prompt_lookup=False, stats=stats) == expected
    assert 0 < stats.accepted_draft_tokens < stats.total_draft_tokens  # rounds with partial acceptances
    monkeypatch.setattr(RecurrentCache, "trim", offset_only_trim)
    assert spec(PROMPT, model, drafter, num_draft_tokens=K, max_tokens=30, prompt_lookup=False) != expected


# --- 3. sampled output follows the main model's distribution ----------------------------------------

SAMPLED_VOCAB = 12
RUNS = 300
# chi-squared at p = 0.001, with the degrees of freedom of a 12-token vocabulary
CRITICAL_12 = {**CRITICAL, 8: 26.12, 9: 27.88, 10: 29.59, 11: 31.26}


@pytest.fixture(scope="module")
def small():
    """A two-layer hybrid (one GatedDeltaNet layer, one attention layer) over 12 tokens, and a draft for it."""
    model = hybrid(vocab=SAMPLED_VOCAB, layers=2, scale=1.5)
    return model, perturbed(model, 0.6)  # accepts about a third of its drafts: many rollbacks


def first_three_marginals(model, prompt: list[int], temp: float) -> list[np.ndarray]:
    """The distributions of the first three sampled tokens, by enumerating the first two."""
    V = SAMPLED_VOCAB

    def dist(prefixes):
        logits = model(mx.array(prefixes))[:, -1].astype(mx.float32)
        return np.array(mx.softmax(logits / temp, axis=-1), np.float64)

    p1 = dist([prompt])[0]
    p2_given = dist([prompt + [x] for x in range(V)])  # (x, y)
    p3_given = dist([prompt + [x, y] for x in range(V) for y in range(V)]).reshape(V, V, V)
    return [p1, p1 @ p2_given, np.einsum("x,xy,xyz->z", p1, p2_given, p3_given)]


def sample_first_three(prompt, model, draft, seed, stats, **kwargs) -> list[int]:
    """The first three tokens of a sampled call that could go on (its rounds draft up to 3 tokens)."""
    steps = speculative_generate_step(
        prompt, model, draft, num_draft_tokens=3, max_tokens=6, temp=1.0, seed=seed, stats=stats, **kwargs
    )
    tokens = [t for t, _, _ in itertools.islice(steps, 3)]
    steps.close()
    return tokens


def repeating_prompt(model) -> list[int]:
    """A 5-token phrase twice and its first three tokens, chosen so the model likely goes on as the phrase did:
    prompt lookup then proposes its continuation."""
    rng = np.random.default_rng(0)
    phrases = [rng.permutation(SAMPLED_VOCAB)[:5].tolist() for _ in range(64)]
    prompts = [p * 2 + p[:3] for p in phrases]
    probs = np.array(mx.softmax(model(mx.array(prompts))[:, -1].astype(mx.float32), axis=-1))
    best = max(range(len(phrases)), key=lambda i: probs[i, phrases[i][3]])
    return prompts[best]


@pytest.mark.parametrize("source", ["draft", "lookup"])
def test_sampled_tokens_follow_the_main_distribution(small, source):
    """Tokens 1-3 at temp 1: the first decoded plainly, the second from a round of 3 drafts (draft model, or a
    copy from the repeating prompt), the third from that round or, after a rejection, from the next round,
    which reads the tokens the rollback left pending with its drafts. (A rollback that keeps the rejected
    state, as in the test above, fails the third token's check: by far with lookup, barely with the draft.)"""
    model, draft = small
    if source == "draft":
        prompt, drafter, kwargs = [3, 7, 1], draft, dict(prompt_lookup=False)
    else:
        prompt, drafter, kwargs = repeating_prompt(model), None, {}
    marginals = first_three_marginals(model, prompt, 1.0)
    stats = GenerationStats()
    samples = np.array([sample_first_three(prompt, model, drafter, seed, stats, **kwargs) for seed in range(RUNS)])
    for position, p in enumerate(marginals):
        stat, dof = chi_squared(np.bincount(samples[:, position], minlength=SAMPLED_VOCAB), p)
        assert stat < CRITICAL_12[dof], (position, np.bincount(samples[:, position], minlength=SAMPLED_VOCAB), p * RUNS)
    drafted = stats.total_draft_tokens if source == "draft" else stats.lookup_draft_tokens
    assert drafted > RUNS / 2  # the rounds really drafted (a copy: after the phrase's own next token)
    assert stats.rejected_draft_tokens > RUNS / 4  # and were rolled back


# --- 4. prompt caches: a CachePair, saved and loaded, mlx-lm's flat lists ---------------------------

P1, P2, P3 = PROMPT, [11, 4, 60, 33, 2], [70, 8, 19]


def offset_after_call(flags: list[bool], num_known: int, max_tokens: int) -> int:
    """Where a greedy call with K drafts a round leaves the main cache, from the from-draft flags of the tokens
    it yielded (a round: its accepted drafts, then the main model's token). A plain round (the first) or a
    full acceptance leaves all tokens but the last; a partial one goes back to the round's start (which stays
    where it was while rounds keep rejecting). A call that stops inside a round goes back to its start."""
    offset, length, emitted, num_accepted, size = 0, num_known, 0, 0, 0
    for i, flag in enumerate(flags):
        num_accepted, size = num_accepted + flag, size + 1
        if flag and i == len(flags) - 1:  # stopped inside a round, after an accepted draft
            return offset
        if not flag:
            num_draft = 0 if emitted == 0 else min(K, max_tokens - emitted - 1)
            length, emitted = length + size, emitted + size
            offset = length - 1 if num_accepted == num_draft else offset
            num_accepted, size = 0, 0
    return offset


def run(prompt, model, draft, stats=None, max_tokens=12, stop=None, **kwargs):
    """A greedy call with K drafts a round: its tokens and their from-draft flags; `stop`: close it after so many."""
    steps = speculative_generate_step(
        prompt, model, draft, num_draft_tokens=K, max_tokens=max_tokens, prompt_lookup=False, stats=stats, **kwargs
    )
    tokens, flags = [], []
    for token, _, from_draft in itertools.islice(steps, stop):
        tokens.append(token)
        flags.append(from_draft)
    steps.close()
    return tokens, flags


@pytest.mark.parametrize("stop", [None, 3])
def test_a_cache_pair_goes_on_over_two_turns(main, draft, stop):
    """The second turn reads its new tokens, the last one of the first, and the tokens the first turn's rollback
    left pending: none when it ran to max_tokens (its last round drafts at most the tokens left but one, so it
    decodes plainly or accepts all), those since its round's start when it stopped inside a partial round."""
    pair = make_prompt_cache(main, draft)
    out1, flags = run(P1, main, draft, prompt_cache=pair, stop=stop)
    assert out1 == reference(main, P1, 12)[:stop]
    assert pair.tokens == P1 + out1
    offset = offset_after_call(flags, len(P1), 12)
    assert pair.main_offset == offset and all(c.offset == offset for c in leaves(pair.main))
    if stop is None:
        assert offset == len(pair.tokens) - 1
    else:
        assert offset == len(P1) < len(pair.tokens) - 1  # back to the start of the round it stopped in

    stats = GenerationStats()
    out2, _ = run(P2, main, draft, stats, prompt_cache=pair)
    assert out2 == reference(main, P1 + out1 + P2, 12)
    assert stats.prompt_tokens == len(P2) + len(P1 + out1) - offset


def test_a_saved_cache_pair_goes_on_as_the_unsaved_one(main, draft, tmp_path):
    pair = make_prompt_cache(main, draft)
    out1, _ = run(P1, main, draft, prompt_cache=pair)
    mlx_spec.save_prompt_cache(str(tmp_path / "pair.safetensors"), pair)
    loaded = mlx_spec.load_prompt_cache(str(tmp_path / "pair.safetensors"))
    assert isinstance(loaded, CachePair) and loaded.tokens == pair.tokens
    assert loaded.main_offset == pair.main_offset and loaded.draft_offset == pair.draft_offset
    expected, _ = run(P2, main, draft, prompt_cache=pair)
    assert run(P2, main, draft, prompt_cache=loaded)[0] == expected
    assert loaded.tokens == pair.tokens


def test_a_saved_flat_list_goes_on_for_a_state_space_model(ssm, tmp_path):
    """A list mlx_spec used holds mlx-lm's ArraysCaches, whose length only mlx_spec knows: saved with it."""
    model, drafter = ssm
    layers = mlx_lm_make_prompt_cache(model)
    out1, _ = run(P1, model, drafter, prompt_cache=layers)
    mlx_spec.save_prompt_cache(str(tmp_path / "list.safetensors"), layers)
    loaded = mlx_spec.load_prompt_cache(str(tmp_path / "list.safetensors"))
    assert [type(c) for c in loaded] == [ArraysCache] * 2
    expected = reference(model, P1 + out1 + P2, 12)
    assert run(P2, model, drafter, prompt_cache=loaded)[0] == expected
    assert run(P2, model, drafter, prompt_cache=layers)[0] == expected


def mlx_lm_turns(model, turns, max_tokens=12) -> list[list[int]]:
    """mlx-lm's own conversation: each turn appended to its cache."""
    layers = mlx_lm_make_prompt_cache(model)
    return [reference(model, turn, max_tokens, prompt_cache=layers) for turn in turns]


@pytest.mark.parametrize("first", ["mlx_spec", "mlx_lm"])
def test_mlx_lm_flat_list_turns_between_mlx_spec_and_mlx_lm(main, draft, first):
    """Turns alternate between mlx_spec and mlx-lm's generate_step on one list: mlx-lm's tokens each turn, and
    the list holds mlx-lm's own classes between calls."""
    expected = mlx_lm_turns(main, [P1, P2, P3])
    layers = mlx_lm_make_prompt_cache(main)
    users = ["mlx_spec", "mlx_lm", "mlx_spec"] if first == "mlx_spec" else ["mlx_lm", "mlx_spec", "mlx_lm"]
    for turn, user, want in zip([P1, P2, P3], users, expected):
        if user == "mlx_spec":
            got, _ = run(turn, main, draft, prompt_cache=layers)
        else:
            got = reference(main, turn, 12, prompt_cache=layers)
        assert got == want, user
        assert [type(c) for c in layers] == [ArraysCache, KVCache] * 2
    assert [c.offset for c in layers if isinstance(c, KVCache)] == [len(P1 + P2 + P3) + 3 * 12] * 2  # every token


def test_a_state_space_list_of_unknown_length_is_refused(ssm):
    """mamba's layers count nothing: a list mlx-lm filled has no length mlx_spec could know. One mlx_spec used
    goes on (it remembers the list) until mlx-lm changes it."""
    model, drafter = ssm
    expected = mlx_lm_turns(model, [P1, P2, P3])
    layers = mlx_lm_make_prompt_cache(model)
    assert run(P1, model, drafter, prompt_cache=layers)[0] == expected[0]
    assert run(P2, model, drafter, prompt_cache=layers)[0] == expected[1]
    assert reference(model, P3, 12, prompt_cache=layers) == expected[2]  # mlx-lm goes on with it too
    with pytest.raises(ValueError, match="unknown length"):
        run([3, 4], model, drafter, prompt_cache=layers)
    filled = mlx_lm_make_prompt_cache(model)
    reference(model, P1, 4, prompt_cache=filled)
    with pytest.raises(ValueError, match="unknown length"):
        run(P2, model, None, prompt_cache=filled)


# --- 5. the server's prompt caches ------------------------------------------------------------------

LONG = [(7 * i + 3) % 90 + 3 for i in range(MAX_FOLDED + 6)]  # read before the first round, but its last token


def serve(caches: PromptCaches, main, draft, tokens: list[int]):
    """One request as the server's engine runs it: take a cache, generate, put it back."""
    cache, rest = caches.take(tokens, True)
    start = cache.main_offset
    stats = GenerationStats()
    out, _ = run(rest, main, draft, stats, prompt_cache=cache, max_tokens=8)
    caches.put(cache, len(tokens))
    assert out == reference(main, tokens, 8)  # every answer is the fresh cache's
    assert stats.prompt_tokens == len(tokens) - start
    return cache, rest, start, out


def test_server_prompt_caches_reuse_a_hybrid_cache(main, draft):
    caches = PromptCaches(main, draft, None, 4)
    first, rest, start, out1 = serve(caches, main, draft, LONG)
    assert rest == LONG and start == 0
    conversation = LONG + out1 + P2
    # (a) the conversation goes on: the same cache, only the new message to read (and what a rollback left)
    offset = first.main_offset
    assert offset == len(LONG + out1) - 1  # a call run to max_tokens leaves nothing pending
    cache, rest, start, out2 = serve(caches, main, draft, conversation)
    assert cache is first and rest == P2 and start == offset
    # (b) the same prompt again: back to the state its first asking kept at the prompt, the same answer
    cache, rest, start, again = serve(caches, main, draft, conversation)
    assert cache is first and rest == conversation[-1:] and start == offset
    assert again == out2
    # (c) a prompt that shares less than any kept state (more than half the cache): a fresh cache
    shared = len(first.tokens) // 2 + 1
    assert all(kept > shared for c in recurrent(first.main) for kept in c.kept)
    other = conversation[:shared] + [1, 2, 3]
    cache, rest, start, _ = serve(caches, main, draft, other)
    assert cache is not first and rest == other and start == 0


def test_server_a_long_prompt_asked_again_reuses_its_state(main, draft):
    caches = PromptCaches(main, draft, None, 4)
    first, _, _, out1 = serve(caches, main, draft, LONG)
    cache, rest, start, again = serve(caches, main, draft, LONG)
    assert again == out1
    assert cache is first and start >= len(LONG) - 2


# --- 6. plain decoding, the defaults, the text API ----------------------------------------------------

REPEATING = [5, 17, 42, 9, 88, 23, 61, 7, 93, 30, 14, 71] * 3 + [5, 17, 42]


def test_plain_decoding_and_the_defaults_give_mlx_lm_tokens(main, draft):
    expected = reference(main, REPEATING, 40)
    assert spec(REPEATING, main, None, prompt_lookup=False, max_tokens=40) == expected
    stats = GenerationStats()
    assert spec(REPEATING, main, None, max_tokens=40, stats=stats) == expected  # lookup, "auto"
    assert stats.lookup_draft_tokens > 0
    stats = GenerationStats()
    assert spec(REPEATING, main, draft, max_tokens=40, num_draft_tokens="auto", stats=stats) == expected
    assert stats.total_draft_tokens > 0


@pytest.mark.parametrize("with_draft", [False, True])
def test_stream_generate_and_generate_give_mlx_lm_text(main, draft, with_draft):
    tokenizer = toy_tokenizer()
    prompt = " ".join(f"w{t}" for t in REPEATING)
    kwargs = dict(draft_model=draft) if with_draft else {}
    expected = [r.token for r in mlx_lm_stream_generate(main, tokenizer, prompt, max_tokens=30)]
    assert [r.token for r in mlx_spec.stream_generate(main, tokenizer, prompt, max_tokens=30, **kwargs)] == expected
    assert mlx_spec.generate(main, tokenizer, prompt, max_tokens=30, **kwargs) == mlx_lm_generate(
        main, tokenizer, prompt, max_tokens=30
    )


# --- 7. drafts of either kind for a hybrid --------------------------------------------------------


@pytest.mark.parametrize("max_kv_size", [None, 12])
@pytest.mark.parametrize("kind", ["hybrid", "attention"])
def test_hybrid_and_attention_drafts_give_the_main_tokens(main, draft, kind, max_kv_size):
    drafter = draft if kind == "hybrid" else make_model("qwen2", vocab=VOCAB)
    expected = reference(main, PROMPT, 40, max_kv_size=max_kv_size)
    stats = GenerationStats()
    got = spec(PROMPT, main, drafter, num_draft_tokens=K, max_tokens=40, max_kv_size=max_kv_size, stats=stats)
    assert got == expected
    assert stats.rejected_draft_tokens > 0
