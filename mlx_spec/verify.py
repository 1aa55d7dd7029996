"""Step 2 of a round: the main model scores the last token and the k draft tokens in one forward."""

import mlx.core as mx

from .sampling import SamplingParams, filtered_scores, log_probs, process


def score(
    main_model,
    main_cache: list,
    last_token: mx.array,
    draft_tokens: mx.array,
    params: SamplingParams,
    history: mx.array | None = None,
    logits_processors=None,
) -> tuple[mx.array, mx.array | None]:
    """One main forward over [last, d_1..d_k]: k+1 positions (`last_token`: (1,) int32, or the prompt's
    last few tokens, of which only the last is scored).

    Returns (logprobs, main_probs): the main model's log-probabilities after
    logits processors, (k+1, V), in the model's dtype as plain decoding computes
    them; and, for rejection sampling, p, the distributions to sample from (else None).
    """
    inputs = mx.concatenate([last_token, draft_tokens])
    logits = main_model(inputs[None], cache=main_cache)[0, -(draft_tokens.size + 1) :]
    logits = process(logits, history, draft_tokens, logits_processors)
    logprobs = log_probs(logits)
    if params.greedy or params.exact_match:
        return logprobs, None
    return logprobs, mx.softmax(filtered_scores(logprobs, params), axis=-1)
