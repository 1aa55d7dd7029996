"""Batched rounds: the rounds of several requests verified in one main forward (the server's continuous batching).

Each request keeps its own `decode.Decoding` (caches, sources, policy, sampling, seed, logits processors) and
runs its rounds with the pieces of `decode.rounds`: it finds its match and proposes alone (`situation`,
`propose`); the main model then reads every request's pending tokens and drafts in ONE forward, B sequences
right-padded to the longest; each request accepts from its own rows (`verify` with those logits); all
verdicts come back in one host read; each settles alone (`settle`: learns, extends, rolls back). So a request's
tokens are those it would get alone: greedy the same argmax, sampled the same draws (coupled sampling keys its
noise by seed and position, rejection sampling by the request's own key), up to the float rounding of a
batched matmul.

The batch is gathered each round from the requests' own KV caches (`GatheredCache`): per layer, each
request's new keys and values go into its own cache, which is then left-padded to the longest and stacked.
Positions stay each request's (a RoPE offset per sequence), padding is masked, and rollback, prompt caches,
joining and leaving are those of a request alone. The price is a copy of the batch's cached keys and values
per round, small beside the weights a forward reads at these sizes (a cache with per-sequence holes would
avoid it, at the cost of masks that grow with the rejected rows). Only standard `KVCache`s of the models in
GATHERED_TYPES are gathered; other requests (rotating, quantized or recurrent caches, an MTP layer) forward alone in
the same round. The draft model drafts for the gathered requests together: each draft step is one forward over
them, gathered from their draft caches (`propose_together`); each token is drawn by its request's own rule.

Draft length under load: a forward over R rows costs about T(R) = t0 * (1 + s * R), the row share s learnt
from the rounds (`RowCost`). The gathered requests share one length L = 1 + drafts (each is padded to it
anyway), the L that maximises the batch's expected tokens per second (`plan_rows`), each request's expected
tokens from its own learnt acceptance, copying or drafting (a draft step costs its policy's cost ratio). Where
rows are nearly free (an Apple GPU at small batches) s is near 0 and drafts stay long; where the forward is
compute-bound (this CPU) s * B grows with the batch and L falls to 1: speculation never costs throughput, at
worst a round is a batched plain step.
"""

import itertools
import time
from typing import NamedTuple

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .adaptive import DRAFT, LOOKUP, PLAIN, Choice, Controller, bucket_of
from .cache import SLACK
from .decode import Decoding, Proposal, Round, Verdict, bounded, propose, rounds, settle, situation, verify
from .draft import drafted, draw
from .recurrent import leaves
from .verify import output_layer

# Model types whose attention reads `cache.offset` for RoPE, calls `update_and_fetch` and takes its mask from
# `cache.make_mask` (mlx-lm's create_attention_mask): a gathered batch of their caches is exact.
GATHERED_TYPES = ("llama", "qwen2", "qwen3", "mistral")
PRIOR_ROW_SHARE = 0.1  # t1 / t0 before the batch has measured it: a row costs a tenth of a forward's fixed part
PRIOR_WEIGHT = 2.0  # rounds' worth of weight the prior keeps
DECAY = 0.95  # weight of earlier rounds in the cost fit, per round
PRIOR_ACCEPTANCE = 0.5  # per-position acceptance of a FixedDraft policy's drafts, which learns none
DRAFT_RATIO = 0.3  # a draft step's cost over a main step's, where the policy does not say


class GatheredCache:
    """One layer's caches of B requests as one left-padded batch, for one forward of `num_rows` rows each.

    `offset` (B,) gives each sequence its own RoPE positions; `update_and_fetch` writes each sequence's new
    keys and values into its own cache and returns them all, left-padded to the longest; `make_mask` hides the
    padding and keeps each query causal.
    """

    def __init__(self, layers: list[KVCache]):
        self.layers = layers
        self.offsets = [c.offset for c in layers]
        self.offset = mx.array(self.offsets)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        fetched = [c.update_and_fetch(keys[i : i + 1], values[i : i + 1]) for i, c in enumerate(self.layers)]
        length = max(k.shape[2] for k, _ in fetched)

        def padded(x: mx.array) -> mx.array:
            pad = length - x.shape[2]
            return x if pad == 0 else mx.pad(x, [(0, 0), (0, 0), (pad, 0), (0, 0)])

        return (
            mx.concatenate([padded(k) for k, _ in fetched]),
            mx.concatenate([padded(v) for _, v in fetched]),
        )

    def make_mask(self, num_rows: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        """(B, 1, rows, slots) bool: query i of sequence b sees slot s if s is no padding and s <= its position."""
        assert window_size is None, "a windowed layer keeps a rotating cache, which is never gathered"
        length = max(self.offsets) + num_rows
        slots = mx.arange(length)
        causal = slots[None] <= (length - num_rows + mx.arange(num_rows))[:, None]  # (rows, slots)
        left_padding = length - num_rows - self.offset  # (B,)
        return causal[None, None] & (slots[None, None, None] >= left_padding[:, None, None, None])


def gatherable(model, layers: list) -> bool:
    """Whether a model's caches can join a gathered forward: standard KVCaches of a GATHERED_TYPES model."""
    kind = type(model).__module__.rsplit(".", 1)[-1]
    return kind in GATHERED_TYPES and all(type(c) is KVCache for c in leaves(layers))


def drafts_together(d: Decoding, first: Decoding | None) -> bool:
    """Whether a request's draft model can draft in a gathered batch (standard KVCaches of a GATHERED_TYPES
    model, the same DraftModel settings as `first`'s, the first drafting request's)."""
    source = d.sources.get(DRAFT)
    if source is None or not gatherable(source.draft.model, d.caches.draft or [None]):
        return False
    mine = source.draft
    other = mine if first is None else first.sources[DRAFT].draft
    return other.model is mine.model and getattr(other, "shortlist", None) == getattr(mine, "shortlist", None)


def batched_logits(model, inputs: list[mx.array], layers: list[list[KVCache]], scored: list[int]) -> list[mx.array]:
    """One forward over B sequences: `inputs[b]` (L_b,) int32 into request b's caches `layers[b]`, right-padded
    to the longest (the padding is written into b's caches too: the caller rolls it back).

    Returns each sequence's logits (scored[b], V) at its last `scored[b]` positions; where the model's output layer
    can be cut from it (verify.output_layer), it runs over those rows only (a prompt's rest needs one).
    """
    length = max(x.size for x in inputs)
    tokens = mx.stack([mx.pad(x, [(0, length - x.size)]) for x in inputs])
    gathered = [GatheredCache([request[i] for request in layers]) for i in range(len(layers[0]))]
    spans = [(x.size - n, x.size) for x, n in zip(inputs, scored)]
    layer = output_layer(model) if any(n < length for n in scored) else None
    if layer is None:
        out = model(tokens, cache=gathered)
        return [out[b, start:end] for b, (start, end) in enumerate(spans)]
    hidden = model.model(tokens, cache=gathered)
    rows = mx.concatenate([hidden[b, start:end] for b, (start, end) in enumerate(spans)])
    logits = layer.as_linear(rows) if hasattr(layer, "as_linear") else layer(rows)
    offsets = [0, *itertools.accumulate(scored)]
    return [logits[offsets[b] : offsets[b + 1]] for b in range(len(inputs))]


class RowCost:
    """T(R) = t0 + t1 * R: the seconds of a batched round over R rows, a decayed least-squares fit of the rounds
    measured, leaning on t1 = PRIOR_ROW_SHARE * t0 until rounds of different sizes tell them apart."""

    def __init__(self):
        self.sums = [0.0] * 5  # decayed sums of 1, R, R^2, T, R*T

    def record(self, rows: int, seconds: float):
        self.sums = [s * DECAY + x for s, x in zip(self.sums, (1.0, rows, rows * rows, seconds, rows * seconds))]

    def row_share(self) -> float:
        """t1 / t0, the prior's where the rounds say little."""
        w, x, xx, y, xy = self.sums
        if w == 0:
            return PRIOR_ROW_SHARE
        mean_x, mean_y = x / w, y / w
        var_x, cov = xx / w - mean_x**2, xy / w - mean_x * mean_y
        # The prior as PRIOR_WEIGHT rounds' worth of slope at the measured level: t1 = share * t0.
        prior_t1 = PRIOR_ROW_SHARE * mean_y / (1 + PRIOR_ROW_SHARE * mean_x)
        t1 = max((cov * w + PRIOR_WEIGHT * prior_t1) / (var_x * w + PRIOR_WEIGHT), 0.0)
        t0 = max(mean_y - t1 * mean_x, 1e-9)
        return t1 / t0


def plan_rows(
    lookup: list[list[float]], draft: list[list[float] | None], row_share: float, draft_ratio: float = 0.0
) -> tuple[int, list[bool]]:
    """(L, drafts): the rows per sequence of a gathered forward (1 + the drafts each may verify) and which
    sequences draft with the draft model, maximising the round's expected tokens per second.

    `lookup[b][k]`, `draft[b][k]`: tokens sequence b emits with k drafts copied, drafted (None: no draft model);
    each sequence takes the better at L - 1 drafts (every sequence is padded to L rows, so a shorter draft saves
    nothing). In units of a forward's fixed cost t0, a forward over R rows costs 1 + row_share * R and the
    L - 1 draft steps over the D drafting sequences (L - 1) * draft_ratio * (1 + row_share * D).
    """
    batch_size = len(lookup)

    def at(expected: list[float], rows: int) -> float:
        return expected[min(rows - 1, len(expected) - 1)]

    def plan(rows: int) -> tuple[float, list[bool]]:
        """The best drafting set at `rows`: the n sequences that gain most from drafting, for the best n."""
        gains = [at(d, rows) - at(c, rows) if d is not None and rows > 1 else 0.0 for c, d in zip(lookup, draft)]
        order = sorted((b for b in range(batch_size) if gains[b] > 0), key=lambda b: -gains[b])
        best = None
        for n in range(len(order) + 1):
            tokens = sum(at(c, rows) for c in lookup) + sum(gains[b] for b in order[:n])
            cost = 1 + row_share * batch_size * rows + (n > 0) * (rows - 1) * draft_ratio * (1 + row_share * n)
            if best is None or tokens / cost > best[0]:
                best = (tokens / cost, {*order[:n]})
        return best[0], [b in best[1] for b in range(batch_size)]

    longest = max(len(e) for e in [*lookup, *(d for d in draft if d is not None)])
    rows = max(range(1, longest + 1), key=lambda r: (plan(r)[0], -r))
    return rows, plan(rows)[1]


def propose_together(requests: list["Request"], plans: list[tuple], no_draft: mx.array) -> list[tuple]:
    """The draft model's proposals for several requests at once: each draft step one forward over them all
    (gathered from their draft caches), each token drawn by its request's rule (draft.draw). `plans[b]`:
    (situation, choice) of request b. Returns each one's (draft_tokens, q or None) and its round's draws."""
    sources = [r.d.sources[DRAFT] for r in requests]
    pending, drawn, out = [], [], []
    for request, source, (_, choice) in zip(requests, sources, plans):
        d, tokens = request.d, request.d.caches.tokens
        draft_key, accept_key, noise = d.draws.take(len(tokens), choice.num_draft + 1)
        source.caught_up = None
        if source.num_behind() > SLACK + 1:  # far behind (plain and copied rounds): catch up in chunks first
            started, behind = time.perf_counter(), tokens[d.caches.draft_offset : -1]
            source.catch_up(behind)
            source.caught_up = (len(behind), time.perf_counter() - started)
        pending.append(mx.array(tokens[d.caches.draft_offset :], mx.int32))
        keys = mx.random.split(draft_key, max(choice.num_draft, 1)) if draft_key is not None else None
        drawn.append(([], [], keys, noise, accept_key))
    draft = sources[0].draft
    for step in range(max(choice.num_draft for _, choice in plans)):
        batch = [b for b, (_, choice) in enumerate(plans) if choice.num_draft > step]
        inputs = [pending[b] for b in batch]
        length = max(x.size for x in inputs)
        tokens = mx.stack([mx.pad(x, [(0, length - x.size)]) for x in inputs])
        layers = [requests[b].d.caches.draft for b in batch]
        gathered = [GatheredCache([caches[i] for caches in layers]) for i in range(len(layers[0]))]
        rows = draft.last_logits(tokens, gathered, [x.size - 1 for x in inputs])
        for b, x, logits in zip(batch, inputs, rows):
            for cache in requests[b].d.caches.draft:
                cache.trim(length - x.size)  # the padding: the next step writes right after this one's tokens
            here, d = plans[b][0], requests[b].d
            tokens_b, probs_b, keys, noise, _ = drawn[b]
            pending[b] = draw(logits, step, tokens_b, probs_b, d.params, keys, here.history, d.logits_processors, noise)
        mx.async_eval([pending[b] for b in batch])
    for request, (tokens_b, probs_b, _, noise, accept_key) in zip(requests, drawn):
        draft_tokens, draft_probs = drafted(tokens_b, probs_b, request.d.params, noise, draft.vocab_size)
        out.append((draft_tokens, draft_probs, accept_key, noise))
    return out


def controller(d: Decoding):
    """The request's round policy (sharded: the one its Lockstep feeds rank 0's clock)."""
    return d.policy if d.lockstep is None else d.lockstep.policy


class Stats(NamedTuple):
    """What the batch has done: rounds run and the requests they served."""

    num_rounds: int
    num_request_rounds: int  # sum over rounds of the requests in it

    @property
    def mean_batch_size(self) -> float:
        return self.num_request_rounds / self.num_rounds if self.num_rounds else 0.0


class Request:
    """One request's rounds, as the batch runs them: its Decoding and how far it is."""

    def __init__(self, d: Decoding, max_tokens: int, plain_first: bool):
        self.d, self.max_tokens, self.plain_first = d, max_tokens, plain_first
        self.num_emitted = 0
        self.alone = None  # decode.rounds, while the request is the only one: the round loop of one call

    @property
    def left(self) -> int:
        return self.max_tokens - self.num_emitted

    def leave_alone(self):
        """Stop the loop of one call; a plain step it queued is rolled back."""
        if self.alone is not None:
            self.alone.close()
            self.alone = None
            self.d.caches.rollback()


class Batch:
    """Runs one round of every request at once; `step(requests)` -> each request's Round."""

    def __init__(self, model, group=None):
        self.model, self.group = model, group  # group: the ranks a sharded main model runs on
        self.cost = RowCost()
        self.measured: tuple[int, float] | None = None  # sharded: (rows, seconds here) of a round not learnt yet
        self.no_draft = None  # an empty draft, made on the engine's thread
        self.stats = Stats(0, 0)

    def step(self, requests: list[Request]) -> list[Round]:
        self.stats = Stats(self.stats.num_rounds + 1, self.stats.num_request_rounds + len(requests))
        if self.no_draft is None:
            self.no_draft = mx.zeros((0,), mx.int32)
        if len(requests) == 1:  # alone: the loop of one call, which queues plain steps ahead
            request = requests[0]
            if request.alone is None:
                request.alone = rounds(request.d, request.left, request.plain_first)
                request.plain_first = False
            round_ = next(request.alone)
            request.num_emitted += len(round_.tokens)
            return [round_]
        for request in requests:
            request.leave_alone()
        return self._together(requests)

    def _expected(self, request: Request, here) -> tuple[int, list[float], list[float] | None]:
        """(bucket, copied, drafted): the tokens a round of the request emits with k = 0.. drafts copied from the
        conversation ([1.0]: no match), and drafted by the draft model (None: it has none)."""
        d, found, policy = request.d, here.found, controller(request.d)
        if request.plain_first:
            return 0, [1.0], None
        has_draft = DRAFT in d.sources
        if isinstance(policy, Controller):
            drafted = policy.learnt.draft.expected_tokens(policy.max_draft) if has_draft and policy.max_draft else None
            if found is None or policy.max_lookup == 0:
                return 0, [1.0], drafted
            bucket = bucket_of(found)
            return bucket, policy.learnt.main.lookup[bucket].expected_tokens(policy.max_lookup), drafted
        choice = policy.choose(found, here.behind, here.left)  # a fixed length: at most that, at a prior rate
        prior = [sum(PRIOR_ACCEPTANCE**i for i in range(k + 1)) for k in range(choice.num_draft + 1)]
        if choice.source == LOOKUP:
            return choice.bucket, prior, None
        return 0, [1.0], prior if choice.source == DRAFT else None

    def _together(self, requests: list[Request]) -> list[Round]:
        start = time.perf_counter()
        # 1) choose: one length L for the gathered requests (a request whose pending tokens are more than the last,
        # a prompt's rest, forwards alone); each copies or drafts up to L - 1 tokens, whichever it expects more of
        heres = [situation(r.d, r.left) for r in requests]
        gathered = [
            i
            for i, r in enumerate(requests)
            if gatherable(self.model, r.d.caches.main)
            and len(r.d.caches.tokens) - r.d.caches.main_offset == 1
            and r.d.keep_hidden is None  # an MTP layer reads its request's hidden states: that forward is alone
        ]
        if len(gathered) < 2:
            gathered = []
        options = [self._expected(r, here) for r, here in zip(requests, heres)]
        first = next((requests[i].d for i in gathered if drafts_together(requests[i].d, None)), None)
        can_draft = {i for i in gathered if first is not None and drafts_together(requests[i].d, first)}
        rows, drafts = 1, []
        self.draft_ratio = getattr(controller(first), "cost_ratio", DRAFT_RATIO) if first is not None else 0.0
        if gathered:
            rows, drafts = plan_rows(
                [options[i][1] for i in gathered],
                [options[i][2] if i in can_draft else None for i in gathered],
                self.cost.row_share(),
                self.draft_ratio,
            )
        drafting = {i for i, use in zip(gathered, drafts) if use}
        choices = []
        for i, (request, here) in enumerate(zip(requests, heres)):
            bucket, copied, drafted_ = options[i]
            if i in drafting:
                choice = Choice(DRAFT, rows - 1)
            else:
                num_draft = min(rows - 1, len(copied) - 1) if i in gathered else self._alone(copied)
                choice = Choice(LOOKUP, num_draft, bucket) if num_draft > 0 else Choice(PLAIN, 0)
            choices.append(bounded(request.d, choice, here.left))
        # 2) propose: copies each request alone, the draft model's steps over the drafting requests at once
        proposals = {}
        together = [i for i in drafting if choices[i].source == DRAFT]
        if together:
            plans = [(heres[i], choices[i]) for i in together]
            for i, (draft_tokens, draft_probs, accept_key, noise) in zip(
                together, propose_together([requests[i] for i in together], plans, self.no_draft)
            ):
                pending = mx.array(requests[i].d.caches.tokens[requests[i].d.caches.main_offset :])
                proposals[i] = Proposal(pending, draft_tokens, draft_probs, accept_key, noise)
        for i, request in enumerate(requests):
            if i not in proposals:
                proposals[i] = propose(request.d, choices[i], heres[i].history, self.no_draft)
        # 3) one main forward over the gathered requests, one over those reading a prompt's rest; the others alone
        reading = [
            i
            for i, r in enumerate(requests)
            if gatherable(self.model, r.d.caches.main) and len(r.d.caches.tokens) - r.d.caches.main_offset > 1
        ]
        logits, padded, length = {}, set(), 0
        for group in (gathered, reading if len(reading) > 1 else []):
            if not group:
                continue
            inputs = [mx.concatenate([proposals[i].pending, proposals[i].draft_tokens]) for i in group]
            scored = [choices[i].num_draft + 1 for i in group]
            out = batched_logits(self.model, inputs, [requests[i].d.caches.main for i in group], scored)
            length = max(x.size for x in inputs)
            logits.update(zip(group, out))
            padded.update(i for i, x in zip(group, inputs) if x.size < length)
        verified = []
        for i, request in enumerate(requests):
            proposal = proposals[i]
            verified.append(verify(request.d, *proposal[:3], heres[i].history, *proposal[3:], logits=logits.get(i)))
        # 4) one host read for all
        readout, shared = mx.concatenate([v.readout for v in verified]), None
        if self.group is not None and self.measured is not None:  # the read brings rank 0's seconds of the last
            shared = mx.distributed.all_sum(mx.array(self.measured[1] * (self.group.rank() == 0)), group=self.group)
            readout = mx.depends(readout, shared)
        values = requests[0].d.host(readout)
        if shared is not None:  # evaluated with the read: every rank learns rank 0's seconds
            self.cost.record(self.measured[0], shared.item())
            self.measured = None
        for request, v in zip(requests, verified):
            if request.d.lockstep is not None:  # sharded: the read brought rank 0's seconds of an earlier round
                request.d.lockstep.settle(v.readout)
        # 5) each request settles alone: learns (untimed: the time is the batch's), extends, rolls back
        out_rounds, at = [], 0
        for i, (request, here, choice, v) in enumerate(zip(requests, heres, choices, verified)):
            size = choice.num_draft + 2
            verdict = Verdict(values[at : at + size - 2], values[at + size - 2], values[at + size - 1])
            at += size
            padded_ = i in padded
            new_tokens = settle(request.d, here, choice, verdict, not request.plain_first, timed=False, padded=padded_)
            request.plain_first = False
            request.num_emitted += len(new_tokens)
            out_rounds.append(Round(new_tokens, choice.source, choice.num_draft, verdict.num_accepted, v.logprobs))
        if len(gathered) == len(requests):  # the main forward's share of the round's time, as its costs are priced
            seconds, share, main_rows = time.perf_counter() - start, self.cost.row_share(), len(requests) * length
            if drafting:
                main = 1 + share * main_rows
                seconds *= main / (main + (rows - 1) * self.draft_ratio * (1 + share * len(drafting)))
            if self.group is None:
                self.cost.record(main_rows, seconds)
            else:  # sharded: every rank learns rank 0's seconds of it, with the next batched round's read
                self.measured = (main_rows, seconds)
        return out_rounds

    def _alone(self, copied: list[float]) -> int:
        """The copies of a request that forwards alone in a batched round: as one sequence at the batch's costs."""
        return plan_rows([copied], [None], self.cost.row_share())[0] - 1
