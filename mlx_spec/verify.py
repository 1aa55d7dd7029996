"""Step 2 of a round: the main model scores the last token and the k draft tokens in one forward."""

from collections.abc import Callable

import mlx.core as mx

from .cache import pair_offset
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


def body_and_head(model, layer_only: bool = False):
    """(body, head): `body(inputs, cache)` gives the main model's last hidden states (after its final norm),
    `head(hidden)` their logits, for HEADED_TYPES and the models that carry MTP layers (Qwen3.5 / Qwen3-Next,
    whose multimodal wrapper holds a `language_model`, and DeepSeek-V3); None for other models. With
    `layer_only`, head is the output layer itself (an `lm_head`, or the tied embedding)."""
    text = getattr(model, "language_model", model)
    kind = type(text).__module__.rsplit(".", 1)[-1]
    if getattr(text, "sharding_group", None) is not None or not hasattr(text, "model"):
        return None
    if kind in ("qwen3_5", "qwen3_next", "deepseek_v3"):
        layer = getattr(text, "lm_head", None)
        layer = text.model.embed_tokens if layer is None else layer
    else:
        layer = output_layer(text)
    if layer is None:
        return None
    if layer_only:
        return text.model, layer
    return text.model, layer.as_linear if hasattr(layer, "as_linear") else layer


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
    keep_hidden: Callable[[int, mx.array], object] | None = None,
    logits: mx.array | None = None,
) -> tuple[mx.array, mx.array | None]:
    """One main forward over [last, d_1..d_k]: k+1 positions (`last_token`: (1,) int32, or the tokens not yet
    in the cache, of which only the last is scored).

    Returns (logprobs, main_probs): the main model's log-probabilities after
    logits processors, (k+1, V), in the model's dtype as plain decoding computes
    them; and, for rejection sampling, p, the distributions to sample from (else None). With `keep_hidden`
    (an MTP source's), the main model's last hidden states of every position read, (L, D), go to
    `keep_hidden(position of the first, hidden)` (see `body_and_head`); no other work is added. `logits`
    (k+1, V), where given, are those positions' logits from a forward already run (a batched round's, see
    batch.py, which gathers no request that keeps hidden states).
    """
    if logits is None:
        inputs = mx.concatenate([last_token, draft_tokens])
        mark(main_cache)  # recurrent layers keep their state from before the pass: a rejection goes back to it
        rows = draft_tokens.size + 1
        if keep_hidden is None:
            logits = last_logits(main_model, inputs[None], main_cache, rows)[0]
        else:
            body, head = body_and_head(main_model)
            start = pair_offset(main_cache)
            hidden = body(inputs[None], cache=main_cache)[0]
            keep_hidden(start, hidden)
            logits = head(hidden[-rows:])
        advance(main_cache, inputs.size)
    logits = process(logits, history, draft_tokens, logits_processors)
    logprobs = log_probs(logits)
    if params.greedy or params.exact_match:
        return logprobs, None
    return logprobs, mx.softmax(filtered_scores(logprobs, params), axis=-1)
