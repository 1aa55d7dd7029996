"""The round loop: propose, verify, accept in one lazy graph; one host sync; rollback; yield.

Each round the policy picks a source of draft tokens (the conversation, the
draft model, or none) and a length; both sources share one interface,
`propose(num_draft, key, history, noise) -> (draft_tokens, q)`. A plain round (no
source, or none chosen) queues the next step before its own token is read, as
mlx-lm's generate_step does, while the policy keeps to plain decoding: with no
source at all, every step. Prefill of the prompt also lives here, since it
fills the same pair of caches.
"""

import functools
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import mlx.core as mx

from .accept import accept, accept_coupled, accept_exact, accept_greedy
from .adaptive import DRAFT, LOOKUP, PLAIN, Choice
from .cache import SLACK, CachePair, SlackRotatingCache
from .draft import DraftSource
from .lookup import MAX_MATCH, LookupSource, Match
from .options import PREFILL_STEP_SIZE
from .recurrent import MAX_PENDING, advance
from .sampling import CoupledDraws, SamplingParams, filtered_scores
from .verify import score

FIXED_MIN_MATCH = 3  # a fixed draft length copies from the conversation when its last 3 tokens occurred before


class Round(NamedTuple):
    """What one round produced: `tokens` = accepted draft tokens + one main token."""

    tokens: list[int]
    source: str  # PLAIN, DRAFT or LOOKUP: where the draft tokens came from
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
    """A fixed draft length k: copied from the conversation where it has a match, else drafted."""

    def __init__(self, num_draft: int, has_draft: bool = True):
        self.num_draft, self.has_draft = num_draft, has_draft

    def choose(self, match: Match | None = None, behind: int = 1, left: int | None = None) -> Choice:
        if match is not None and match.length >= min(FIXED_MIN_MATCH, MAX_MATCH):
            return Choice(LOOKUP, self.num_draft)
        return Choice(DRAFT, self.num_draft) if self.has_draft and self.num_draft > 0 else Choice(PLAIN, 0)

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
):
    """Feed `tokens` through `model` into `layers`, `chunk` tokens at a time, evaluating each chunk.

    `progress`, if given, is called with the number of tokens fed after each chunk.
    """
    if any(isinstance(c, SlackRotatingCache) for c in layers):
        chunk = SLACK + 1  # a continued rotating cache takes few tokens at a time
    for start in range(0, len(tokens), chunk):
        inputs = tokens[start : start + chunk]
        model(mx.array(inputs, mx.int32)[None], cache=layers)
        advance(layers, len(inputs))
        kv_quantize(caches)
        mx.eval([c.state for c in layers])
        if progress is not None:
            progress(min(start + chunk, len(tokens)))


def verify(
    model, caches, params, logits_processors, last, draft_tokens, draft_probs, history, key, noise=None
) -> Verified:
    """Score [last, d_1..d_k] with the main model and accept, lazily (see verify.score, accept); with `noise`,
    the positions' Gumbel noise, by coupled sampling (sampling.CoupledDraws)."""
    logprobs, main_probs = score(model, caches.main, last, draft_tokens, params, history, logits_processors)
    if params.greedy:
        num_accepted, next_token = accept_greedy(draft_tokens, logprobs)
    elif noise is not None:
        num_accepted, next_token = accept_coupled(draft_tokens, filtered_scores(logprobs, params), noise)
    elif params.exact_match:  # a sampler of unknown settings: its own token at each position, as mlx-lm
        num_accepted, next_token = accept_exact(draft_tokens, params.sampler(logprobs).reshape(-1).astype(mx.int32))
    else:
        if draft_probs is None:  # no draft tokens: q is empty
            draft_probs = mx.zeros((0, main_probs.shape[-1]))
        num_accepted, next_token = accept(draft_tokens, draft_probs, main_probs, key)
    return Verified(logprobs, next_token, mx.concatenate([draft_tokens, num_accepted[None], next_token[None]]))


def rounds(
    model,
    sources: dict[str, DraftSource | LookupSource],
    caches: CachePair,
    policy,
    max_tokens: int,
    params: SamplingParams,
    key: mx.array | None,
    max_draft: Callable[[int], int],
    kv_quantize: Callable,
    host: HostReads,
    logits_processors=None,
    history_start: int = 0,
    plain_first: bool = False,
    draws: CoupledDraws | None = None,
) -> Iterator[Round]:
    """Rounds until `max_tokens` tokens were emitted; caches.tokens grows as rounds finish.

    Each round reads the tokens not yet in the main cache (the last one, or
    more: the prompt's last step, or those a recurrent layer's rollback gave
    back) and its draft tokens. With `plain_first` the first round
    decodes plainly, not asking the policy: a pass over the rest of the prompt
    that gives the first token. `sources` maps
    DRAFT and LOOKUP to those available (none: plain decoding); `policy` chooses each round's source
    and length from the lookup's match and learns from its outcome;
    `max_draft(offset)` bounds the draft length of a round starting at main
    cache offset `offset`. `key` draws the random numbers of rejection sampling; `draws`, those of a
    seeded call (coupled sampling: each position's noise from the seed and the position alone).
    """
    num_emitted, draft_key, accept_key = 0, None, None
    lookup, draft = sources.get(LOOKUP), sources.get(DRAFT)
    check = functools.partial(verify, model, caches, params, logits_processors)
    no_draft = mx.zeros((0,), mx.int32)
    ahead = None  # a plain step queued behind a plain round before its token was read: the next round
    while num_emitted < max_tokens:
        start, tokens = time.perf_counter(), caches.tokens
        found = lookup.match() if lookup is not None else None
        behind, left = draft.num_behind() if draft is not None else 1, max_tokens - num_emitted
        pending = len(tokens) - caches.main_offset
        if ahead is not None:  # queued: this round decodes plainly, whatever the policy would choose
            choice, verified, ahead = Choice(PLAIN, 0), ahead, None
            queue = policy.keeps_plain(found, behind, left)  # and queues the next if the policy would
        else:
            # 1) choose: source and length, from the conversation's match and what was learnt
            choice = Choice(PLAIN, 0) if plain_first else policy.choose(found, behind, left)
            room = SLACK + 1 - pending if pending <= MAX_PENDING else 0  # rows a rotating cache takes at once
            num_draft = min(choice.num_draft, left - 1, max_draft(len(tokens) - 1), room)
            choice = choice._replace(num_draft=num_draft, source=choice.source if num_draft > 0 else PLAIN)
            if key is not None:
                key, draft_key, accept_key = mx.random.split(key, 3)
            history = mx.array(tokens[history_start:], mx.int32) if logits_processors else None
            # 2) propose, 3) verify and accept in one lazy graph
            noise = draws.noise(len(tokens), num_draft + 1) if draws is not None else None
            draft_tokens, draft_probs = no_draft, None
            if choice.source != PLAIN:
                draft_tokens, draft_probs = sources[choice.source].propose(choice.num_draft, draft_key, history, noise)
            verified = check(mx.array(tokens[-pending:]), draft_tokens, draft_probs, history, accept_key, noise)
            queue = choice.source == PLAIN and (not plain_first or policy.keeps_plain(found, behind, left))
        if queue and left > 1:
            # a plain round queues the next step before its token is read: building it keeps the device busy.
            # That round decodes plainly too (a copy or a draft waits one token).
            mx.async_eval(verified.readout)
            kv_quantize(caches)  # as after every step of mlx-lm's generate_step
            if key is not None:
                key, _, accept_key = mx.random.split(key, 3)
            history = None if history is None else mx.concatenate([history, verified.next_token[None]])
            noise = draws.noise(len(tokens) + 1, 1) if draws is not None else None  # the next position's
            ahead = check(verified.next_token[None], no_draft, None, history, accept_key, noise)
            mx.async_eval(ahead.logprobs, ahead.readout)
        # 4) one host read
        verdict = Verdict.read(host, verified)
        # 5) learn, extend the conversation, roll back the rejected positions
        # A draft that sat out other rounds caught up on them in this round: in chunks, timed apart (it
        # tells what catching up costs); a few tokens with its first step, untimed (not a cost of k).
        seconds, caught_up = time.perf_counter() - start, draft.caught_up if choice.source == DRAFT else None
        if caught_up is not None:
            seconds -= caught_up[1]
        elif choice.source == DRAFT and behind > 2:
            seconds = None
        new_tokens, unused = verdict.new_tokens, None
        if found is not None and choice.source != LOOKUP:  # what a copy would have done
            unused = (found, len(new_tokens), lookup.copied(new_tokens))
        if not plain_first:  # the policy's first round is still to come (and a pass over the prompt's rest
            policy.record(choice, verdict.num_accepted, seconds, caught_up, unused)  # tells nothing of a round)
        plain_first = False
        tokens.extend(new_tokens)
        if choice.num_draft > 0:
            caches.rollback()
        kv_quantize(caches)
        num_emitted += len(new_tokens)
        yield Round(new_tokens, choice.source, choice.num_draft, verdict.num_accepted, verified.logprobs)
