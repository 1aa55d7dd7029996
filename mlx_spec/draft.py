"""Step 1 of a round: the draft model proposes k tokens without a host sync."""

import time
from collections.abc import Callable

import mlx.core as mx

from .cache import SLACK, CachePair
from .recurrent import advance, mark
from .sampling import SamplingParams, filtered_scores, fit_vocab, log_probs, process
from .verify import output_layer


class DraftModel:
    """The draft as `propose` uses it: last-position logits over the main model's vocabulary.

    With `shortlist` S, its output layer is cut to the first S token ids (BPE
    vocabularies put frequent tokens first): with 151,936 tokens the output
    layer is about half of a 0.5B draft's step. Tokens beyond get draft
    probability 0, so the output stays exactly the main model's; only the
    acceptance of those rare tokens is lost.
    """

    def __init__(self, model, vocab_size: int, shortlist: int | None = None):
        self.model, self.vocab_size = model, vocab_size
        self.head = None
        layer = output_layer(model) if shortlist else None
        if layer is not None and layer.weight.shape[0] > shortlist and getattr(layer, "bias", None) is None:
            self.head = layer
            self.shortlist = shortlist

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        """Logits (1, V) after `inputs` (L,)."""
        return self.last_logits(inputs[None], cache, [inputs.size - 1])[0]

    def last_logits(self, inputs: mx.array, cache: list, last: list[int]) -> list[mx.array]:
        """Logits (1, V) of each sequence b of `inputs` (B, L) at its row `last[b]` (a batch: see batch.py)."""
        if self.head is None:
            out = self.model(inputs, cache=cache)
            return [fit_vocab(out[b, i : i + 1], self.vocab_size) for b, i in enumerate(last)]
        out = self.model.model(inputs, cache=cache)
        hidden = mx.concatenate([out[b, i : i + 1] for b, i in enumerate(last)])
        logits = first_rows(self.head, hidden, self.shortlist)
        return [fit_vocab(logits[b : b + 1], self.vocab_size) for b in range(len(last))]


def first_rows(head, hidden: mx.array, shortlist: int) -> mx.array:
    """Logits of the first `shortlist` token ids only: `hidden` (n, D) through the output layer's first rows."""
    rows = slice(0, shortlist)
    if hasattr(head, "scales"):  # quantized weights
        return mx.quantized_matmul(
            hidden,
            head.weight[rows],
            head.scales[rows],
            head.biases[rows],
            transpose=True,
            group_size=head.group_size,
            bits=head.bits,
        )
    return hidden @ head.weight[rows].T


def propose(
    draft: DraftModel,
    draft_cache: list,
    pending_tokens: list[int],
    num_draft: int,
    params: SamplingParams,
    key: mx.array | None,
    history: mx.array | None = None,
    logits_processors=None,
    noise: mx.array | None = None,
) -> tuple[mx.array, mx.array | None]:
    """Feed `pending_tokens` (those not yet in the draft cache) and draft `num_draft` tokens.

    Returns draft_tokens (k,) int32 and, for rejection sampling, draft_probs
    (k, V) = q, the distributions the tokens were drawn from (else None); a
    `params.sampler` of unknown settings draws the tokens itself; with `noise` ((k, V) Gumbel noise of the
    positions drafted: coupled sampling, see sampling.CoupledDraws) token i is argmax(s^q_i + noise_i). Each
    token is scheduled with `mx.async_eval` as soon as it is built; nothing here waits for the device.
    """
    inputs = mx.array(pending_tokens, mx.int32)
    mark(draft_cache)  # recurrent layers keep their state from before the round: a rejection goes back to it
    tokens, probs = [], []
    keys = mx.random.split(key, max(num_draft, 1)) if key is not None else None
    for i in range(num_draft):
        logits = draft(inputs, draft_cache)
        advance(draft_cache, inputs.size)
        token = draw(logits, i, tokens, probs, params, keys, history, logits_processors, noise)
        mx.async_eval(token)  # start this step while the next one is built: no host sync
        inputs = token
    return drafted(tokens, probs, params, noise, draft.vocab_size)


def draw(logits, i: int, tokens: list, probs: list, params: SamplingParams, keys, history, processors, noise):
    """Draft token i from the draft's logits (1, V) at it, appended to `tokens` (and q to `probs` where rejection
    sampling needs it): as the main model's rule draws (greedy, coupled noise, the key's sample, the sampler)."""
    logits = process(logits, _extend(history, mx.concatenate(tokens) if tokens else None), None, processors)
    if params.exact_match:
        token = params.sampler(log_probs(logits)).reshape(-1).astype(mx.int32)
    elif params.greedy:
        token = mx.argmax(logits, axis=-1).astype(mx.int32)
    elif noise is not None:
        token = mx.argmax(filtered_scores(log_probs(logits), params) + noise[i], axis=-1).astype(mx.int32)
    else:
        scores = filtered_scores(log_probs(logits), params)
        token = mx.random.categorical(scores, key=keys[i]).astype(mx.int32)
        probs.append(mx.softmax(scores, axis=-1))
    tokens.append(token)
    return token


def drafted(tokens: list, probs: list, params: SamplingParams, noise, vocab_size: int):
    """(draft_tokens (k,), q (k, V) or None where no rule needs it) from the drawn tokens."""
    draft_tokens = mx.concatenate(tokens) if tokens else mx.zeros((0,), mx.int32)
    if params.greedy or params.exact_match or noise is not None:
        return draft_tokens, None
    return draft_tokens, mx.concatenate(probs) if probs else mx.zeros((0, vocab_size))


class DraftSource:
    """The draft model as a round's source of draft tokens (lookup.LookupSource is the other one).

    The draft cache falls behind while other sources serve rounds; `propose`
    first catches it up: a few tokens go in with the round's first draft step,
    more in chunks through `catch_up(tokens)` (which a rotating cache takes).
    """

    def __init__(
        self,
        draft: DraftModel,
        caches: CachePair,
        params: SamplingParams,
        catch_up: Callable[[list[int]], None],
        logits_processors=None,
    ):
        self.draft, self.caches, self.params = draft, caches, params
        self.catch_up, self.logits_processors = catch_up, logits_processors
        self.caught_up: tuple[int, float] | None = None

    def num_behind(self) -> int:
        """Tokens of the conversation the draft cache has not seen, the last one included."""
        return len(self.caches.tokens) - self.caches.draft_offset

    def propose(self, num_draft: int, key: mx.array | None, history: mx.array | None, noise: mx.array | None = None):
        """(draft_tokens (k,), q (k, V) or None when greedy or coupled): see `propose`.

        `caught_up` says afterwards what catching up in chunks took: (tokens, seconds), or None.
        """
        tokens, caches = self.caches.tokens, self.caches
        self.caught_up = None
        if self.num_behind() > SLACK + 1:  # after a long stretch of other rounds, or the prompt not yet in
            start, behind = time.perf_counter(), tokens[caches.draft_offset : -1]
            self.catch_up(behind)  # evaluated chunk by chunk: the time is the work's
            self.caught_up = (len(behind), time.perf_counter() - start)
        pending = tokens[caches.draft_offset :]
        return propose(
            self.draft, caches.draft, pending, num_draft, self.params, key, history, self.logits_processors, noise
        )


def _extend(history: mx.array | None, drafted: mx.array | None) -> mx.array | None:
    if history is None or drafted is None:
        return history
    return mx.concatenate([history, drafted])
