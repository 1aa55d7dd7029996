"""Step 1 of a round, second source: draft tokens copied from the conversation itself (prompt lookup).

An incremental n-gram index over `caches.tokens` finds the most recent earlier
occurrence of the conversation's last tokens; what followed it is the proposal.
A copy cursor follows the text being copied through small edits: where the
reply swapped a token of its source for its own (a renamed identifier), the
copy resumes right after the swapped token, which no n-gram can find. The swap
is remembered: later copies propose the reply's token wherever the source has
the swapped one, as an edit that renames does throughout.
"""

import weakref
from array import array
from typing import NamedTuple

import mlx.core as mx

MAX_NGRAM = 4  # the longest suffix looked up; shorter ones down to 1 when it has no earlier occurrence
MAX_MATCH = 16  # a match is measured backwards up to this many tokens (its length picks the acceptance bucket)
MAX_ENTRIES = 1 << 18  # distinct n-grams kept per n; the least recently seen go first
ALIGN_WINDOW = 8  # a copy cursor is judged by how many of the last 8 tokens agree with the 8 before it
MAX_MISSES = 1  # the cursor is dropped when more tokens than this in a row differ from what it points at
MAX_SWAPS = 256  # swapped tokens remembered; the least recently confirmed go first


class Match(NamedTuple):
    """Where to copy from: position `start` and what argues for it.

    Exact (`realigned` False): the conversation's last `length` tokens also end
    at position `start` - 1. Realigned: the copy cursor, where `length` of the
    last ALIGN_WINDOW tokens agree position by position with those before
    `start`, more than agree in a row (the reply swapped a token among them).
    """

    start: int
    length: int
    realigned: bool = False


class NgramIndex:
    """Where each n-gram of the conversation (n = 1..MAX_NGRAM) last occurred; updated per appended token.

    `last[n][ngram]` is the position right after the most recent occurrence of
    `ngram` whose continuation is known, so the conversation's own last n tokens
    are found at their previous occurrence. `previous[n][i]` is what
    `last[n]` held for the n-gram ending before position i until i was indexed,
    so cutting the conversation back (an early stop, a chat turn re-rendered)
    restores the index exactly, in time proportional to the tokens removed.
    Memory is bounded: each n keeps at most `max_entries` n-grams (the least
    recently seen go first), and `previous` 4 bytes per token and n. `work`
    counts the tokens touched, for the test that a round's cost does not grow
    with the conversation.
    """

    def __init__(self, max_ngram: int = MAX_NGRAM, max_entries: int = MAX_ENTRIES):
        self.max_ngram = max_ngram
        self.max_entries = max_entries
        self.tokens: list[int] = []  # the conversation as indexed
        self.last: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        self.previous = [array("i") for _ in range(max_ngram + 1)]
        self.work = 0
        self.cursor: int | None = None  # the position the reply is copying next, if it is copying
        self.misses = 0  # tokens in a row that differed from the cursor's
        self.swaps: dict[int, int] = {}  # a source's token -> the reply's in its place (dict order: recency)
        self.swapped: tuple[int, int] | None = None  # the last token missed, (source's, reply's), till confirmed

    def sync(self, tokens: list[int]):
        """Bring the index up to `tokens`: keep the prefix it shares with them, index the rest."""
        seen = self.tokens
        common = min(len(seen), len(tokens))
        if seen[:common] != tokens[:common]:
            common = next(i for i, (a, b) in enumerate(zip(seen, tokens)) if a != b)
        self.truncate(common)
        self.extend(tokens[common:])

    def truncate(self, num_tokens: int):
        """Forget the tokens from position `num_tokens` on, restoring what they overwrote."""
        seen = self.tokens
        for end in range(len(seen) - 1, num_tokens - 1, -1):
            for n in range(1, min(self.max_ngram, end) + 1):
                key, before = tuple(seen[end - n : end]), self.previous[n][end]
                if before < 0:
                    self.last[n].pop(key, None)
                else:
                    self.last[n][key] = before
        for n in range(1, self.max_ngram + 1):
            del self.previous[n][num_tokens:]
        del seen[num_tokens:]
        self.cursor, self.swapped = None, None
        self.swaps.clear()  # learnt from what was cut, maybe

    def extend(self, new_tokens: list[int]):
        """Append tokens; index each n-gram that now has a continuation."""
        seen = self.tokens
        first = len(seen)  # positions first.. are new: the n-grams ending just before each are followed by it
        seen.extend(new_tokens)
        size = len(seen)
        for n in range(1, self.max_ngram + 1):
            table, previous = self.last[n], self.previous[n]
            low = max(first, n)
            previous.extend([-1] * (low - first))  # no n-gram ends before position low < n
            keys = zip(*(seen[low - n + j : size - n + j] for j in range(n)))
            for end, key in zip(range(low, size), keys):
                previous.append(table.pop(key, -1))  # re-inserted last: the dict's order is recency
                table[key] = end
            while len(table) > self.max_entries:
                del table[next(iter(table))]
        self.work += self.max_ngram * len(new_tokens)
        self._follow(first)

    def _follow(self, first: int):
        """Move the copy cursor along the tokens from `first` on: one step per token, agreeing or not.

        A token that differs from the source's, followed by one that agrees, is a
        swap: remembered, and copied from then on. The source's own token where a
        swap was remembered takes the swap back.
        """
        cursor, seen, swaps = self.cursor, self.tokens, self.swaps
        if cursor is None:
            return
        for token in seen[first:]:
            source = seen[cursor]
            if token == source or token == swaps.get(source):
                if token == source:
                    swaps.pop(source, None)
                if self.swapped is not None:
                    swaps.pop(self.swapped[0], None)  # re-inserted last: the dict's order is recency
                    swaps[self.swapped[0]] = self.swapped[1]
                    if len(swaps) > MAX_SWAPS:
                        del swaps[next(iter(swaps))]
                self.misses, self.swapped = 0, None
            else:
                self.misses += 1
                self.swapped = (source, token) if self.misses == 1 else None
                if self.misses > MAX_MISSES:
                    self.cursor = None
                    return
            cursor += 1  # stays behind the token compared, since it started behind the end
        self.cursor = cursor

    def _agree(self, source: int, token: int) -> bool:
        """Whether the reply's `token` copies the source's: the same, or the source's swapped."""
        return token == source or token == self.swaps.get(source)

    def agreement(self, start: int) -> tuple[int, int]:
        """(exact, aligned): how many of the last tokens equal those before `start` in a row (up to
        MAX_MATCH), and how many copy them (`_agree`: swaps count) position by position among the last
        ALIGN_WINDOW."""
        seen, size = self.tokens, len(self.tokens)
        agree = self._agree
        exact = 0
        while exact < MAX_MATCH and start - exact > 0 and seen[start - exact - 1] == seen[size - exact - 1]:
            exact += 1
        window = min(ALIGN_WINDOW, start)
        aligned = sum(agree(seen[start - j], seen[size - j]) for j in range(1, window + 1))
        self.work += exact + window
        return exact, aligned

    def match(self) -> Match | None:
        """The better of the longest earlier occurrence of the last tokens and the copy cursor.

        Candidates are ranked by the larger of their exact and aligned agreement,
        then by the exact. An exact winner moves the cursor there.
        """
        size = len(self.tokens)
        starts = {self.cursor} if self.cursor is not None and self.cursor < size else set()
        for n in range(min(self.max_ngram, size - 1), 0, -1):
            start = self.last[n].get(tuple(self.tokens[size - n :]))
            self.work += n
            if start is not None:  # the longest n-gram's most recent occurrence
                starts.add(start)
                break
        if not starts:
            return None
        ranked = []
        for start in starts:
            exact, aligned = self.agreement(start)
            ranked.append((max(exact, aligned), exact, start))
        score, exact, start = max(ranked)
        if score == 0:
            return None
        if exact >= score:
            self.cursor, self.misses, self.swapped = start, 0, None
            return Match(start, exact)
        return Match(start, score, realigned=True)

    def continuation(self, match: Match, num_draft: int) -> list[int]:
        """The `num_draft` tokens that followed the match, with the swaps the reply made; past the end it
        repeats itself (a period)."""
        seen, size, swaps = self.tokens, len(self.tokens), self.swaps
        last = self.swapped or (None, None)  # the last token missed: taken for a swap till the next says otherwise
        out = []
        for i in range(match.start, match.start + num_draft):
            token = seen[i] if i < size else out[i - size]
            out.append(token if i >= size else last[1] if token == last[0] else swaps.get(token, token))
        self.work += num_draft
        return out


def agreeing(proposal: list[int], tokens: list[int]) -> int:
    """How many of `tokens`, from the first on, equal `proposal`'s."""
    return next((i for i, (a, b) in enumerate(zip(proposal, tokens)) if a != b), min(len(proposal), len(tokens)))


_INDEXES: dict[int, NgramIndex] = {}


def index_for(caches) -> NgramIndex:
    """The index of a CachePair's conversation, kept as long as the caches live, synced to its tokens."""
    index = _INDEXES.get(id(caches))
    if index is None:
        index = _INDEXES[id(caches)] = NgramIndex()
        weakref.finalize(caches, _INDEXES.pop, id(caches), None)
    index.sync(caches.tokens)
    return index


class LookupSource:
    """The conversation as a round's source of draft tokens (draft.DraftSource is the other one).

    `match()` finds this round's match (the controller sizes the round by its
    length); `propose` copies what followed it. Neither needs device work.
    """

    def __init__(self, caches, vocab_size: int, without_q: bool):
        self.caches, self.vocab_size, self.without_q = caches, vocab_size, without_q  # no rule needs q
        self.index = index_for(caches)
        self.found: Match | None = None

    def match(self) -> Match | None:
        """Index the tokens appended since the last round, then find the conversation's match."""
        index, tokens = self.index, self.caches.tokens
        index.extend(tokens[len(index.tokens) :])
        self.found = index.match()
        return self.found

    def copied(self, new_tokens: list[int]) -> int:
        """How many of a round's `new_tokens`, in a row, the found match's copy would have proposed."""
        return agreeing(self.index.continuation(self.found, len(new_tokens)), new_tokens)

    def propose(
        self,
        num_draft: int,
        key: mx.array | None = None,
        history: mx.array | None = None,
        noise: mx.array | None = None,
    ):
        """(draft_tokens (k,) int32, q (k, V) or None when no rule needs it): the match's continuation.

        q is a point mass on each copied token: rejection sampling then accepts
        x with probability p(x) and on rejection samples from p with x removed,
        so the output keeps the main model's distribution.
        """
        draft_tokens = mx.array(self.index.continuation(self.found, num_draft), mx.int32)
        if self.without_q:
            return draft_tokens, None
        return draft_tokens, (mx.arange(self.vocab_size)[None] == draft_tokens[:, None]).astype(mx.float32)
