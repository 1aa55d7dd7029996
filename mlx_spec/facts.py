"""What the process knows of each model and each pair of models, while they live.

Two registries, keyed by `id()`: one of `ModelFacts` per model, one of
`PairFacts` per (main, draft) pair. A model's entry is made the first time a
fact of it, or of a pair it is part of, is stored; one `weakref.finalize` per
model then drops that entry and every pair entry the model is part of when the
model is garbage collected, so facts never outlive their model and an `id()`
reused by a later object starts from nothing.

The entries hold no model: only ids and plain data (a tokenizer, strings,
numbers, what the adaptive controller learnt), so keeping facts never keeps
a model alive. This module imports nothing else of mlx_spec (no import cycle):
the types of the facts that other modules define are named in comments.
"""

import weakref
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelFacts:
    """What the process knows of one model."""

    # load.load: what it was given (folder, hub id or .gguf file), load.model_name's line, the tokenizer;
    # None for a model built in code
    source: str | None = None
    description: str | None = None
    tokenizer: Any = None
    fingerprint: str | None = None  # cache.fingerprint, once computed
    mtp: Any = None  # mtp.MTPHead: the model's MTP layer, once loaded (draft_model="mtp")
    # adaptive.MainFacts of this model as the main model (plain and lookup rounds), per store: None the
    # process's own, (name,) that of adaptive.kept_apart(name)
    main_facts: dict = field(default_factory=dict)
    group: Any = None  # load.load(..., group=): the mx.distributed group the model is split over


@dataclass
class PairFacts:
    """What the process knows of one (main, draft) pair."""

    checked: bool = False  # load.check_draft compared the vocabularies
    incompatible: tuple | None = None  # then: IncompatibleDraftError's args, or None where the draft serves
    learnt: dict = field(default_factory=dict)  # adaptive.Learnt of the pair, per store (as ModelFacts.main_facts)


_models: dict[int, ModelFacts] = {}  # id(model) -> its facts
_pairs: dict[tuple[int, int], PairFacts] = {}  # (id(main), id(draft)) -> their facts
_pairs_of: dict[int, set[tuple[int, int]]] = {}  # id(model) -> the keys of the pairs it is part of


def known(model) -> ModelFacts | None:
    """The model's facts, None while none were stored."""
    return _models.get(id(model))


def of(model) -> ModelFacts:
    """The model's facts, made (empty) the first time."""
    key = id(model)
    if key not in _models:
        _models[key] = ModelFacts()
        _pairs_of[key] = set()
        weakref.finalize(model, _drop, key)  # holds the id only, not the model
    return _models[key]


def known_pair(main_model, draft_model) -> PairFacts | None:
    """The pair's facts, None while none were stored."""
    return _pairs.get((id(main_model), id(draft_model)))


def pair(main_model, draft_model) -> PairFacts:
    """The pair's facts, made (empty) the first time; `draft_model` may be None (the main model alone)."""
    key = (id(main_model), id(draft_model))
    if key not in _pairs:
        for model in (main_model, draft_model):
            if model is not None:
                of(model)
                _pairs_of[id(model)].add(key)
        _pairs[key] = PairFacts()
    return _pairs[key]


def _drop(key: int):
    """A model was garbage collected: forget it and every pair it was part of."""
    _models.pop(key, None)
    for pair_key in _pairs_of.pop(key, ()):
        _pairs.pop(pair_key, None)
        for other in pair_key:
            if other != key and other in _pairs_of:
                _pairs_of[other].discard(pair_key)
