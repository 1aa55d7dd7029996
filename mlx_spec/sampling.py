"""Logits -> log-probabilities and sampling probabilities, shared by draft and verify; samplers.

The same transform (logits processors, then top-p, min-p, top-k on the
log-probabilities, then temperature) shapes p (main) and q (draft), exactly as
mlx-lm's sampler shapes the distribution that plain decoding samples from.
"""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler
from mlx_lm.sample_utils import make_sampler as _mlx_lm_make_sampler

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array], mx.array]  # log-probabilities (n, V) -> tokens (n,), as mlx-lm's samplers

# How the draft tokens are accepted (GenerationStats.acceptance_rule)
GREEDY = "greedy"
REJECTION_SAMPLING = "rejection sampling"
EXACT_MATCH = "exact match"
COUPLED = "coupled sampling"  # a seeded call above temperature 0: see CoupledDraws


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn: greedy (temp 0), the distribution these settings shape, or `sampler`.

    A `sampler` whose settings are unknown is called on the main model's
    log-probabilities at each verified position; a draft token is accepted only
    where it equals that sample (exact match: the sampler's own distribution, at
    a lower acceptance than rejection sampling's).
    """

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    sampler: Sampler | None = None

    def __post_init__(self):
        if not self.temp >= 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0 and self.sampler is None

    @property
    def exact_match(self) -> bool:
        return self.sampler is not None

    @property
    def acceptance_rule(self) -> str:
        if self.sampler is not None:
            return EXACT_MATCH
        return GREEDY if self.temp == 0 else REJECTION_SAMPLING


class NoDraws:
    """The random numbers of a call that draws none (greedy; a sampler of unknown settings draws its own)."""

    def take(self, position: int, count: int) -> tuple[mx.array | None, mx.array | None, mx.array | None]:
        """(draft key, acceptance key, noise) of a round deciding positions position..position+count-1."""
        return None, None, None


class KeyedDraws(NoDraws):
    """Rejection sampling's random numbers: a key, split for each round (the draft's draws, the acceptance's)."""

    def __init__(self, key: mx.array):
        self.key = key

    def take(self, position: int, count: int):
        self.key, draft_key, accept_key = mx.random.split(self.key, 3)
        return draft_key, accept_key, None


@dataclass(frozen=True)
class CoupledDraws(NoDraws):
    """The randomness of a seeded sampled call: the same text at any draft length, with or without lookup.

    The token at conversation position t is argmax(s_t + G_t), where s_t are the shaped log-probabilities
    (`filtered_scores`) and G_t Gumbel noise drawn from (seed, t) alone: a sample of softmax(s_t) (the
    Gumbel-max trick), so the text follows p exactly and depends on nothing but the seed and the main
    model. A draft model proposes argmax(s^q_t + G_t) with the same noise, a copy proposes its token, and a
    draft token is accepted where it equals the main model's: a copied token with probability p(x), as in
    rejection sampling; a drafted one with that of a coupling without communication (Daliri et al. 2024:
    at least (1 - TV) / (1 + TV), against rejection sampling's 1 - TV, TV the distance between p and q).
    """

    seed: int
    vocab_size: int

    def take(self, position: int, count: int):
        return None, None, self.noise(position, count)

    def noise(self, start: int, count: int) -> mx.array:
        """G_start .. G_{start+count-1}: (count, V) float32."""
        return mx.stack([mx.random.gumbel((self.vocab_size,), key=self._key(start + i)) for i in range(count)])

    def _key(self, position: int) -> mx.array:
        digest = hashlib.blake2b(f"{self.seed}:{position}".encode(), digest_size=8).digest()
        return mx.random.key(int.from_bytes(digest, "little") >> 1)


def draws_for(params: SamplingParams, seed: int | None, vocab_size: int) -> NoDraws:
    """A call's random numbers: coupled sampling with a seed above temperature 0 (a seed fixes the text);
    rejection sampling with a key from MLX's global generator without one (mx.random.seed repeats a run of a
    fixed draft length, as mlx-lm's sampling); none when greedy or for a sampler of unknown settings, which
    draws from MLX's global generator itself (seeded with `seed`, where given)."""
    if params.exact_match:
        if seed is not None:
            mx.random.seed(seed)
        return NoDraws()
    if params.greedy:
        return NoDraws()
    if seed is not None:
        return CoupledDraws(seed, vocab_size)
    return KeyedDraws(mx.random.key(mx.random.randint(0, 2**31 - 1, ()).item()))


def acceptance_rule(params: SamplingParams, draws: NoDraws) -> str:
    return COUPLED if isinstance(draws, CoupledDraws) else params.acceptance_rule


class SamplerWithParams:
    """A sampler from `make_sampler`: mlx-lm's sampler of the same settings, carrying them.

    Called on log-probabilities it samples exactly as mlx-lm's sampler does;
    `params` lets speculative decoding use rejection sampling with the same
    distribution (None for settings it cannot reproduce: XTC, min_tokens_to_keep > 1).
    """

    def __init__(self, sample: Sampler, params: SamplingParams | None):
        self._sample = sample
        self.params = params

    def __call__(self, logprobs: mx.array) -> mx.array:
        return self._sample(logprobs)

    def __repr__(self) -> str:
        return f"make_sampler({self.params})" if self.params is not None else "make_sampler(...)"


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.1,
    xtc_special_tokens: list[int] | None = None,
) -> SamplerWithParams:
    """Make a sampler, as mlx-lm's `make_sampler` (same arguments, same samples), for `sampler=`.

    Args:
        temp (float): The temperature for sampling; 0 takes the argmax. Default: ``0``.
        top_p (float): Nucleus sampling: keep the most likely tokens up to this
          probability mass; 0 or 1 keeps all. Default: ``0``.
        min_p (float): Drop tokens less likely than `min_p` times the most likely one. Default: ``0``.
        min_tokens_to_keep (int): Tokens min-p never drops. Default: ``1``.
        top_k (int): Keep only the `top_k` most likely tokens; 0 keeps all. Default: ``0``.
        xtc_probability (float): The probability of applying XTC sampling. Default: ``0``.
        xtc_threshold (float): The probability a token needs for XTC to drop it. Default: ``0.1``.
        xtc_special_tokens (list[int], optional): Token ids XTC never drops.

    Returns:
        SamplerWithParams: a callable taking log-probabilities and returning tokens.
    """
    sample = _mlx_lm_make_sampler(
        temp, top_p, min_p, min_tokens_to_keep, top_k, xtc_probability, xtc_threshold, xtc_special_tokens
    )
    params = None
    if temp == 0:
        params = SamplingParams()  # mlx-lm's greedy sampler, whatever the other settings
    elif xtc_probability <= 0 and (min_p == 0 or min_tokens_to_keep == 1) and min_p < 1:
        params = SamplingParams(temp, top_p if 0 < top_p < 1 else 1.0, max(top_k, 0), min_p)
    return SamplerWithParams(sample, params)


def sampler_params(sampler: Sampler) -> SamplingParams:
    """The settings `sampler` samples with where they can be read, else exact-match acceptance with it.

    Read: samplers from `make_sampler` (ours or mlx-lm's, whose closure holds its
    settings) and mlx-lm's greedy sampler.
    """
    if isinstance(sampler, SamplerWithParams) and sampler.params is not None:
        return sampler.params
    if sampler is greedy_sampler:
        return SamplingParams()
    settings = _mlx_lm_sampler_settings(sampler)
    if settings is not None:
        try:
            return SamplingParams(**settings)
        except ValueError:  # values mlx-lm accepts and rejection sampling does not reproduce (min_p = 1)
            pass
    return SamplingParams(sampler=sampler)


_MLX_LM_SAMPLER_CODE = {c for c in _mlx_lm_make_sampler.__code__.co_consts if isinstance(c, CodeType)}


def _closure(function) -> dict | None:
    """The variables a function made inside mlx-lm's make_sampler closes over (None for any other callable)."""
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None)
    if code not in _MLX_LM_SAMPLER_CODE or cells is None:
        return None
    return dict(zip(code.co_freevars, (cell.cell_contents for cell in cells)))


def _mlx_lm_sampler_settings(sampler) -> dict | None:
    """temp, top_p, min_p, top_k of a sampler mlx-lm's make_sampler built; None if it is not one or uses XTC."""
    outer = _closure(sampler)
    if outer is None or outer.keys() != {"sampling_methods", "temp"}:
        return None
    settings = {"temp": outer["temp"]}
    for method in outer["sampling_methods"]:  # top-p, min-p, XTC, top-k: each a lambda over its settings
        inner = _closure(method)
        if inner is None:
            return None
        if inner.keys() == {"top_p"}:
            settings["top_p"] = inner["top_p"]
        elif inner.keys() == {"min_p", "min_tokens_to_keep"} and inner["min_tokens_to_keep"] == 1:
            settings["min_p"] = inner["min_p"]
        elif inner.keys() == {"top_k"}:
            settings["top_k"] = inner["top_k"]
        else:
            return None
    return settings


def process(
    logits: mx.array,
    history: mx.array | None,
    next_tokens: mx.array | None,
    processors: list[LogitsProcessor] | None,
) -> mx.array:
    """Apply logits processors row by row to `logits` (n, V).

    Row i sees the history plain decoding would show it: `history` (prompt and
    every token so far) followed by the first i entries of `next_tokens`.
    """
    if not processors:
        return logits
    rows = []
    for i in range(logits.shape[0]):
        tokens = history if i == 0 else mx.concatenate([history, next_tokens[:i]])
        row = logits[i : i + 1]
        for processor in processors:
            row = processor(tokens, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


def log_probs(logits: mx.array) -> mx.array:
    """In the logits' own dtype, as mlx-lm computes them (greedy ties resolve alike)."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def filtered_scores(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """Log-probabilities after top-p, min-p, top-k, divided by the temperature.

    `softmax` of the result is the distribution a sampled token follows.
    """
    logprobs = logprobs.astype(mx.float32)
    if params.top_p < 1:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p > 0:
        logprobs = apply_min_p(logprobs, params.min_p)
    if 0 < params.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, params.top_k)
    return logprobs * (1.0 / params.temp)


def fit_vocab(logits: mx.array, vocab_size: int) -> mx.array:
    """Cut or pad (with -inf) the last axis of draft logits to the main vocabulary.

    Embedding tables are often padded beyond the tokenizer (Qwen2.5: 151,936
    vs 152,064 rows); ids that only one model can emit get draft probability 0.
    """
    size = logits.shape[-1]
    if size == vocab_size:
        return logits
    if size > vocab_size:
        return logits[..., :vocab_size]
    pad = mx.full((*logits.shape[:-1], vocab_size - size), -float("inf"), logits.dtype)
    return mx.concatenate([logits, pad], axis=-1)
