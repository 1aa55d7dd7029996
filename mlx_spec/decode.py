"""The round loop: propose, verify, accept in one lazy graph; one host sync; rollback; yield.

Each round the policy picks a source of draft tokens (the conversation, the
draft model, the main model's MTP layer, or none) and a length; the sources share one interface,
`propose(num_draft, key, history, noise) -> (draft_tokens, q)`. A plain round (no
source, or none chosen) queues the next step before its own token is read, as
mlx-lm's generate_step does, while the policy keeps to plain decoding: with no
source at all, every step. Prefill of the prompt also lives here, since it
fills the same pair of caches.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import mlx.core as mx

from .accept import accept, accept_coupled, accept_exact, accept_greedy
from .adaptive import DRAFT, LOOKUP, PLAIN, Choice
from .cache import SLACK, CachePair, SlackRotatingCache, pair_offset
from .lookup import MAX_MATCH, Match
from .options import PREFILL_STEP_SIZE
from .recurrent import MAX_PENDING, advance
from .sampling import NoDraws, SamplingParams, filtered_scores
from .verify import body_and_head, score

FIXED_MIN_MATCH = 3  # a fixed draft length copies from the conversation when its last 3 tokens occurred before


class Round(NamedTuple):
    """What one round produced: `tokens` = accepted draft tokens + one main token."""

    tokens: list[int]
    source: str  # PLAIN, DRAFT, LOOKUP or MTP: where the draft tokens came from
    num_draft: int
    num_accepted: int
    logprobs: mx.array  # (k+1, V): the main model's log-probabilities at each verified position


class Verified(NamedTuple):
    """A round's lazy result: what the host reads (`readout`), and what stays on the device."""

    logprobs: mx.array  # (k+1, V)
    next_token: mx.array  # () int32: the main model's token after the accepted drafts
    readout: mx.array  # (k+2,) int32: [draft tokens, num_accepted, next_token]


class Verdict(NamedTuple):
    """What the host reads of a round: the draft tokens, how many were accepted, the main model's next token."""

    draft_tokens: list[int]
    num_accepted: int
    next_token: int

    @classmethod
    def read(cls, host: "HostReads", verified: Verified) -> "Verdict":
        values = host(verified.readout)
        return cls(values[:-2], values[-2], values[-1])

    @property
    def new_tokens(self) -> list[int]:
        """The accepted draft tokens and the main model's own."""
        return self.draft_tokens[: self.num_accepted] + [self.next_token]


class FixedDraft:
    """A fixed draft length k: copied from the conversation where it has a match, else drafted (by the draft
    model, or by the MTP layer with `drafter=adaptive.MTP`)."""

    def __init__(self, num_draft: int, has_draft: bool = True, drafter: str = DRAFT):
        self.num_draft, self.has_draft, self.drafter = num_draft, has_draft, drafter

    def choose(self, match: Match | None = None, behind: int = 1, left: int | None = None) -> Choice:
        if match is not None and match.length >= min(FIXED_MIN_MATCH, MAX_MATCH):
            return Choice(LOOKUP, self.num_draft)
        return Choice(self.drafter, self.num_draft) if self.has_draft and self.num_draft > 0 else Choice(PLAIN, 0)

    def keeps_plain(self, match: Match | None = None, behind: int = 1, left: int | None = None) -> bool:
        return self.choose(match).source == PLAIN

    def record(self, choice: Choice, num_accepted: int, seconds: float | None, catch_up=None, unused=None):
        pass


class HostReads:
    """Reads arrays to the host; counts each read, since each one waits for the device."""

    def __init__(self):
        self.count = 0

    def __call__(self, array: mx.array) -> list:
        self.count += 1
        return array.tolist()


def prefill(
    model,
    layers: list,
    tokens: list[int],
    caches: CachePair,
    kv_quantize: Callable,
    chunk: int = PREFILL_STEP_SIZE,
    progress: Callable[[int], None] | None = None,
    keep_hidden: Callable[[int, mx.array], list] | None = None,
):
    """Feed `tokens` through `model` into `layers`, `chunk` tokens at a time, evaluating each chunk.

    `progress`, if given, is called with the number of tokens fed after each chunk. With `keep_hidden` (an MTP
    source's), the model's last hidden states go to `keep_hidden(position, hidden)` instead of its output layer;
    the arrays it returns are evaluated with the chunk.
    """
    if any(isinstance(c, SlackRotatingCache) for c in layers):
        chunk = SLACK + 1  # a continued rotating cache takes few tokens at a time
    body = body_and_head(model)[0] if keep_hidden is not None else None
    for start in range(0, len(tokens), chunk):
        inputs = tokens[start : start + chunk]
        kept = []
        if body is None:
            model(mx.array(inputs, mx.int32)[None], cache=layers)
        else:
            position = pair_offset(layers)
            kept = keep_hidden(position, body(mx.array(inputs, mx.int32)[None], cache=layers)[0])
        advance(layers, len(inputs))
        kv_quantize(caches)
        mx.eval([c.state for c in layers], kept)
        if progress is not None:
            progress(min(start + chunk, len(tokens)))


def verify(d: "Decoding", last, draft_tokens, draft_probs, history, accept_key, noise, logits=None) -> Verified:
    """Score [last, d_1..d_k] with the main model and accept, lazily (see verify.score, accept): by the rule of
    `d.params`, and with `noise` (the positions' Gumbel noise of a seeded call) by coupled sampling. `logits`
    (k+1, V): those positions' logits where a batched forward computed them (batch.py)."""
    params = d.params
    logprobs, main_probs = score(
        d.model, d.caches.main, last, draft_tokens, params, history, d.logits_processors, d.keep_hidden, logits
    )
    if params.greedy:
        num_accepted, next_token = accept_greedy(draft_tokens, logprobs)
    elif noise is not None:
        num_accepted, next_token = accept_coupled(draft_tokens, filtered_scores(logprobs, params), noise)
    elif params.exact_match:  # a sampler of unknown settings: its own token at each position, as mlx-lm
        num_accepted, next_token = accept_exact(draft_tokens, params.sampler(logprobs).reshape(-1).astype(mx.int32))
    else:
        if draft_probs is None:  # no draft tokens: q is empty
            draft_probs = mx.zeros((0, main_probs.shape[-1]))
        num_accepted, next_token = accept(draft_tokens, draft_probs, main_probs, accept_key)
    readout = mx.concatenate([draft_tokens, num_accepted[None], next_token[None]])
    if d.lockstep is not None:  # sharded: the read also brings rank 0's seconds of an earlier round
        readout = d.lockstep.attach(readout)
    return Verified(logprobs, next_token, readout)


@dataclass
class Decoding:
    """What the rounds of one call work with; fixed for the call (the caches change as rounds go)."""

    model: Any  # the main model
    caches: CachePair  # both models' caches and the conversation's tokens
    sources: dict[str, Any]  # DRAFT, LOOKUP, MTP -> those available (DraftSource, ...; none: plain decoding)
    policy: Any  # chooses each round's source and length (adaptive.Controller or FixedDraft), learns from it
    params: SamplingParams  # how tokens are drawn and accepted
    draws: NoDraws  # the random numbers of each round (sampling.draws_for)
    max_draft: Callable[[int], int]  # the longest draft of a round starting at a main cache offset
    kv_quantize: Callable[[CachePair], None]  # quantizes the caches where mlx-lm would
    host: HostReads = field(default_factory=HostReads)  # reads the device, counting
    logits_processors: list | None = None
    history_start: int = 0  # where this call's prompt starts in caches.tokens: what logits processors see
    keep_hidden: Callable | None = None  # takes the main model's last hidden states of each pass (an MTP source)
    lockstep: Any = None  # a sharded main model: distributed.Lockstep, also the policy (else None)


class Situation(NamedTuple):
    """What a round starts from, before its choice: the conversation's match, the draft's lag, the tokens left."""

    found: Match | None  # where the conversation repeats itself (prompt lookup), if it does
    behind: int  # tokens the draft cache has not seen (1 without a draft model)
    left: int  # tokens still to emit
    history: mx.array | None  # what logits processors see (None without them)
    start: float  # when the round began (perf_counter)


class Proposal(NamedTuple):
    """A round's inputs, lazily built: the main model's pending tokens, the draft tokens and the draws."""

    pending: mx.array  # (n,) the tokens not yet in the main cache (the last one, or more)
    draft_tokens: mx.array  # (k,)
    draft_probs: mx.array | None  # (k, V) q, where a rule needs it
    accept_key: mx.array | None
    noise: mx.array | None


def situation(d: Decoding, left: int) -> Situation:
    """Step 0 of a round: index the conversation's new tokens and find its match; the draft's lag."""
    start, lookup, draft = time.perf_counter(), d.sources.get(LOOKUP), d.sources.get(DRAFT)
    found = lookup.match() if lookup is not None else None
    behind = draft.num_behind() if draft is not None else 1
    history = mx.array(d.caches.tokens[d.history_start :], mx.int32) if d.logits_processors else None
    return Situation(found, behind, left, history, start)


def propose(d: Decoding, choice: Choice, history: mx.array | None, no_draft: mx.array) -> Proposal:
    """Step 2 of a round: the chosen source's draft tokens and the round's draws (lazy, no host sync)."""
    tokens = d.caches.tokens
    draft_key, accept_key, noise = d.draws.take(len(tokens), choice.num_draft + 1)
    draft_tokens, draft_probs = no_draft, None
    if choice.source != PLAIN:
        draft_tokens, draft_probs = d.sources[choice.source].propose(choice.num_draft, draft_key, history, noise)
    return Proposal(mx.array(tokens[d.caches.main_offset :]), draft_tokens, draft_probs, accept_key, noise)


def settle(
    d: Decoding, here: Situation, choice: Choice, verdict: Verdict, learn: bool, timed: bool = True, padded=False
) -> list:
    """Step 5 of a round: learn from it (`learn`; its seconds where `timed`), extend the conversation, roll back
    the rejected positions (and the `padded` ones). Returns the round's new tokens."""
    new_tokens, unused, lookup, draft = verdict.new_tokens, None, d.sources.get(LOOKUP), d.sources.get(DRAFT)
    if here.found is not None and choice.source != LOOKUP:  # what a copy would have done
        unused = (here.found, len(new_tokens), lookup.copied(new_tokens))
    if learn:
        caught_up = draft.caught_up if choice.source == DRAFT else None
        seconds = _seconds(here.start, choice, caught_up, here.behind) if timed else None
        d.policy.record(choice, verdict.num_accepted, seconds, caught_up, unused)
    d.caches.tokens.extend(new_tokens)
    if choice.num_draft > 0 or padded:  # rejected positions, or padding a batched forward wrote
        d.caches.rollback()
    d.kv_quantize(d.caches)
    return new_tokens


def rounds(d: Decoding, max_tokens: int, plain_first: bool = False) -> Iterator[Round]:
    """Rounds until `max_tokens` tokens were emitted; d.caches.tokens grows as rounds finish.

    Each round reads the tokens not yet in the main cache (the last one, or more: the prompt's last step, or
    those a recurrent layer's rollback gave back) and its draft tokens. With `plain_first` the first round
    decodes plainly, not asking the policy: a pass over the rest of the prompt that gives the first token.
    """
    num_emitted, policy = 0, d.policy
    no_draft = mx.zeros((0,), mx.int32)  # made here: an array belongs to the stream of the thread that made it
    ahead = None  # a plain step queued behind a plain round before its token was read: the next round
    while num_emitted < max_tokens:
        here = situation(d, max_tokens - num_emitted)
        found, behind, left = here.found, here.behind, here.left
        if ahead is not None:  # queued: this round decodes plainly, whatever the policy would choose
            choice, verified, ahead = Choice(PLAIN, 0), ahead, None
            queue = policy.keeps_plain(found, behind, left)  # and queues the next if the policy would
        else:
            # 1) choose: source and length, from the conversation's match and what was learnt
            choice = bounded(d, Choice(PLAIN, 0) if plain_first else policy.choose(found, behind, left), left)
            # 2) propose, 3) verify and accept in one lazy graph
            proposal = propose(d, choice, here.history, no_draft)
            verified = verify(d, *proposal[:3], here.history, *proposal[3:])
            queue = choice.source == PLAIN and (not plain_first or policy.keeps_plain(found, behind, left))
        if queue and left > 1:
            ahead = _queue_next(d, verified, here.history, no_draft)
        # 4) one host read
        verdict = Verdict.read(d.host, verified)
        if d.lockstep is not None:
            d.lockstep.settle(verified.readout)
        # 5) learn (a pass over the prompt's rest tells nothing of a round), extend, roll back
        new_tokens = settle(d, here, choice, verdict, learn=not plain_first)
        plain_first = False
        num_emitted += len(new_tokens)
        yield Round(new_tokens, choice.source, choice.num_draft, verdict.num_accepted, verified.logprobs)


def bounded(d: Decoding, choice: Choice, left: int) -> Choice:
    """The policy's choice within the call's bounds: the tokens left, the draft length limit at this offset, the
    rows one forward may read (a rotating cache takes SLACK + 1 at most; past MAX_PENDING tokens given back
    by a rollback, a plain round reads them), and whether the source can draft now (its `ready()`, where it has
    one: the MTP layer drafts from the position before the last token)."""
    tokens = d.caches.tokens
    pending = len(tokens) - d.caches.main_offset
    room = SLACK + 1 - pending if pending <= MAX_PENDING else 0
    source = d.sources.get(choice.source)
    if source is not None and not getattr(source, "ready", lambda: True)():
        room = 0
    num_draft = max(0, min(choice.num_draft, left - 1, d.max_draft(len(tokens) - 1), room))
    return choice._replace(num_draft=num_draft, source=choice.source if num_draft > 0 else PLAIN)


def _queue_next(d: Decoding, verified: Verified, history: mx.array | None, no_draft: mx.array) -> Verified:
    """Queue the step after a plain round before its token is read: building it keeps the device busy. That
    round decodes plainly too (a copy or a draft waits one token)."""
    mx.async_eval(verified.readout)
    d.kv_quantize(d.caches)  # as after every step of mlx-lm's generate_step
    _, accept_key, noise = d.draws.take(len(d.caches.tokens) + 1, 1)  # the next position's
    history = None if history is None else mx.concatenate([history, verified.next_token[None]])
    ahead = verify(d, verified.next_token[None], no_draft, None, history, accept_key, noise)
    mx.async_eval(ahead.logprobs, ahead.readout)
    return ahead


def _seconds(start: float, choice: Choice, caught_up: tuple[int, float] | None, behind: int) -> float | None:
    """What the round cost, for the policy: a draft that sat out other rounds caught up on them in this round,
    in chunks, timed apart (it tells what catching up costs), or a few tokens with its first step, untimed
    (not a cost of k): None."""
    seconds = time.perf_counter() - start
    if caught_up is not None:
        return seconds - caught_up[1]
    return None if choice.source == DRAFT and behind > 2 else seconds
