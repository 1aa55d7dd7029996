"""Recurrent layers in the round: their states are kept from before each forward and restored on a rejection.

mlx-lm keeps a state-space or linear-attention layer's state in an `ArraysCache` (a recurrent state and a
convolution window; `CacheList` nests one beside a KV cache), which cannot be trimmed. Its arrays are
immutable, so the state from before a forward is free to keep; on a partial acceptance the layer goes back
to it, the attention layers are trimmed to the same length, and the accepted tokens are read again with the
next round's forward (a few more rows, no extra pass). `RecurrentCache` is the one mlx-lm class wrapped: an
`ArraysCache` that also counts the tokens it has read and keeps those states.
"""

from typing import Any

from mlx_lm.models.cache import ArraysCache, CacheList

# A round reads its pending tokens (those a rollback gave back) with its drafts. Past this many, it drafts
# nothing: a plain round commits them whatever it accepts, so rejections cannot pile rows up.
MAX_PENDING = 16


class RecurrentCache(ArraysCache):
    """mlx-lm's ArraysCache, with the number of tokens it has read (`offset`) and states it can go back to.

    `mark()` keeps the state as it is now (before a forward that may be rejected), `mark(prompt=True)` also
    keeps it as the end of a prompt (a request that asks the same prompt again goes back to it). `trim(n)`
    goes back to one of the kept states; `reachable(length)` says which one.
    """

    def __init__(self, size: int, offset: int = 0):
        super().__init__(size)
        self.offset = offset
        self.kept: dict[int, list] = {}  # offset -> the state arrays at that offset: the round's and the prompt's
        self.prompt_offset: int | None = None

    @classmethod
    def adopt(cls, cache: ArraysCache, offset: int) -> "RecurrentCache":
        new = cls(len(cache.cache), offset)
        new.cache = list(cache.cache)
        return new

    def to_arrays(self) -> ArraysCache:
        """mlx-lm's own class holding the same state (for a flat list handed back to the user)."""
        cache = ArraysCache(len(self.cache))
        cache.cache = list(self.cache)
        return cache

    def mark(self, prompt: bool = False):
        """Keep the state at the current offset: the one before the next forward, and a prompt's end."""
        if prompt:
            self.prompt_offset = self.offset
        self.kept = {o: s for o, s in self.kept.items() if o == self.prompt_offset}
        self.kept[self.offset] = list(self.cache)

    def reachable(self, length: int) -> int | None:
        """The largest length <= `length` this cache can be cut back to (None if none)."""
        lengths = [o for o in (self.offset, *self.kept) if o <= length]
        return max(lengths) if lengths else None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        if n <= 0:
            return 0
        target = self.offset - n
        assert target in self.kept, f"no state kept at {target} (kept: {sorted(self.kept)})"
        self.cache = list(self.kept[target])
        self.offset = target
        self.kept = {o: s for o, s in self.kept.items() if o <= target}
        if self.prompt_offset is not None and self.prompt_offset > target:
            self.prompt_offset = None
        return n

    def size(self) -> int:
        return self.offset

    @property
    def state(self):
        return self.cache, self.left_padding, self.lengths, self.offset

    @state.setter
    def state(self, v):
        self.cache, self.left_padding, self.lengths, self.offset = v
        self.kept, self.prompt_offset = {}, None


def leaves(layers: list[Any]) -> list[Any]:
    """Every cache object of a model's list, the members of a CacheList included."""
    out = []
    for cache in layers:
        out.extend(leaves(cache.caches) if isinstance(cache, CacheList) else [cache])
    return out


def recurrent(layers: list[Any]) -> list[RecurrentCache]:
    return [c for c in leaves(layers) if isinstance(c, RecurrentCache)]


def has_state(layers: list[Any]) -> bool:
    """Whether the model keeps a recurrent state (mlx-lm's ArraysCache) in any layer."""
    return any(isinstance(c, ArraysCache) for c in leaves(layers))


def map_leaves(layers: list[Any], convert) -> list[Any]:
    """`layers` with each cache object replaced by `convert(cache)`, inside a CacheList too (it is kept)."""

    def one(cache):
        if isinstance(cache, CacheList):
            cache.caches = tuple(one(c) for c in cache.caches)
            return cache
        return convert(cache)

    return [one(c) for c in layers]


def adopt(layers: list[Any], offset: int) -> list[Any]:
    """`layers` with each ArraysCache taken over by a RecurrentCache that has read `offset` tokens."""
    return map_leaves(
        layers,
        lambda c: (
            RecurrentCache.adopt(c, offset) if isinstance(c, ArraysCache) and not isinstance(c, RecurrentCache) else c
        ),
    )


def to_mlx_lm(layers: list[Any]) -> list[Any]:
    """`layers` with each RecurrentCache given back as mlx-lm's ArraysCache."""
    return map_leaves(layers, lambda c: c.to_arrays() if isinstance(c, RecurrentCache) else c)


def advance(layers: list[Any], num_tokens: int):
    """Count `num_tokens` read by a forward into the recurrent layers (mlx-lm's ArraysCache counts nothing)."""
    for cache in recurrent(layers):
        cache.offset += num_tokens


def mark(layers: list[Any], prompt: bool = False):
    """Keep the recurrent layers' states as they are, before a forward that may be rolled back."""
    for cache in recurrent(layers):
        cache.mark(prompt)
