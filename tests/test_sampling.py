"""Sampled output follows the main model's distribution; acceptance reaches sum min(p, q)."""

import importlib

import mlx.core as mx
import numpy as np
import pytest
from test_accept import CRITICAL, chi_squared
from tiny import make_model, perturbed, spec

from mlx_spec import GenerationStats, speculative_generate_step

VOCAB = 12
PROMPT = [3, 7, 1]


@pytest.fixture(scope="module")
def pair():
    main = make_model("qwen2", layers=2, vocab=VOCAB, scale=1.0)
    return main, perturbed(main, 0.3)


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def shaped(logits, temp, top_p=1.0, top_k=0, min_p=0.0):
    """Reference sampling distribution, written independently of mlx_spec.sampling."""
    logprobs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    keep = np.ones_like(logits, bool)
    if top_p < 1:
        order = np.argsort(-logprobs)
        mass_before = np.cumsum(np.exp(logprobs[order])) - np.exp(logprobs[order])
        keep[order[mass_before >= top_p]] = False
    if min_p > 0:
        keep &= logprobs >= logprobs.max() + np.log(min_p)
    if top_k:
        keep[np.argsort(-logprobs)[top_k:]] = False
    scores = np.where(keep, logprobs / temp, -np.inf)
    return np_softmax(scores)


def next_dist(model, tokens, **shape):
    logits = np.array(model(mx.array(tokens)[None])[0, -1].astype(mx.float32))
    return shaped(logits, **shape)


SHAPES = [dict(temp=1.0), dict(temp=0.7, top_p=0.9, top_k=8, min_p=0.02)]


def sampled(prompt, main, draft, rule: str, run: int, **kwargs):
    """A sampled run: `rule` "coupled" passes seed=run (a seeded call); "rejection" seeds MLX's global
    generator instead (an unseeded call draws its key from it, and samples by rejection sampling)."""
    if rule == "coupled":
        return spec(prompt, main, draft, seed=run, **kwargs)
    mx.random.seed(run)
    return spec(prompt, main, draft, **kwargs)


@pytest.mark.parametrize("rule", ["rejection", "coupled"])
@pytest.mark.parametrize("shape", SHAPES + [dict(temp=1.0, draft_vocab_size=6)])
def test_first_two_tokens_follow_the_main_distribution(pair, shape, rule):
    main, draft = pair
    shape = dict(shape)
    draft_vocab_size = shape.pop("draft_vocab_size", None)  # a shortlisted draft: same distribution
    p1 = next_dist(main, PROMPT, **shape)
    p2 = sum(p1[x] * next_dist(main, PROMPT + [x], **shape) for x in range(VOCAB) if p1[x] > 0)
    runs = 1000
    firsts, seconds = [], []
    for run in range(runs):
        stats = GenerationStats()
        out = sampled(
            PROMPT,
            main,
            draft,
            rule,
            run,
            num_draft_tokens=3,
            max_tokens=3,
            draft_vocab_size=draft_vocab_size,
            stats=stats,
            **shape,
        )
        assert stats.acceptance_rule == ("coupled sampling" if rule == "coupled" else "rejection sampling")
        firsts.append(out[0])
        seconds.append(out[1])
    for tokens, p in ((firsts, p1), (seconds, p2)):
        stat, dof = chi_squared(np.bincount(tokens, minlength=VOCAB), p)
        assert stat < CRITICAL.get(dof, 3 * dof + 10), (np.bincount(tokens, minlength=VOCAB), p * runs)


def second_acceptance(main, draft, prompt, rule, **shape):
    """The odds that the second token's draft is accepted: `rule(p, q)` after each first token x ~ p1
    (a sampled call's first round decodes plainly)."""
    p1 = next_dist(main, prompt, **shape)
    return sum(
        p1[x] * rule(next_dist(main, prompt + [x], **shape), next_dist(draft, prompt + [x], **shape))
        for x in range(len(p1))
        if p1[x] > 0
    )


def gumbel_agreement(p, q):
    """P(argmax(log p + G) == argmax(log q + G)) for Gumbel noise G shared by both:
    sum over x of 1 / sum_y max(p_y / p_x, q_y / q_x) (integrate over G_x the odds that no other y wins either)."""
    return sum(1 / np.maximum(p / p[x], q / q[x]).sum() for x in np.flatnonzero((p > 0) & (q > 0)))


def test_acceptance_rate_is_sum_of_min_p_q(pair):
    main, draft = pair
    runs = 1000
    accepted = 0
    for run in range(runs):
        stats = GenerationStats()
        sampled(PROMPT, main, draft, "rejection", run, num_draft_tokens=1, max_tokens=3, temp=1.0, stats=stats)
        assert stats.total_draft_tokens == 1  # one draft token, in the second round: the first decodes plainly
        accepted += stats.accepted_draft_tokens
    theory = second_acceptance(main, draft, PROMPT, lambda p, q: np.minimum(p, q).sum(), temp=1.0)
    exact_match = second_acceptance(main, draft, PROMPT, lambda p, q: (p * q).sum(), temp=1.0)
    sigma = np.sqrt(theory * (1 - theory) / runs)
    assert abs(accepted / runs - theory) < 4 * sigma, (accepted / runs, theory)
    assert theory - exact_match > 8 * sigma  # far above "accept only if main's own sample equals the draft"


def test_a_seeded_call_accepts_as_a_gumbel_coupling(pair):
    """Coupled sampling accepts a draft token where the main and draft samples drawn with the same noise agree:
    below rejection sampling's sum min(p, q), far above exact match's sum p q."""
    main, draft = pair
    runs = 1000
    accepted = 0
    for run in range(runs):
        stats = GenerationStats()
        sampled(PROMPT, main, draft, "coupled", run, num_draft_tokens=1, max_tokens=3, temp=1.0, stats=stats)
        assert stats.total_draft_tokens == 1
        accepted += stats.accepted_draft_tokens
    theory = second_acceptance(main, draft, PROMPT, gumbel_agreement, temp=1.0)
    sigma = np.sqrt(theory * (1 - theory) / runs)
    assert abs(accepted / runs - theory) < 4 * sigma, (accepted / runs, theory)
    rejection = second_acceptance(main, draft, PROMPT, lambda p, q: np.minimum(p, q).sum(), temp=1.0)
    exact_match = second_acceptance(main, draft, PROMPT, lambda p, q: (p * q).sum(), temp=1.0)
    assert exact_match + 8 * sigma < theory < rejection


@pytest.mark.parametrize("shape", [dict(temp=0.8), dict(temp=1.0, top_p=0.9, top_k=6)])
def test_a_seed_gives_the_same_text_at_any_draft_length(pair, shape):
    """The seed and the main model decide the text: any k, auto, lookup on or off, no draft at all."""
    main, draft = pair
    prompt = PROMPT * 4  # repeats: lookup finds something to copy
    runs = {
        "k=1": dict(num_draft_tokens=1),
        "k=4": dict(num_draft_tokens=4),
        "auto": dict(num_draft_tokens="auto"),
        "k=4, no lookup": dict(num_draft_tokens=4, prompt_lookup=False),
        "lookup only": dict(draft=None, num_draft_tokens=3),
        "plain": dict(draft=None, prompt_lookup=False),
    }
    texts = {}
    for name, kwargs in runs.items():
        stats = GenerationStats()
        texts[name] = spec(
            prompt, main, kwargs.pop("draft", draft), max_tokens=40, seed=7, stats=stats, **kwargs, **shape
        )
        assert name == "plain" or stats.total_draft_tokens > 0, name
    assert len({tuple(t) for t in texts.values()}) == 1, texts
    assert spec(prompt, main, draft, max_tokens=40, seed=8, **shape) != texts["plain"]


def test_sampled_from_draft_flags_match_acceptance(pair):
    main, draft = pair
    stats = GenerationStats()
    flags = [
        f
        for _, _, f in speculative_generate_step(
            PROMPT, main, draft, num_draft_tokens=4, max_tokens=60, temp=1.0, seed=1, stats=stats
        )
    ]
    assert sum(flags) == stats.accepted_draft_tokens
    assert len(flags) == 60 == stats.accepted_draft_tokens + stats.num_rounds


@pytest.mark.parametrize("temp", [0.0, 0.8])
def test_a_draft_that_never_drafts_decodes_as_no_draft(pair, temp, monkeypatch):
    """With no draft, and with a draft that never drafts (k = 0 every round), each step is queued before
    the previous token is read, with the same keys: the same tokens."""
    from mlx_spec.decode import FixedDraft

    generate_module = importlib.import_module("mlx_spec.generate")  # the package's `generate` is the function

    main, draft = pair
    pipelined = spec(PROMPT, main, None, max_tokens=40, temp=temp, seed=3, prompt_lookup=False)
    monkeypatch.setattr(generate_module, "_policy", lambda *args: FixedDraft(0))
    stats = GenerationStats()
    assert spec(PROMPT, main, draft, max_tokens=40, temp=temp, seed=3, stats=stats) == pipelined
    assert stats.num_rounds == 40 and stats.total_draft_tokens == 0
