"""Step 2 of a round: the main model scores the last token and the k draft tokens in one forward."""

import mlx.core as mx

from .recurrent import advance, mark
from .sampling import SamplingParams, filtered_scores, log_probs, process

# Model types whose logits are exactly an output layer over `model.model(inputs)` (mlx-lm's Model.__call__).
HEADED_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")


def output_layer(model):
    """The layer that maps `model.model`'s output to `model`'s logits (`lm_head`, or the embedding where they
    are tied), for HEADED_TYPES; else None."""
    if type(model).__module__.rsplit(".", 1)[-1] not in HEADED_TYPES or not hasattr(model, "model"):
        return None
    layer = getattr(model, "lm_head", None)
    return model.model.embed_tokens if layer is None else layer


def last_logits(model, inputs: mx.array, cache: list, rows: int) -> mx.array:
    """Logits (1, rows, V) at the last `rows` positions of a forward over `inputs` (1, L). Where the output
    layer can be cut from the model (`output_layer`), it runs over those rows only: a prompt's last step
    read with the first round then costs what reading it costs, not an output layer at each of its rows."""
    layer = output_layer(model) if rows < inputs.shape[1] else None
    if layer is None:
        return model(inputs, cache=cache)[:, -rows:]
    hidden = model.model(inputs, cache=cache)[:, -rows:]
    return layer.as_linear(hidden) if hasattr(layer, "as_linear") else layer(hidden)


def score(
    main_model,
    main_cache: list,
    last_token: mx.array,
    draft_tokens: mx.array,
    params: SamplingParams,
    history: mx.array | None = None,
    logits_processors=None,
    logits: mx.array | None = None,
) -> tuple[mx.array, mx.array | None]:
    """One main forward over [last, d_1..d_k]: k+1 positions (`last_token`: (1,) int32, or the tokens not yet
    in the cache, of which only the last is scored).

    Returns (logprobs, main_probs): the main model's log-probabilities after
    logits processors, (k+1, V), in the model's dtype as plain decoding computes
    them; and, for rejection sampling, p, the distributions to sample from (else None). `logits` (k+1, V), where
    given, are those positions' logits from a forward already run (a batched round's, see batch.py).
    """
    if logits is None:
        inputs = mx.concatenate([last_token, draft_tokens])
        mark(main_cache)  # recurrent layers keep their state from before the pass: a rejection goes back to it
        logits = last_logits(main_model, inputs[None], main_cache, draft_tokens.size + 1)[0]
        advance(main_cache, inputs.size)
    logits = process(logits, history, draft_tokens, logits_processors)
    logprobs = log_probs(logits)
    if params.greedy or params.exact_match:
        return logprobs, None
    return logprobs, mx.softmax(filtered_scores(logprobs, params), axis=-1)
