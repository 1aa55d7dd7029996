"""The round loop: draft, verify, accept in one lazy graph; one host sync; rollback; yield.

Without a draft, each plain round is built and scheduled before the previous
round's token is read, as mlx-lm's generate_step does, so that building a graph
never leaves the device idle. Prefill of the prompt also lives here, since it
fills the same pair of caches.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx

from .accept import accept, accept_exact, accept_greedy
from .cache import SLACK, CachePair, SlackRotatingCache
from .draft import DraftModel, propose
from .options import PREFILL_STEP_SIZE
from .sampling import SamplingParams
from .verify import score


@dataclass
class Round:
    """What one round produced: `tokens` = accepted draft tokens + one main token."""

    tokens: list[int]
    num_draft: int
    num_accepted: int
    logprobs: mx.array  # (k+1, V): the main model's log-probabilities at each verified position


class FixedDraft:
    """The draft-length policy of a fixed k (the adaptive one is adaptive.DraftController)."""

    def __init__(self, num_draft: int):
        self.num_draft = num_draft

    def choose(self) -> int:
        return self.num_draft

    def record(self, num_draft: int, num_accepted: int, seconds: float | None):
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
        model(mx.array(tokens[start : start + chunk], mx.int32)[None], cache=layers)
        kv_quantize(caches)
        mx.eval([c.state for c in layers])
        if progress is not None:
            progress(min(start + chunk, len(tokens)))


def rounds(
    model,
    draft: DraftModel | None,
    caches: CachePair,
    policy,
    max_tokens: int,
    params: SamplingParams,
    key: mx.array | None,
    vocab_size: int,
    max_draft: Callable[[int], int],
    kv_quantize: Callable,
    host: HostReads,
    logits_processors=None,
    history_start: int = 0,
) -> Iterator[Round]:
    """Generate until `max_tokens` tokens were emitted; caches.tokens grows as rounds finish.

    On entry every token but the last is in the main cache. `policy` chooses each
    round's draft length and learns from its outcome; `max_draft(offset)` bounds
    the draft length of a round starting at main cache offset `offset`. Logits
    processors see the tokens from `history_start` on.
    """
    num_emitted, accept_key = 0, None
    ahead = None  # without a draft: the next plain round, scheduled before this round's token is read

    def verify(last, draft_tokens, draft_probs, history, accept_key):
        """The round's lazy result: its history, logprobs, next token, and what the host reads."""
        logprobs, main_probs = score(model, caches.main, last, draft_tokens, params, history, logits_processors)
        if params.greedy:
            num_accepted, next_token = accept_greedy(draft_tokens, logprobs)
        elif params.exact_match:
            num_accepted, next_token = accept_exact(draft_tokens, params.sampler(logprobs).reshape(-1).astype(mx.int32))
        else:
            num_accepted, next_token = accept(draft_tokens, draft_probs, main_probs, accept_key)
        return history, logprobs, next_token, mx.concatenate([draft_tokens, num_accepted[None], next_token[None]])

    while num_emitted < max_tokens:
        start = time.perf_counter()
        tokens = caches.tokens
        num_draft = (
            0 if draft is None else min(policy.choose(), max_tokens - num_emitted - 1, max_draft(len(tokens) - 1))
        )
        draft_tokens = mx.zeros((0,), mx.int32)
        num_behind = len(tokens) - caches.draft_offset if num_draft > 0 else 0
        if ahead is not None:
            (history, logprobs, next_token, readout), ahead = ahead, None
        else:
            if key is not None:
                key, draft_key, accept_key = mx.random.split(key, 3)
            history = mx.array(tokens[history_start:], mx.int32) if logits_processors else None
            draft_probs = mx.zeros((0, vocab_size))
            if (
                num_behind > SLACK + 1
            ):  # after a long plain stretch: catch the draft up in chunks a rotating cache takes
                prefill(draft.model, caches.draft, tokens[caches.draft_offset : -1], caches, kv_quantize)
            if num_draft > 0:
                draft_tokens, draft_probs = propose(
                    draft,
                    caches.draft,
                    tokens[caches.draft_offset :],
                    num_draft,
                    params,
                    draft_key if key is not None else None,
                    history,
                    logits_processors,
                )
            history, logprobs, next_token, readout = verify(
                mx.array(tokens[-1:], mx.int32), draft_tokens, draft_probs, history, accept_key
            )
        if draft is None and num_emitted + 1 < max_tokens:
            # Plain decoding, as mlx-lm's generate_step: the next step is built and queued behind this one
            # before this one's token is read, so building a graph never leaves the device idle.
            mx.async_eval(readout)  # first in the queue: reading it does not wait for the next step
            kv_quantize(caches)  # as after every step of mlx-lm's generate_step
            if key is not None:
                key, _, accept_key = mx.random.split(key, 3)
            ahead_history = None if history is None else mx.concatenate([history, next_token[None]])
            ahead = verify(next_token[None], draft_tokens, mx.zeros((0, vocab_size)), ahead_history, accept_key)
            mx.async_eval(ahead[1:])
        values = host(readout)
        num_accepted = values[-2]
        # A draft that sat out plain rounds caught up on them in this round: not a cost of k.
        policy.record(num_draft, num_accepted, None if num_behind > 2 else time.perf_counter() - start)
        new_tokens = values[:num_accepted] + values[-1:]
        tokens.extend(new_tokens)
        if num_draft > 0:
            caches.rollback()  # drop the rejected positions from both caches (a plain round has none)
        kv_quantize(caches)
        num_emitted += len(new_tokens)
        yield Round(new_tokens, num_draft, num_accepted, logprobs)
