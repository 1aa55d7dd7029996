"""Prompt caches at the API's edge: mlx-lm's flat lists of cache layers <-> CachePair; saving and loading them.

mlx-lm passes one flat list (the main model's layers, then the draft's); each call converts it into a
CachePair and writes the layers back when it ends, holding what mlx-lm's would: the list keeps working
across calls, with mlx_spec or mlx-lm.
"""

import base64
import json
import weakref
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models import cache as mlx_lm_cache

from .cache import UNKNOWN, CachePair, SlackRotatingCache, fingerprint, make_prompt_cache, model_cache, pair_offset
from .recurrent import RecurrentCache, adopt, leaves, map_leaves, to_mlx_lm

_SAVED = "mlx_spec"  # metadata keys of a saved cache: what mlx_spec knows beyond mlx-lm's layers
_SAVED_TOKENS = "mlx_spec_tokens"


def pair_for_call(prompt_cache, model, draft_model, max_kv_size: int | None):
    """The CachePair a call generates with, and what to call when it ends (None: nothing).

    `prompt_cache` is None (fresh caches), a CachePair, or mlx-lm's flat list:
    the main model's layers, then the draft model's (or none: a draft cache is
    kept beside the list). A list mlx_spec has not seen holds tokens it does not
    know: the prompt continues after them, as in mlx-lm.
    """
    if prompt_cache is None:
        return make_prompt_cache(model, draft_model, max_kv_size), None
    if isinstance(prompt_cache, CachePair):
        pair, write_back = prompt_cache, None
        if len(pair.main) != num_layers(model):
            raise ValueError(
                f"prompt_cache has {len(pair.main)} main layers, the main model {num_layers(model)}: "
                "make it with make_prompt_cache(model, draft_model)"
            )
    elif isinstance(prompt_cache, list):
        pair, write_back = _pair_from_list(prompt_cache, model, draft_model)
    else:
        raise ValueError(
            "prompt_cache must be a CachePair from mlx_spec.make_prompt_cache(model, draft_model) or "
            f"mlx-lm's list of cache layers, got {type(prompt_cache).__name__}"
        )
    _check_models(pair, model, draft_model)
    if draft_model is not None and pair.draft is None:
        _add_draft(pair, draft_model)
    return pair, write_back


def num_layers(model) -> int:
    """Cache layers of a model: the length of mlx-lm's make_prompt_cache(model)."""
    return len(model.make_cache()) if hasattr(model, "make_cache") else len(model.layers)


def _check_models(pair: CachePair, model, draft_model):
    """Refuse caches made for other models, naming both pairs; from now on the pair belongs to these."""
    made = dict(pair.models or {})
    given = {"main": fingerprint(model), "draft": None if draft_model is None else fingerprint(draft_model)}
    roles = ["main"] + (["draft"] if pair.draft is not None and draft_model is not None else [])
    if any(made.get(role) not in (None, given[role]) for role in roles):
        raise ValueError(
            f"prompt_cache belongs to main {made.get('main')} and draft {made.get('draft')}, "
            f"not to main {given['main']} and draft {given['draft']}: make one for these models "
            "with make_prompt_cache(model, draft_model)"
        )
    pair.models = {"main": given["main"], "draft": made.get("draft")}
    if pair.draft is not None and draft_model is not None:
        pair.models["draft"] = given["draft"]


def _add_draft(pair: CachePair, draft_model):
    """A draft cache for a pair that has none; it begins after the tokens nobody knows."""
    windows = [c.max_size for c in pair.main if isinstance(c, (mlx_lm_cache.RotatingKVCache, SlackRotatingCache))]
    pair.draft = model_cache(draft_model, max(windows, default=None), "draft")
    pair.draft_start = next((i for i, t in enumerate(pair.tokens) if t != UNKNOWN), len(pair.tokens))
    pair.models = {**(pair.models or {}), "draft": fingerprint(draft_model)}


@dataclass
class _Known:
    """What mlx_spec knows of a flat list it used; valid while the list holds these layers at these offsets."""

    layers: list[weakref.ref]
    offsets: list  # _signature(layers)
    num_main: int
    tokens: list[int]
    draft_start: int
    models: dict | None
    kept_draft: list | None  # the draft cache kept beside a list of main layers only


_known = weakref.WeakKeyDictionary()  # a list's first layer -> _Known


def _known_about(layers: list) -> _Known | None:
    known = _known.get(layers[0]) if layers else None
    if known is None or len(known.layers) != len(layers):
        return None
    if any(ref() is not c for ref, c in zip(known.layers, layers)) or _signature(layers) != known.offsets:
        return None  # changed outside mlx_spec: its tokens are unknown again
    return known


def _signature(layers: list) -> list:
    """What changes when a cache reads tokens: attention caches' offsets, recurrent states' arrays."""
    return [c.offset if hasattr(c, "offset") else tuple(id(a) for a in c.cache) for c in leaves(layers)]


def _remember(layers: list, num_main: int, pair: CachePair, kept_draft: list | None):
    if layers:
        _known[layers[0]] = _Known(
            [weakref.ref(c) for c in layers],
            _signature(layers),
            num_main,
            list(pair.tokens),
            pair.draft_start,
            pair.models,
            kept_draft,
        )


def _pair_from_list(layers: list, model, draft_model):
    num_main = num_layers(model)
    num_draft = None if draft_model is None else num_layers(draft_model)
    if len(layers) < num_main or (draft_model is not None and len(layers) not in (num_main, num_main + num_draft)):
        expected = f"{num_main} (main)" + ("" if draft_model is None else f" or {num_main + num_draft} (main + draft)")
        raise ValueError(f"prompt_cache has {len(layers)} layers, the models {expected}")
    known = _known_about(layers)
    main, draft = _adopted(layers[:num_main], known, "main"), _adopted(layers[num_main:], known, "draft") or None
    if known is not None:
        pair = CachePair(main, draft, list(known.tokens), known.draft_start, known.models)
        kept, made_for = known.kept_draft, (known.models or {}).get("draft")
        if draft is None and kept is not None and (draft_model is None or made_for == fingerprint(draft_model)):
            pair.draft = kept  # another draft model gets a cache of its own
        elif draft is None:
            pair.models = {**(known.models or {}), "draft": None}
    else:
        pair = CachePair(main, draft, [UNKNOWN] * pair_offset(main))
        if draft is not None:
            pair.draft_start = pair.main_offset - pair_offset(draft)

    def write_back():
        """Put the layers back in the user's list as mlx-lm's own classes; remember their tokens.

        The caller has fed the main layers every token, the last one too (mlx-lm's state after a call).
        """
        in_list = to_mlx_lm(pair.main + (pair.draft if draft is not None else []))
        layers[:] = map_leaves(in_list, lambda c: c.to_rotating() if isinstance(c, SlackRotatingCache) else c)
        _remember(layers, num_main, pair, pair.draft if draft is None else None)

    return pair, write_back


def _adopted(layers: list, known: _Known | None, role: str) -> list:
    """A list's layers, its ArraysCaches taken over as RecurrentCaches (see recurrent.py) at the list's length."""
    counted = [c.offset for c in leaves(layers) if hasattr(c, "offset")]
    if counted:
        offset = counted[0]
    elif known is not None:
        offset = len(known.tokens) if role == "main" else len(known.tokens) - known.draft_start
    elif all(c.empty() for c in leaves(layers)):
        offset = 0
    else:
        raise ValueError(
            f"prompt_cache's {role} layers hold recurrent states of unknown length (filled outside mlx_spec): "
            "make one with make_prompt_cache(model, draft_model)"
        )
    return adopt(list(layers), offset)


def save_prompt_cache(file_name: str, cache: CachePair | list[Any], metadata: dict[str, str] | None = None):
    """Save a prompt cache to a file, as mlx-lm's save_prompt_cache does (safetensors).

    A CachePair, or a flat list mlx_spec has used, is saved with the tokens it
    stands for and the models it belongs to, so that `load_prompt_cache` gives
    back a cache that continues the conversation and refuses other models.
    mlx-lm's load_prompt_cache reads the layers too, except a CachePair's
    rotating layers (mlx_spec's SlackRotatingCache; a flat list holds mlx-lm's own).

    Args:
        file_name (str): The ``.safetensors`` file name.
        cache (CachePair or List[Any]): The cache: a CachePair or mlx-lm's flat list of layers.
        metadata (Dict[str, str], optional): Metadata to save along with the cache.
    """
    metadata = dict(metadata or {})
    if isinstance(cache, CachePair):
        layers = cache.main + (cache.draft or [])
        info = dict(kind="pair", num_main=len(cache.main), draft_start=cache.draft_start, models=cache.models)
        tokens = cache.tokens
    else:
        layers, known = list(cache), _known_about(cache)
        info = tokens = None
        if known is not None:
            info = dict(kind="list", num_main=known.num_main, draft_start=known.draft_start, models=known.models)
            tokens = known.tokens
    if info is not None:
        metadata[_SAVED] = json.dumps(info)
        metadata[_SAVED_TOKENS] = base64.b64encode(np.array(tokens, "<i4").tobytes()).decode()
    mlx_lm_cache.save_prompt_cache(file_name, layers, metadata)


def load_prompt_cache(file_name: str, return_metadata: bool = False):
    """Load a prompt cache from a file written by save_prompt_cache (mlx_spec's or mlx-lm's).

    A CachePair saved by mlx_spec comes back as a CachePair; a flat list comes
    back as a flat list, as from mlx-lm. Used with models other than those it
    was made for, the cache is refused with a ValueError naming both.

    Args:
        file_name (str): The ``.safetensors`` file name.
        return_metadata (bool): Whether or not to return the metadata. Default: ``False``.

    Returns:
        CachePair or List[Any], or a tuple of it and the metadata (Dict[str, str]).
    """
    layers, metadata = _read_layers(file_name)
    info = json.loads(metadata.pop(_SAVED)) if _SAVED in metadata else None
    tokens = np.frombuffer(base64.b64decode(metadata.pop(_SAVED_TOKENS, "")), "<i4").tolist()
    if info is None:
        cache = layers
    elif info["kind"] == "pair":
        num_main = info["num_main"]
        cache = CachePair(layers[:num_main], layers[num_main:] or None, tokens, info["draft_start"], info["models"])
    else:
        cache = layers
        pair = CachePair(layers[: info["num_main"]], None, tokens, info["draft_start"], info["models"])
        _remember(layers, info["num_main"], pair, None)
    return (cache, metadata) if return_metadata else cache


def _read_layers(file_name: str) -> tuple[list[Any], dict[str, str]]:
    """mlx-lm's prompt cache format: each layer's state, its class name, and which leaves are scalars."""
    arrays, file_metadata = mx.load(str(file_name), return_metadata=True)
    metadata, class_names, scalars = tree_unflatten(list(file_metadata.items()))
    for position, kind in scalars[1:]:
        array = arrays[position]
        if kind == "scalar":
            arrays[position] = array.item()
        elif kind == "string":
            arrays[position] = "".join(chr(i) for i in array.tolist())
        elif kind == "none":
            arrays[position] = None
        else:
            raise ValueError(f"{file_name}: unknown kind of cache value {kind!r}")
    states = tree_unflatten(list(arrays.items()))
    return [_cache_class(name, file_name).from_state(state) for name, state in zip(class_names, states)], metadata


def _cache_class(name: str, file_name: str):
    ours = {c.__name__: c for c in (SlackRotatingCache, RecurrentCache)}
    if name in ours:
        return ours[name]
    cls = getattr(mlx_lm_cache, name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_state"):
        raise ValueError(f"{file_name}: unknown cache class {name!r}")
    return cls
