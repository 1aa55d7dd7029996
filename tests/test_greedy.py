"""Greedy output is token-for-token the main model's own, for every architecture, draft and k."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from tiny import first_layers, make_model, perturbed, quantized, reference, spec

from mlx_spec import GenerationStats, speculative_generate_step, verify
from mlx_spec.generate import MAX_FOLDED

PROMPTS = [[1, 5, 9, 22, 3], [7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [90, 2, 90, 2]]


@pytest.fixture(scope="module")
def llama():
    return make_model("llama", layers=4)


@pytest.mark.parametrize("k", range(1, 17))
def test_every_draft_length(llama, k):
    draft = perturbed(llama, 0.005)
    for prompt in PROMPTS[:2]:
        stats = GenerationStats()
        assert spec(prompt, llama, draft, num_draft_tokens=k, max_tokens=40, stats=stats) == reference(
            llama, prompt, 40
        )
        assert 0 < stats.accepted_draft_tokens < stats.total_draft_tokens  # both paths exercised


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_architectures_and_drafts(arch):
    main = make_model(arch, layers=4)
    drafts = {"perturbed": perturbed(main, 0.01), "first layers": first_layers(main, 2), "itself": main}
    for prompt in PROMPTS:
        expected = reference(main, prompt, 48)
        for name, draft in drafts.items():
            for k in (2, 5):
                stats = GenerationStats()
                got = spec(prompt, main, draft, num_draft_tokens=k, max_tokens=48, stats=stats)
                assert got == expected, (name, k, prompt)
                if name == "itself":  # every draft accepted: the draft cache must not fall a token behind
                    assert stats.model_accepted_tokens == stats.model_draft_tokens > 0


def test_no_draft_is_plain_decoding(llama):
    for prompt in PROMPTS:
        stats = GenerationStats()
        assert spec(prompt, llama, None, max_tokens=30, stats=stats, prompt_lookup=False) == reference(
            llama, prompt, 30
        )
        assert stats.num_rounds == 30 and stats.total_draft_tokens == 0


@pytest.mark.parametrize("cut", [True, False])
@pytest.mark.parametrize("length", [5, MAX_FOLDED, MAX_FOLDED + 1, 300])
def test_the_prompts_last_step_gives_the_first_token_in_the_pass_that_reads_it(llama, monkeypatch, length, cut):
    """The prompt's last prefill step goes in with the first round: its pass gives the first token, before the
    draft model runs, and the call makes one pass fewer than mlx-lm's decoding. Where the output layer is cut
    from the model, it runs over the last row only, whatever the step's length; where it cannot be (a model
    type not known to be a body and an output layer), the step goes in with the first round only if short."""
    if not cut:
        monkeypatch.setattr(verify, "HEADED_TYPES", ())
    passes, head_rows = [], []  # (model, tokens it read); rows the main model's output layer computed
    body, head = type(llama.model).__call__, type(llama.lm_head).__call__

    def counted(self, inputs, *args, **kwargs):
        passes.append(("main" if self is llama.model else "draft", inputs.shape[1]))
        return body(self, inputs, *args, **kwargs)

    def headed(self, x):
        if self is llama.lm_head:
            head_rows.append(x.shape[1])
        return head(self, x)

    monkeypatch.setattr(type(llama.model), "__call__", counted)
    monkeypatch.setattr(type(llama.lm_head), "__call__", headed)
    prompt = [(7 * i) % 80 + 3 for i in range(length)]
    folded = cut or length <= MAX_FOLDED
    draft = perturbed(llama, 0.005)
    steps = speculative_generate_step(prompt, llama, draft, num_draft_tokens=2, max_tokens=12, prompt_lookup=False)
    first = next(steps)[0]
    main_passes = [n for model, n in passes if model == "main"]
    assert main_passes == ([length] if folded else [length - 1, 3])
    assert head_rows == ([1] if cut else [length] if folded else [length - 1, 3])
    assert ("draft" in dict(passes)) is not folded
    expected = reference(llama, prompt, 12)
    assert [first] + [t for t, _, _ in steps] == expected
    passes.clear()
    assert spec(prompt, llama, None, max_tokens=12, prompt_lookup=False) == expected
    assert len(passes) == 12 + (not folded)  # plain decoding: a pass per token, the prompt read with the first


def top2_gap(model, tokens):
    logits = model(mx.array(tokens)[None])[0, -1].astype(mx.float32)
    top = np.sort(np.array(logits))[-2:]
    return float(top[1] - top[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_four_bit_diverges_only_at_near_ties(arch):
    main = quantized(make_model(arch, layers=4))
    draft = quantized(perturbed(make_model(arch, layers=4), 0.005))
    checked = 0
    for prompt in PROMPTS:
        for k in (1, 3, 6):
            expected = reference(main, prompt, 40)
            got = spec(prompt, main, draft, num_draft_tokens=k, max_tokens=40)
            diverged = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
            if diverged is not None:
                gap = top2_gap(main, prompt + expected[:diverged])
                assert gap < 1e-3, f"diverged at {diverged} although the top-2 gap is {gap}"
            checked += 1
    assert checked == 12


def test_logits_match_plain_decoding(llama):
    """The logprobs yielded with each token are the main model's at that position."""
    draft = perturbed(llama, 0.005)
    prompt = PROMPTS[0]
    plain = [lp for _, lp in generate_step(mx.array(prompt), llama, max_tokens=20)]
    ours = [lp for _, lp, _ in speculative_generate_step(prompt, llama, draft, num_draft_tokens=4, max_tokens=20)]
    for a, b in zip(plain, ours):
        assert np.allclose(np.array(a), np.array(b), atol=1e-4)


@pytest.mark.parametrize(
    "arch, quantize", [("llama", False), ("qwen2", False), ("gemma3_text", False), ("qwen2", True)]
)
def test_draft_shortlist_keeps_greedy_exact(arch, quantize):
    """A draft whose output layer is cut to the first ids: same output, fewer acceptances of the rest."""
    main = make_model(arch, layers=4)
    draft = perturbed(main, 0.005)
    if quantize:
        main, draft = quantized(main), quantized(draft)
    for prompt in PROMPTS[:2]:
        expected = reference(main, prompt, 40)
        full, short = GenerationStats(), GenerationStats()
        assert (
            spec(prompt, main, draft, num_draft_tokens=3, max_tokens=40, stats=full, draft_vocab_size=None) == expected
        )
        assert (
            spec(prompt, main, draft, num_draft_tokens=3, max_tokens=40, stats=short, draft_vocab_size=48) == expected
        )
        beyond = [t for t in expected if t >= 48]
        if beyond:
            assert short.accepted_draft_tokens < full.accepted_draft_tokens


def test_shortlisted_draft_never_proposes_beyond_the_shortlist():
    main = make_model("qwen2", layers=4)
    proposed = []
    from mlx_spec.cache import make_prompt_cache
    from mlx_spec.draft import DraftModel, propose
    from mlx_spec.sampling import SamplingParams

    cache = make_prompt_cache(main, main)
    draft = DraftModel(main, 97, shortlist=20)
    assert draft.head is not None
    for start in range(3, 60, 7):
        tokens, probs = propose(draft, cache.draft, [start], 4, SamplingParams(temp=1.0), mx.random.key(start))
        proposed += tokens.tolist()
        assert float(probs[:, 20:].sum()) == 0.0
    assert max(proposed) < 20
