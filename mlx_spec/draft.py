"""Step 1 of a round: the draft model proposes k tokens, lazily (no host sync)."""

from typing import List, Optional, Tuple

import mlx.core as mx

from .sampling import SamplingParams, filtered_scores, fit_vocab, log_probs, process


def propose(
    draft_model,
    draft_cache: List,
    pending_tokens: List[int],
    num_draft: int,
    vocab_size: int,
    params: SamplingParams,
    key: Optional[mx.array],
    history: Optional[mx.array] = None,
    logits_processors=None,
) -> Tuple[mx.array, Optional[mx.array]]:
    """Feed `pending_tokens` (those not yet in the draft cache) and draft `num_draft` tokens.

    Returns draft_tokens (k,) int32 and, when sampling, draft_probs (k, V) = q,
    the distributions the tokens were drawn from. All lazy.
    """
    inputs = mx.array(pending_tokens, mx.int32)
    tokens, probs = [], []
    keys = mx.random.split(key, max(num_draft, 1)) if key is not None else None
    for i in range(num_draft):
        logits = fit_vocab(draft_model(inputs[None], cache=draft_cache)[0, -1:], vocab_size)
        drafted = mx.concatenate(tokens) if tokens else None
        logits = process(logits, _extend(history, drafted), None, logits_processors)
        if params.greedy:
            token = mx.argmax(logits, axis=-1).astype(mx.int32)
        else:
            scores = filtered_scores(log_probs(logits), params)
            token = mx.random.categorical(scores, key=keys[i]).astype(mx.int32)
            probs.append(mx.softmax(scores, axis=-1))
        tokens.append(token)
        inputs = token
    draft_tokens = mx.concatenate(tokens) if tokens else mx.zeros((0,), mx.int32)
    if params.greedy:
        return draft_tokens, None
    draft_probs = mx.concatenate(probs) if probs else mx.zeros((0, vocab_size))
    return draft_tokens, draft_probs


def _extend(history: Optional[mx.array], drafted: Optional[mx.array]) -> Optional[mx.array]:
    if history is None or drafted is None:
        return history
    return mx.concatenate([history, drafted])
