"""What the process knows of each model and each pair (mlx_spec.facts): kept while the models live, then dropped."""

import gc
import weakref

from tiny import make_model

from mlx_spec import facts
from mlx_spec.adaptive import learnt_for
from mlx_spec.cache import fingerprint


def known_everywhere(main, draft):
    """Store every kind of fact of `main`, `draft` and their pairs, as load, cache and adaptive do."""
    for model in (main, draft):
        fingerprint(model)
    for other in (draft, None):
        learnt_for(main, other)
    verdict = facts.pair(main, draft)
    verdict.checked, verdict.incompatible = True, ("main and draft have different vocabularies",)
    return {(id(main), id(draft)), (id(main), id(None))}


def test_a_models_facts_and_its_pairs_go_with_it():
    main, draft = make_model("llama", layers=1), make_model("llama", layers=1, seed=1)
    main_id, draft_id = id(main), id(draft)
    pairs = known_everywhere(main, draft)
    assert {main_id, draft_id} <= set(facts._models) and pairs <= set(facts._pairs)
    main_facts = facts.of(main).main_facts[None]

    del draft
    gc.collect()
    assert draft_id not in facts._models and (main_id, draft_id) not in facts._pairs  # its pair goes with it
    assert (main_id, id(None)) in facts._pairs and facts.of(main).main_facts[None] is main_facts  # not the rest
    assert (main_id, draft_id) not in facts._pairs_of[main_id]

    del main
    gc.collect()
    assert main_id not in facts._models and main_id not in facts._pairs_of
    assert not pairs & set(facts._pairs)


def test_facts_do_not_keep_models_alive():
    main, draft = make_model("llama", layers=1), make_model("llama", layers=1, seed=1)
    known_everywhere(main, draft)
    alive = weakref.ref(main), weakref.ref(draft)
    del main, draft
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_two_models_get_entries_of_their_own():
    a, b = make_model("llama", layers=1), make_model("llama", layers=1, seed=1)
    assert facts.known(a) is None and facts.known_pair(a, b) is None  # nothing is made by asking
    assert facts.of(a) is not facts.of(b) and facts.of(a) is facts.of(a)
    assert fingerprint(a) != fingerprint(b)
    assert facts.of(a).fingerprint == fingerprint(a) and facts.of(b).fingerprint == fingerprint(b)
    assert facts.pair(a, b) is not facts.pair(b, a) and facts.pair(a, b) is facts.known_pair(a, b)
    assert learnt_for(a, b).main is not learnt_for(b, a).main
    assert learnt_for(a, b).main is facts.of(a).main_facts[None]
    assert learnt_for(a, b) is facts.pair(a, b).learnt[None]
