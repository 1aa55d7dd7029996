"""mlx-lm's documented usage with only the import changed: mlx-lm's output, speculative or not."""

import importlib
import inspect

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load_prompt_cache
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_make_prompt_cache
from mlx_lm.models.cache import save_prompt_cache as mlx_lm_save_prompt_cache
from mlx_lm.sample_utils import make_sampler as mlx_lm_make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from test_accept import CRITICAL, chi_squared
from test_sampling import next_dist, second_acceptance
from tiny import make_model, perturbed, reference, spec, toy_tokenizer
from tiny_folders import write_tiny_pair

import mlx_spec
from mlx_spec import GenerationStats
from mlx_spec.cache import SlackRotatingCache

MESSAGE = [{"role": "user", "content": "w7 w8 w9 w10"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def pair():
    """A qwen2 pair (mlx-lm honours max_kv_size for it) and its toy tokenizer."""
    main = make_model("qwen2", layers=4)
    return main, perturbed(main, 0.005), TokenizerWrapper(toy_tokenizer(eos="<unk>"))


# --- signatures --------------------------------------------------------------


@pytest.mark.parametrize("name", ["generate", "stream_generate", "speculative_generate_step"])
def test_signatures_are_mlx_lms(name):
    """mlx-lm's positional order (but its `stream`), its keyword-only options, our extras keyword-only."""
    ours = inspect.signature(getattr(mlx_spec, name)).parameters
    theirs = inspect.signature(getattr(importlib.import_module("mlx_lm.generate"), name)).parameters

    def names(params, kind):
        return [n for n, p in params.items() if p.kind == kind and n != "stream"]

    assert names(ours, inspect.Parameter.POSITIONAL_OR_KEYWORD) == names(
        theirs, inspect.Parameter.POSITIONAL_OR_KEYWORD
    )
    assert set(names(theirs, inspect.Parameter.KEYWORD_ONLY)) <= set(names(ours, inspect.Parameter.KEYWORD_ONLY))
    for n in names(theirs, inspect.Parameter.KEYWORD_ONLY):
        assert ours[n].default == theirs[n].default or n in ("num_draft_tokens", "prefill_step_size"), n
    assert "Args:" in getattr(mlx_spec, name).__doc__


def test_generate_steps_options_are_taken_or_refused_by_name(pair):
    """Every option of mlx-lm's generate_step passed through stream_generate works, or fails naming itself."""
    main, draft, tokenizer = pair
    calls = []
    options = dict(
        max_kv_size=32,
        prefill_step_size=2,
        prompt_progress_callback=lambda done, total: calls.append((done, total)),
        kv_group_size=64,
        quantized_kv_start=5000,
        kv_bits=None,
        logits_processors=None,
        sampler=None,
        prompt_cache=None,
    )
    assert set(options) | {"input_embeddings", "max_tokens"} == {
        n for n, p in inspect.signature(generate_step).parameters.items() if p.kind == inspect.Parameter.KEYWORD_ONLY
    }
    text = mlx_spec.generate(main, tokenizer, [1, 5, 9, 22, 3], max_tokens=5, draft_model=draft, **options)
    assert len(text.split()) == 5
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]
    with pytest.raises(ValueError, match="input_embeddings"):
        mlx_spec.generate(main, tokenizer, [1, 5], input_embeddings=mx.zeros((2, 64)))


def test_prompt_progress_is_reported_as_by_mlx_lm(pair):
    main, _, _ = pair
    prompt = list(range(3, 40))
    theirs, ours = [], []
    for _ in generate_step(
        mx.array(prompt), main, max_tokens=3, prefill_step_size=8, prompt_progress_callback=lambda *a: theirs.append(a)
    ):
        pass
    spec(prompt, main, None, max_tokens=3, prefill_step_size=8, prompt_progress_callback=lambda *a: ours.append(a))
    assert ours == theirs


# --- mlx-lm's README, import changed -----------------------------------------


def test_readme_generate(folders, capsys):
    main_dir, _ = folders
    model, tokenizer = mlx_spec.load(str(main_dir))
    prompt = tokenizer.apply_chat_template(MESSAGE, add_generation_prompt=True)
    text = mlx_spec.generate(model, tokenizer, prompt=prompt, verbose=True)
    out = capsys.readouterr().out

    model, tokenizer = mlx_lm.load(str(main_dir))
    assert text == mlx_lm.generate(model, tokenizer, prompt=prompt)
    assert out.startswith("=" * 10 + "\n" + text + "\n" + "=" * 10 + "\nPrompt:")


@pytest.mark.parametrize("with_draft", [False, True])
def test_readme_stream_generate(folders, with_draft):
    main_dir, draft_dir = folders
    model, tokenizer = mlx_spec.load(str(main_dir))
    draft = mlx_spec.load(str(draft_dir))[0] if with_draft else None
    prompt = tokenizer.apply_chat_template(MESSAGE, add_generation_prompt=True)
    ours = list(mlx_spec.stream_generate(model, tokenizer, prompt, max_tokens=512, draft_model=draft))

    model, tokenizer = mlx_lm.load(str(main_dir))
    theirs = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=512))
    assert [r.token for r in ours] == [r.token for r in theirs]
    assert "".join(r.text for r in ours) == "".join(r.text for r in theirs)
    assert [r.finish_reason for r in ours] == [r.finish_reason for r in theirs]
    if with_draft:
        assert ours[-1].stats.accepted_draft_tokens > 0


def test_positional_max_tokens_and_draft_model(pair):
    main, draft, tokenizer = pair
    responses = list(mlx_spec.stream_generate(main, tokenizer, [1, 5, 9], 20, draft))
    assert [r.token for r in responses] == reference(main, [1, 5, 9], 20)
    assert responses[-1].stats.total_draft_tokens > 0


def test_no_token_limit_runs_to_the_end_token(pair):
    main, _, _ = pair
    expected = reference(main, [1, 5, 9], 300)
    stop_at = next(i for i in range(100, 300) if expected[i] not in expected[:i])
    tokenizer = TokenizerWrapper(toy_tokenizer(eos=f"w{expected[stop_at]}"))
    responses = list(mlx_spec.stream_generate(main, tokenizer, [1, 5, 9], max_tokens=-1, draft_model=main))
    assert [r.token for r in responses] == expected[: stop_at + 1]
    assert responses[-1].finish_reason == "stop"


# --- samplers ----------------------------------------------------------------


def test_make_sampler_samples_as_mlx_lms():
    logprobs = mx.log(mx.softmax(mx.random.normal((3, 50), key=mx.random.key(0)), axis=-1))
    for settings in (
        dict(temp=0.7, top_p=0.9),
        dict(temp=1.0, min_p=0.05, top_k=10),
        dict(temp=1.0, xtc_probability=1),
    ):
        mx.random.seed(4)
        ours = mlx_spec.make_sampler(**settings)(logprobs)
        mx.random.seed(4)
        assert mx.array_equal(ours, mlx_lm_make_sampler(**settings)(logprobs))
    assert mlx_spec.make_logits_processors is importlib.import_module("mlx_lm.sample_utils").make_logits_processors


@pytest.mark.parametrize(
    "sampler, rule",
    [
        (mlx_lm_make_sampler(temp=0.7, top_p=0.9), "rejection sampling"),
        (mlx_spec.make_sampler(temp=0.7, top_p=0.9), "rejection sampling"),
        (mlx_lm_make_sampler(temp=0.0), "greedy"),
        (mlx_lm_make_sampler(temp=0.7, top_p=0.9, xtc_probability=0.5), "exact match"),
        (mlx_lm_make_sampler(temp=0.7, min_p=0.1, min_tokens_to_keep=3), "exact match"),
        (lambda logprobs: mx.argmax(logprobs, axis=-1), "exact match"),
    ],
)
def test_the_statistics_say_which_rule_ran(pair, sampler, rule):
    main, draft, _ = pair
    stats = GenerationStats()
    mx.random.seed(0)  # unseeded: a seed would make it coupled sampling (tests/test_sampling.py)
    out = spec([1, 5, 9], main, draft, num_draft_tokens=3, max_tokens=30, sampler=sampler, stats=stats)
    assert stats.acceptance_rule == rule
    assert f"{rule})" in stats.summary()
    assert stats.host_syncs == stats.num_rounds  # one host read per round, whatever the rule
    if rule == "greedy" or getattr(sampler, "__name__", "") == "<lambda>":
        assert out == reference(main, [1, 5, 9], 30)  # the main model's greedy output, token for token
        assert stats.accepted_draft_tokens > 0


def test_a_sampler_and_its_settings_are_not_both_given(pair):
    main, draft, _ = pair
    with pytest.raises(ValueError, match="sampler= and temp=0.5"):
        spec([1], main, draft, sampler=mlx_lm_make_sampler(temp=0.7), temp=0.5)
    with pytest.raises(ValueError, match="sampler must be a callable"):
        spec([1], main, draft, sampler=0.7)


VOCAB = 12
PROMPT = [3, 7, 1]


@pytest.fixture(scope="module")
def small_pair():
    main = make_model("qwen2", layers=2, vocab=VOCAB, scale=1.0)
    return main, perturbed(main, 0.3)


def first_tokens(main, draft, sampler, runs, **kwargs):
    """First two tokens and the draft tokens accepted, over `runs` seeds of MLX's generator (k = 1; unseeded
    calls: rejection sampling). The first round reads the prompt and gives the first token; the second drafts
    the second token; a third, if any, is plain."""
    firsts, seconds, accepted = [], [], 0
    for seed in range(runs):
        stats = GenerationStats()
        mx.random.seed(seed)
        out = spec(PROMPT, main, draft, num_draft_tokens=1, max_tokens=3, sampler=sampler, stats=stats)
        firsts.append(out[0])
        seconds.append(out[1])
        accepted += stats.accepted_draft_tokens
    return firsts, seconds, accepted


def check_follows(tokens, p):
    stat, dof = chi_squared(np.bincount(tokens, minlength=VOCAB), p)
    assert stat < CRITICAL.get(dof, 3 * dof + 10), (np.bincount(tokens, minlength=VOCAB), p * len(tokens))


@pytest.mark.parametrize("make", [mlx_lm_make_sampler, mlx_spec.make_sampler])
def test_make_sampler_gives_mlx_lms_distribution_with_rejection_sampling(small_pair, make):
    main, draft = small_pair
    shape = dict(temp=0.7, top_p=0.9)
    p1 = next_dist(main, PROMPT, **shape)
    p2 = sum(p1[x] * next_dist(main, PROMPT + [x], **shape) for x in range(VOCAB) if p1[x] > 0)
    runs = 800
    firsts, seconds, accepted = first_tokens(main, draft, make(**shape), runs)
    check_follows(firsts, p1)
    check_follows(seconds, p2)
    theory = second_acceptance(main, draft, PROMPT, lambda p, q: np.minimum(p, q).sum(), **shape)
    assert abs(accepted / runs - theory) < 4 * np.sqrt(theory * (1 - theory) / runs)


def test_any_random_sampler_keeps_its_distribution_with_exact_match(small_pair):
    main, draft = small_pair
    p1 = next_dist(main, PROMPT, temp=0.8)
    p2 = sum(p1[x] * next_dist(main, PROMPT + [x], temp=0.8) for x in range(VOCAB) if p1[x] > 0)
    runs = 800
    firsts, seconds, accepted = first_tokens(main, draft, lambda lp: mx.random.categorical(lp / 0.8), runs)
    check_follows(firsts, p1)
    check_follows(seconds, p2)
    # exact match accepts where two independent draws agree
    theory = second_acceptance(main, draft, PROMPT, lambda p, q: (p * q).sum(), temp=0.8)
    assert abs(accepted / runs - theory) < 4 * np.sqrt(theory * (1 - theory) / runs)


# --- prompt caches -----------------------------------------------------------

TURNS = [[1, 5, 9, 22, 3], [30, 31, 32], [40, 41], [50, 51, 52]]


@pytest.mark.parametrize("max_kv_size", [None, 16])
@pytest.mark.parametrize("layers", ["main", "main + draft", "main, draft beside"])
def test_multi_turn_with_mlx_lms_flat_list(pair, max_kv_size, layers):
    """make_prompt_cache(model) [+ make_prompt_cache(draft_model)], then generate turn after turn.

    The list holds what mlx-lm's holds after each turn, so mlx-lm can take a turn in between.
    """
    main, draft, tokenizer = pair
    theirs = mlx_lm_make_prompt_cache(main, max_kv_size=max_kv_size)
    cache = mlx_lm_make_prompt_cache(main, max_kv_size=max_kv_size)
    if layers == "main + draft":
        cache += mlx_lm_make_prompt_cache(draft, max_kv_size=max_kv_size)
    draft_model = None if layers == "main" else draft
    for i, turn in enumerate(TURNS):
        expected = mlx_lm.generate(main, tokenizer, turn, max_tokens=40, prompt_cache=theirs)
        if i == 2:  # mlx-lm's turn, on the main layers of our list
            assert mlx_lm.generate(main, tokenizer, turn, max_tokens=40, prompt_cache=cache[:4]) == expected
            continue
        stats = GenerationStats()
        got = mlx_spec.generate(
            main,
            tokenizer,
            turn,
            max_tokens=40,
            prompt_cache=cache,
            draft_model=draft_model,
            stats=stats,
            num_draft_tokens=2,  # the draft model drafts (auto may choose plain or lookup rounds only)
            prompt_lookup=False,
        )
        assert got == expected
        assert stats.prompt_tokens == len(turn)  # only the new tokens went in
        assert [(type(c), c.offset) for c in cache[:4]] == [(type(c), c.offset) for c in theirs]  # mlx-lm's state
        assert all(type(c) is (KVCache if max_kv_size is None else RotatingKVCache) for c in cache)
        if draft_model is not None and i < 2:  # then the draft lacks the tokens of mlx-lm's turn
            assert stats.accepted_draft_tokens > 0
    assert len(cache) == (8 if layers == "main + draft" else 4)


@pytest.mark.parametrize("layers", ["main", "main + draft"])
def test_a_list_mlx_lm_filled_continues_as_in_mlx_lm(pair, layers):
    """Tokens mlx_spec never saw: the prompt is appended to them, as mlx-lm does."""
    main, draft, tokenizer = pair

    def filled_by_mlx_lm():
        cache = mlx_lm_make_prompt_cache(main)
        if layers == "main + draft":  # mlx-lm's speculative decoding fills both
            cache += mlx_lm_make_prompt_cache(draft)
        mlx_lm.generate(
            main, tokenizer, TURNS[0], max_tokens=20, prompt_cache=cache, draft_model=draft if len(cache) > 4 else None
        )
        return cache

    expected = mlx_lm.generate(main, tokenizer, TURNS[1], max_tokens=30, prompt_cache=filled_by_mlx_lm()[:4])
    stats = GenerationStats()
    got = mlx_spec.generate(
        main,
        tokenizer,
        TURNS[1],
        max_tokens=30,
        prompt_cache=filled_by_mlx_lm(),
        draft_model=draft,
        stats=stats,
        num_draft_tokens=2,  # the draft model drafts (auto may choose plain or lookup rounds only)
        prompt_lookup=False,
    )
    assert got == expected
    if layers == "main + draft":  # a draft cache begun now knows only the new prompt
        assert stats.accepted_draft_tokens > 0


def test_a_list_of_the_wrong_length_is_refused(pair):
    main, draft, _ = pair
    with pytest.raises(
        ValueError, match="prompt_cache has 6 layers, the models 4 \\(main\\) or 8 \\(main \\+ draft\\)"
    ):
        spec([1, 2], main, draft, prompt_cache=mlx_lm_make_prompt_cache(main) + [KVCache(), KVCache()])


@pytest.mark.parametrize("kind", ["pair", "list"])
@pytest.mark.parametrize("max_kv_size", [None, 16])
def test_save_and_load_continue_the_conversation(pair, tmp_path, kind, max_kv_size):
    main, draft, _ = pair
    if kind == "pair":
        cache = mlx_spec.make_prompt_cache(main, draft, max_kv_size=max_kv_size)
    else:
        cache = mlx_lm_make_prompt_cache(main, max_kv_size=max_kv_size) + mlx_lm_make_prompt_cache(draft, max_kv_size)
    first = spec(TURNS[0], main, draft, max_tokens=50, prompt_cache=cache)  # a rotating cache wraps
    file = str(tmp_path / "cache.safetensors")
    mlx_spec.save_prompt_cache(file, cache, metadata={"note": "hello"})
    loaded, metadata = mlx_spec.load_prompt_cache(file, return_metadata=True)
    assert metadata == {"note": "hello"}
    assert type(loaded) is type(cache)
    if kind == "pair":
        assert loaded.tokens == cache.tokens == TURNS[0] + first
        if max_kv_size:
            assert all(isinstance(c, SlackRotatingCache) for c in cache.main)
    expected = spec(TURNS[1], main, draft, max_tokens=30, prompt_cache=cache)
    stats = GenerationStats()
    assert spec(TURNS[1], main, draft, max_tokens=30, prompt_cache=loaded, stats=stats) == expected
    assert stats.prompt_tokens == len(TURNS[1]) + (kind == "pair")  # and a pair's last token
    if kind == "list" or max_kv_size is None:
        assert len(mlx_lm_load_prompt_cache(file)) == 8  # mlx-lm reads our files


def test_a_file_mlx_lm_saved_loads_and_continues(pair, tmp_path):
    main, _, tokenizer = pair
    cache = mlx_lm_make_prompt_cache(main, max_kv_size=16)
    mlx_lm.generate(main, tokenizer, TURNS[0], max_tokens=40, prompt_cache=cache)
    file = str(tmp_path / "mlx_lm.safetensors")
    mlx_lm_save_prompt_cache(file, cache)
    expected = mlx_lm.generate(main, tokenizer, TURNS[1], max_tokens=30, prompt_cache=mlx_lm_load_prompt_cache(file))
    loaded = mlx_spec.load_prompt_cache(file)
    assert isinstance(loaded, list)
    assert mlx_spec.generate(main, tokenizer, TURNS[1], max_tokens=30, prompt_cache=loaded) == expected


def test_mlx_lms_save_takes_our_rotating_cache(pair, tmp_path):
    main, draft, _ = pair
    cache = mlx_spec.make_prompt_cache(main, draft, max_kv_size=16)
    spec(TURNS[0], main, draft, max_tokens=50, prompt_cache=cache)
    file = str(tmp_path / "layers.safetensors")
    mlx_lm_save_prompt_cache(file, cache.main)
    loaded = mlx_spec.load_prompt_cache(file)
    for ours, back in zip(cache.main, loaded):
        assert type(back) is SlackRotatingCache
        assert (back.offset, back.keep, back.max_size, back.max_written) == (
            ours.offset,
            ours.keep,
            ours.max_size,
            ours.max_written,
        )
        assert mx.array_equal(back.keys, ours.keys) and mx.array_equal(back.values, ours.values)


def test_a_cache_of_another_pair_is_refused(pair, tmp_path):
    main, draft, _ = pair
    cache = mlx_spec.make_prompt_cache(main, draft)
    spec(TURNS[0], main, draft, max_tokens=5, prompt_cache=cache)
    file = str(tmp_path / "cache.safetensors")
    mlx_spec.save_prompt_cache(file, cache)
    other = make_model("qwen2", layers=4, seed=5)  # same shapes, other weights
    for loaded in (mlx_spec.load_prompt_cache(file), cache):
        with pytest.raises(ValueError, match=r"belongs to main qwen2 \(4 layers.*weights (\w+)\).*not to main qwen2"):
            spec([1], other, draft, prompt_cache=loaded)
        with pytest.raises(ValueError, match=r"and draft qwen2.*not to main qwen2.*and draft qwen2"):
            spec([1], main, other, prompt_cache=loaded)
    assert spec([1], main, draft, max_tokens=5, prompt_cache=cache)  # still usable with its own pair
