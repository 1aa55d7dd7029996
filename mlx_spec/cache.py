"""The pair of caches (main, draft) and their rollback, for every cache kind.

Rollback moves offsets. Standard and quantized caches trim natively; rotating
(sliding-window) caches become `SlackRotatingCache`s after the prompt, which
keep SLACK spare slots beyond their window so that a rejected round never
overwrites an entry that is still needed after the rollback. Recurrent layers
go back to a state kept before the forward (`recurrent.py`); the tokens after
it are read again by the next forward.
"""

import hashlib
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import (
    CacheList,
    ChunkedKVCache,
    ConcatenateKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)
from mlx_lm.models.cache import make_prompt_cache as _mlx_lm_make_cache

from . import facts
from .load import output_size
from .recurrent import RecurrentCache, adopt, leaves, map_leaves

SLACK = 32  # spare slots of a rotating cache: the most tokens one round may write is SLACK + 1
KEEP = 4  # tokens mlx-lm's rotating cache keeps at the start for max_kv_size


class SlackRotatingCache:
    """A rotating KV cache that can be rolled back by up to SLACK tokens, even after wrapping.

    Query at position t attends the first `keep` positions and the last
    `max_size - keep` positions up to t: mlx-lm's RotatingKVCache semantics
    during decoding. Position p (>= keep) lives in slot
    keep + (p - keep) % (capacity - keep), where capacity = max_size + SLACK.
    """

    step = 256

    def __init__(self, max_size: int, keep: int = 0):
        self.max_size = max_size
        self.keep = keep
        self.capacity = max_size + SLACK
        self.keys = None
        self.values = None
        self.offset = 0
        self.max_written = -1  # highest position whose entry may still sit in a slot

    # --- layout -------------------------------------------------------------
    def _slot(self, position: int) -> int:
        if position < self.keep:
            return position
        return self.keep + (position - self.keep) % (self.capacity - self.keep)

    def _wrapped(self, end: int) -> bool:
        """Whether, once positions up to end - 1 are written, some slot was reused."""
        return max(self.max_written + 1, end) > self.capacity

    def _slot_positions(self, last: int) -> np.ndarray:
        """Position held by each slot once positions 0..last are written (newest wins)."""
        slots = np.arange(self.capacity)
        ring = self.capacity - self.keep
        positions = last - ((last - self.keep) - (slots - self.keep)) % ring
        positions[positions < self.keep] = -1  # a ring slot that holds no position up to `last`
        positions[: self.keep] = slots[: self.keep]
        return positions

    # --- the mlx-lm cache interface ----------------------------------------
    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        window = min(window_size or self.max_size, self.max_size)
        end = self.offset + N
        if not self._wrapped(end) and end - 1 < window:
            if return_array:
                return _window_mask(np.arange(end), self.offset, N, self.keep, window)
            return "causal" if N > 1 else None
        positions = np.arange(end) if not self._wrapped(end) else self._slot_positions(end - 1)
        return _window_mask(positions, self.offset, N, self.keep, window)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        num_new = keys.shape[2]
        assert num_new <= SLACK + 1, "a rotating cache takes at most SLACK + 1 tokens at once"
        end = self.offset + num_new
        self._reserve(min(end, self.capacity), keys, values)
        start = self.offset
        while start < end:  # at most two contiguous runs of slots
            slot = self._slot(start)
            run = min(end - start, self.capacity - slot)
            src = slice(start - self.offset, start - self.offset + run)
            self.keys[..., slot : slot + run, :] = keys[..., src, :]
            self.values[..., slot : slot + run, :] = values[..., src, :]
            start += run
        self.offset = end
        self.max_written = max(self.max_written, end - 1)
        return self.keys_and_values()

    def keys_and_values(self):
        used = self.capacity if self._wrapped(self.offset) else self.offset
        return self.keys[..., :used, :], self.values[..., :used, :]

    def _reserve(self, size: int, keys: mx.array, values: mx.array):
        have = 0 if self.keys is None else self.keys.shape[2]
        if size <= have:
            return
        new_size = min(self.capacity, -(-size // self.step) * self.step)
        B, H, _, Dk = keys.shape
        grow_k = mx.zeros((B, H, new_size - have, Dk), keys.dtype)
        grow_v = mx.zeros((B, H, new_size - have, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = grow_k, grow_v
        else:
            self.keys = mx.concatenate([self.keys, grow_k], axis=2)
            self.values = mx.concatenate([self.values, grow_v], axis=2)

    def is_trimmable(self) -> bool:
        return True

    def can_trim_to(self, length: int) -> bool:
        """Whether positions length.. can be dropped with every needed entry intact."""
        return self.max_written - length < SLACK

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        assert self.can_trim_to(self.offset - n), "rollback beyond the rotating cache's slack"
        self.offset -= n
        return n

    def size(self) -> int:
        return min(self.offset, self.max_size)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self):
        """As mlx-lm's caches: arrays and scalars that `from_state` (and mlx-lm's save_prompt_cache) take."""
        return self.keys, self.values, self.offset, self.keep, self.max_size, self.max_written

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.keep, self.max_size, self.max_written = v
        self.capacity = self.max_size + SLACK

    @classmethod
    def from_state(cls, state) -> "SlackRotatingCache":
        cache = cls.__new__(cls)
        cache.state = state
        return cache

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def to_rotating(self) -> RotatingKVCache:
        """An mlx-lm RotatingKVCache holding the same window, in temporal order: it continues exactly as this one.

        Its entries are the first `keep` positions and the newest ones, as mlx-lm's
        own cache holds them, so every mlx-lm function (save, trim) takes it.
        """
        cache = RotatingKVCache(self.max_size, self.keep)
        if self.keys is None or self.offset == 0:
            return cache
        newest = max(self.keep, self.offset - (self.max_size - self.keep))
        positions = np.concatenate([np.arange(min(self.keep, self.offset)), np.arange(newest, self.offset)])
        slots = np.where(
            positions < self.keep, positions, self.keep + (positions - self.keep) % (self.capacity - self.keep)
        )
        slots = mx.array(slots)
        keys, values = mx.take(self.keys, slots, axis=2), mx.take(self.values, slots, axis=2)
        cache.state = (keys, values, self.offset, self.keep, self.max_size, len(positions))
        return cache

    @classmethod
    def from_rotating(cls, cache: RotatingKVCache) -> "SlackRotatingCache":
        """Take over an mlx-lm RotatingKVCache (after the prompt) with identical contents."""
        new = cls(cache.max_size, cache.keep)
        new.offset = cache.offset
        new.max_written = cache.offset - 1
        if cache.keys is None or cache.offset == 0:
            return new
        keys, values = (cache._temporal_order(v) for v in (cache.keys, cache.values))
        length = keys.shape[2]
        # Temporal order: all positions, or the first `keep` and then the newest ones.
        positions = np.arange(length)
        if cache.offset > length:
            positions[new.keep :] += cache.offset - length
        needed = (positions < new.keep) | (positions >= cache.offset - (new.max_size - new.keep))
        sources = np.nonzero(needed)[0]
        new._reserve(min(cache.offset, new.capacity), keys, values)
        slots = mx.array([new._slot(int(p)) for p in positions[sources]])
        new.keys[..., slots, :] = keys[..., mx.array(sources), :]
        new.values[..., slots, :] = values[..., mx.array(sources), :]
        return new


def _window_mask(positions: np.ndarray, offset: int, num_queries: int, keep: int, window: int) -> mx.array:
    """Bool mask (queries, slots): query t sees p <= t with p < keep or p > t - (window - keep)."""
    queries = np.arange(offset, offset + num_queries)[:, None]
    slots = positions[None, :]
    visible = (slots <= queries) & (slots >= 0) & ((slots < keep) | (slots > queries - (window - keep)))
    return mx.array(visible)


def _reachable(cache, length: int) -> int | None:
    """The largest length <= `length` that `cache` can be cut back to, None if none."""
    if cache.offset <= length:
        return cache.offset
    if isinstance(cache, RecurrentCache):
        return cache.reachable(length)
    if isinstance(cache, SlackRotatingCache):
        return length if cache.can_trim_to(length) else None
    if isinstance(cache, ChunkedKVCache):
        return length if length >= cache.start_position else None
    if isinstance(cache, RotatingKVCache) and not cache.is_trimmable():
        return None
    return length if rolls_back(cache) and length >= 0 else None


def cut_length(layers: list[Any], length: int) -> int | None:
    """The largest length <= `length` that every layer can be cut back to (a recurrent layer only to a state it
    kept), None if there is none."""
    reach = [_reachable(c, length) for c in leaves(layers)]
    if None in reach:
        return None
    cut = min(reach, default=length)
    return cut if all(_reachable(c, cut) == cut for c in leaves(layers)) else None


def pair_offset(layers: list[Any]) -> int:
    """The number of tokens a model's caches hold (its layers all read the same tokens): the first layer's, or
    its first CacheList member's. Read several times a round, so it walks no further."""
    if not layers:
        return 0
    first = layers[0]
    while isinstance(first, CacheList):
        first = first.caches[0]
    return first.offset


UNKNOWN = -1  # in CachePair.tokens: a token a cache holds that mlx_spec never saw (a cache filled by mlx-lm)


@dataclass
class CachePair:
    """KV caches of the main and the draft model, and the tokens they stand for.

    `tokens` is every token of the conversation so far (prompt and generated);
    the main cache holds the first `main_offset` of them, the draft cache those
    from `draft_start` to `draft_offset`. The last token is never in a cache
    yet: it is the input of the next forward pass. `models` names the models the
    caches belong to (see `fingerprint`), where known. A cache whose recurrent
    layers could only go back to an earlier state holds fewer: the tokens after
    it are read by the next forward.
    """

    main: list[Any]
    draft: list[Any] | None
    tokens: list[int] = field(default_factory=list)  # the conversation; the caches hold a prefix of it
    draft_start: int = 0  # the token the draft cache's first entry stands for (a draft cache begun late)
    models: dict[str, str | None] | None = None  # {"main": fingerprint, "draft": fingerprint or None}
    # The main model's MTP layer (mtp.py): its cache (entry j reads token j + 1: at most all tokens but the
    # last two), and the main model's last hidden states as (position of the first, (L, D)) chunks, those not
    # yet in it and a few before; None while the pair has not drafted with MTP.
    mtp: list[Any] | None = None
    mtp_hidden: list = field(default_factory=list)

    @property
    def main_offset(self) -> int:
        return pair_offset(self.main)

    @property
    def draft_offset(self) -> int:
        """The number of tokens the draft cache has seen, counted from the start of the conversation."""
        return pair_offset(self.draft) + self.draft_start if self.draft is not None else 0

    def rollback(self) -> bool:
        """Trim both caches to at most all tokens but the last. False (nothing changed) if impossible."""
        length = len(self.tokens) - 1
        sides = [
            (self.main, length),
            (self.draft or [], length - self.draft_start),
            (self.mtp or [], max(length - 1, 0)),
        ]
        cuts = [cut_length(layers, keep) if keep >= 0 else None for layers, keep in sides]
        if None in cuts:
            return False
        for (layers, _), cut in zip(sides, cuts):
            for cache in layers:
                if pair_offset([cache]) > cut:
                    cache.trim(pair_offset([cache]) - cut)
        return True

    def truncate(self, num_tokens: int) -> bool:
        """Forget the conversation from token `num_tokens` on. False (nothing changed) if impossible."""
        kept = self.tokens[:num_tokens]
        saved, self.tokens = self.tokens, kept
        if self.rollback():
            return True
        self.tokens = saved
        return False

    def take_over_rotating(self):
        """Replace mlx-lm rotating caches by slack ones (after the prompt is in)."""
        for layers in (self.main, self.draft or []):
            layers[:] = map_leaves(
                layers, lambda c: SlackRotatingCache.from_rotating(c) if isinstance(c, RotatingKVCache) else c
            )

    def quantize(self, kv_bits: int | None, kv_group_size: int, quantized_kv_start: int):
        """Quantize standard caches that reached `quantized_kv_start`, as mlx-lm does."""
        if kv_bits is None:
            return
        for layers in (self.main, self.draft or []):
            for i, cache in enumerate(layers):
                if type(cache) is KVCache and cache.keys is not None and cache.offset >= quantized_kv_start:
                    head_dim = cache.keys.shape[-1]
                    if head_dim % kv_group_size:
                        raise ValueError(
                            f"kv_group_size={kv_group_size} does not divide the model's head dimension {head_dim}"
                        )
                    layers[i] = cache.to_quantized(group_size=kv_group_size, bits=kv_bits)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reuse_prefix(cache: CachePair, tokens: list[int]) -> int | None:
    """Keep the longest prefix of `tokens` that `cache` holds; the rest of `tokens` is still to go in.

    Returns how many tokens were kept: at most len(tokens) - 1, since at least one
    token must go in to give the next logits. None if the cache cannot go back that
    far (a rotating cache past its slack); the cache is then unchanged.
    """
    num_kept = min(common_prefix_length(cache.tokens, tokens), len(tokens) - 1)
    return num_kept if cache.truncate(num_kept) else None


# Cache kinds a round can roll back: attention caches trim, recurrent ones go back to a kept state.
ROLLS_BACK = (
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    SlackRotatingCache,
    ChunkedKVCache,
    ConcatenateKVCache,
    RecurrentCache,
)


def rolls_back(cache) -> bool:
    return isinstance(cache, ROLLS_BACK)


def not_rolling_back(layers: list[Any]) -> str | None:
    """The name of the first cache kind in `layers` (CacheList members too) that cannot be rolled back, if any."""
    return next((type(c).__name__ for c in leaves(layers) if not rolls_back(c)), None)


def model_cache(model, max_kv_size: int | None, role: str) -> list[Any]:
    """mlx-lm's caches for `model`, its ArraysCaches taken over by RecurrentCaches (see recurrent.py)."""
    layers = adopt(_mlx_lm_make_cache(model, max_kv_size=max_kv_size), 0)
    if not all(hasattr(c, "offset") for c in leaves(layers)):
        kind = next(type(c).__name__ for c in leaves(layers) if not hasattr(c, "offset"))
        raise ValueError(
            f"the {role} model keeps a {kind} cache, which does not count its tokens: mlx_spec cannot use it"
        )
    return layers


def make_prompt_cache(model, draft_model=None, max_kv_size: int | None = None) -> CachePair:
    """Make the caches of both models, reusable across calls (the turns of a conversation).

    Args:
        model (nn.Module): The main model.
        draft_model (nn.Module or "mtp", optional): The draft model; without one, a draft
          cache is added when the pair is first used with a draft model. "mtp" (the main
          model's MTP layer): its cache is added when the pair is first used.
        max_kv_size (int, optional): A rotating (sliding-window) cache of this
          many tokens, as in mlx-lm (the first 4 tokens are always kept).

    Returns:
        CachePair: the caches, the tokens they stand for, and the models they belong to.
    """
    if max_kv_size is not None and max_kv_size <= KEEP:
        raise ValueError(f"max_kv_size must be larger than {KEEP}, got {max_kv_size}")
    if isinstance(draft_model, str):  # "mtp": the main model's own layer, whose cache the first call adds
        draft_model = None
    return CachePair(
        main=model_cache(model, max_kv_size, "main"),
        draft=None if draft_model is None else model_cache(draft_model, max_kv_size, "draft"),
        models={"main": fingerprint(model), "draft": None if draft_model is None else fingerprint(draft_model)},
    )


def fingerprint(model) -> str:
    """A model's type, sizes and a hash of some weights: caches made for one model do not fit another (computed
    once, kept while the model lives)."""
    known = facts.known(model)
    if known is None or known.fingerprint is None:
        args = getattr(model, "args", None)
        kind = getattr(args, "model_type", None) or type(model).__module__.rsplit(".", 1)[-1]
        weights = tree_flatten(model.parameters())
        digest = hashlib.sha256()
        for _, w in weights[:1] + weights[-1:]:
            digest.update(np.array(w.reshape(-1)[:4096].astype(mx.float32)).tobytes())
        described = (
            f"{kind} ({len(model.layers)} layers, hidden size {getattr(args, 'hidden_size', '?')}, "
            f"vocabulary {output_size(model)}, weights {digest.hexdigest()[:8]})"
        )
        known = facts.of(model)
        known.fingerprint = described
    return known.fingerprint
