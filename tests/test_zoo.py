"""Every architecture mlx-lm can run (tests/zoo.py) gives mlx-lm's own greedy tokens through the engine:
plainly, with prompt lookup, with a draft model (itself, a perturbed copy), and with a small max_kv_size."""

import copy
from functools import cache

import pytest
from zoo import ARCHITECTURES, REPEATING_PROMPT, UNBUILDABLE, build, perturbed, reference

from mlx_spec import GenerationStats, speculative_generate_step

ARCHS = [name for name in ARCHITECTURES if name not in UNBUILDABLE]
PROMPT = [3, 51, 7, 90, 12, 64, 33, 8]
MAX_TOKENS = 24
MAX_KV_SIZE = 12  # prompt + generation is 32 tokens: the rotating cache wraps around
# Models whose caches cannot roll back (deepseek_v41's compressed LayerCache): they decode plainly, lookup off,
# and a draft model is refused with a clear error.
NO_ROLLBACK = {"deepseek_v41"}


@cache
def model_of(arch):
    return build(arch)


@cache
def draft_of(arch, kind):
    model = model_of(arch)
    return copy.deepcopy(model) if kind == "itself" else perturbed(model, arch)


@cache
def expected(arch, prompt, max_kv_size=None):
    return reference(model_of(arch), list(prompt), MAX_TOKENS, max_kv_size=max_kv_size)


def spec(prompt, model, draft, **kwargs):
    return [t for t, _, _ in speculative_generate_step(prompt, model, draft, max_tokens=MAX_TOKENS, **kwargs)]


@pytest.mark.parametrize("arch", ARCHS)
def test_plain(arch):
    stats = GenerationStats()
    assert spec(PROMPT, model_of(arch), None, prompt_lookup=False, stats=stats) == expected(arch, tuple(PROMPT))
    assert stats.total_draft_tokens == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_lookup(arch):
    stats = GenerationStats()
    got = spec(REPEATING_PROMPT, model_of(arch), None, prompt_lookup=True, num_draft_tokens=4, stats=stats)
    assert got == expected(arch, tuple(REPEATING_PROMPT))
    if arch in NO_ROLLBACK:
        assert stats.lookup_draft_tokens == 0  # switched off: nothing could be rolled back
    else:
        assert stats.lookup_draft_tokens > 0  # the prompt repeats: lookup had something to copy


@pytest.mark.parametrize("arch", ARCHS)
def test_draft_itself(arch):
    """A copy of the main model drafts: every draft token is accepted, and each round ends with a bonus token."""
    if arch in NO_ROLLBACK:
        with pytest.raises(ValueError, match="LayerCache cache cannot be rolled back"):
            spec(PROMPT, model_of(arch), draft_of(arch, "itself"), num_draft_tokens=3)
        return
    stats = GenerationStats()
    got = spec(PROMPT, model_of(arch), draft_of(arch, "itself"), prompt_lookup=False, num_draft_tokens=3, stats=stats)
    assert got == expected(arch, tuple(PROMPT))
    assert stats.accepted_draft_tokens == stats.total_draft_tokens > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_draft_perturbed(arch):
    """A noisy copy drafts: some draft tokens are accepted, some rejected (the caches roll back)."""
    if arch in NO_ROLLBACK:
        pytest.skip("refused, as test_draft_itself shows")
    stats = GenerationStats()
    draft = draft_of(arch, "perturbed")
    got = spec(PROMPT, model_of(arch), draft, prompt_lookup=False, num_draft_tokens=3, stats=stats)
    assert got == expected(arch, tuple(PROMPT))
    assert 0 < stats.accepted_draft_tokens < stats.total_draft_tokens
    assert stats.host_syncs == stats.num_rounds  # one host read per round, rollbacks of recurrent layers included


@pytest.mark.parametrize("arch", ARCHS)
def test_max_kv_size(arch):
    """Attention models on mlx-lm's default caches honour max_kv_size: a rotating cache of 12 tokens, which
    draft rounds roll back after it wrapped."""
    model = model_of(arch)
    if hasattr(model, "make_cache"):
        pytest.skip("the model makes its own caches: mlx-lm ignores max_kv_size")
    stats = GenerationStats()
    draft = draft_of(arch, "perturbed")
    got = spec(PROMPT, model, draft, prompt_lookup=False, num_draft_tokens=3, max_kv_size=MAX_KV_SIZE, stats=stats)
    assert got == expected(arch, tuple(PROMPT), MAX_KV_SIZE)
    assert stats.accepted_draft_tokens > 0
