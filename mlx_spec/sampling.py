"""Logits -> log-probabilities and sampling probabilities, shared by draft and verify.

The same transform (logits processors, then top-p, min-p, top-k on the
log-probabilities, then temperature) shapes p (main) and q (draft), exactly as
mlx-lm's sampler shapes the distribution that plain decoding samples from.
"""

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

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
        return self.temp == 0


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
