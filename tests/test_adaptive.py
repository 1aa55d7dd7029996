"""The adaptive source and draft length: the controller alone on synthetic rounds, then inside the engine."""

import gc

import numpy as np
import pytest
from tiny import make_model, perturbed, reference, spec

from mlx_spec import GenerationStats, facts
from mlx_spec.adaptive import (
    CARRY,
    DRAFT,
    DRAFT_PRIOR,
    LAZY,
    LENGTH_DECAY,
    LENGTH_PRIOR,
    LOOKUP,
    MIN_DRAFT_SLOPE,
    PLAIN,
    RELATIVE_PRIOR,
    UNTRIED,
    VERIFY_SLOPE,
    Choice,
    Controller,
    Learnt,
    MainFacts,
    RelativeAcceptance,
    bucket_of,
    kept_apart,
    learnt_for,
)
from mlx_spec.lookup import Match


def DraftController(max_draft=10, **kwargs):
    """The controller of a draft model alone (no lookup)."""
    return Controller(max_draft=max_draft, max_lookup=0, **kwargs)


def record(c, k, accepted, seconds):
    c.record(Choice(DRAFT if k else PLAIN, k), accepted, seconds)


def line(c):
    """(T0, A, B) of the drafting cost line (which prices a length never tried at UNTRIED of it)."""
    t1, t2 = (c.round_seconds(DRAFT, k) / (1.0 if k in c.learnt.draft_cost.by_length else UNTRIED) for k in (1, 2))
    return c.plain_seconds(), t1 - (t2 - t1), t2 - t1


def formula(alpha, k, a, b):
    """Expected tokens per second of draft length k: Leviathan et al.'s (1 - alpha^(k+1)) / ((1 - alpha) T(k))."""
    return (1 - alpha ** (k + 1)) / (1 - alpha) / (a + b * k)


def simulate(controller, alpha_of_round, a, b, num_rounds, seed=0, seconds=None):
    """Drive the controller: each draft token is accepted with probability alpha while all before it were.
    A round of k drafts takes a + b k, or `seconds(k)`."""
    rng = np.random.default_rng(seed)
    chosen = []
    for r in range(num_rounds):
        choice = controller.choose()
        k = choice.num_draft
        accepted = 0
        while accepted < k and rng.random() < alpha_of_round(r):
            accepted += 1
        controller.record(choice, accepted, a + b * k if seconds is None else seconds(k))
        chosen.append(k)
    return chosen


@pytest.mark.parametrize("alpha, a, b", [(0.8, 1.0, 0.1), (0.9, 1.0, 0.05), (0.6, 1.0, 0.2), (0.95, 1.0, 0.3)])
def test_picks_the_draft_length_that_maximises_the_formula(alpha, a, b):
    chosen = simulate(DraftController(), lambda r: alpha, a, b, 400)
    rates = {k: formula(alpha, k, a, b) for k in range(0, 11)}
    best = max(rates.values())
    late = chosen[200:]
    assert np.mean([rates[k] for k in late]) > 0.95 * best, (sorted(set(late)), max(rates, key=rates.get))


def test_learns_plain_and_drafting_costs_apart():
    c = DraftController()
    for k in (3, 5, 1, 4, 0, 2, 0) * 4:
        record(c, k, 0, 0.4 if k == 0 else 0.5 + 0.2 * k)  # a verify pass is dearer than a plain step
    assert line(c) == pytest.approx((0.4, 0.5, 0.2), rel=0.05)  # the slope prior (0.12) pulls a little


def test_one_slow_round_neither_tilts_the_line_far_nor_counts_in_full():
    c = DraftController(cost_ratio=0.4)
    record(c, 0, 0, 1.0)
    for _ in range(10):
        record(c, 4, 4, 2.6)
    record(c, 4, 4, 26.0)  # e.g. the machine was busy: counts as 1.5 x 2.6
    t0, a, b = line(c)
    weights = [0.95**i for i in range(1, 11)]
    assert a + 4 * b == pytest.approx((2.6 * sum(weights) + 1.5 * 2.6) / (sum(weights) + 1))
    assert b == pytest.approx(0.4, rel=0.05)  # one length seen: the prior slope T0 * cost_ratio


def test_plain_rounds_that_wait_for_two_steps_or_none_are_learnt_at_their_mean():
    # queued plain steps: a round that finds its token ready leaves the next one waiting for two steps
    c = DraftController()
    for seconds in (0.5, 0.5, 0.1, 0.9) * 20:
        record(c, 0, 0, seconds)
    assert c.plain_seconds() == pytest.approx(0.5, rel=0.03)
    record(c, 0, 0, 10.0)  # beyond two steps: an outlier, it counts as 1.5 x two steps
    assert c.plain_seconds() == pytest.approx(0.5 + (1.5 - 0.5) * 0.05, rel=0.03)


def test_a_round_without_a_time_teaches_acceptance_only():
    c = DraftController()
    for k in (3, 5):
        record(c, k, 1, 0.5 + 0.2 * k)
    record(c, 1, 1, None)  # e.g. the draft caught up on skipped tokens in that round
    c2 = DraftController()
    for k in (3, 5):
        record(c2, k, 1, 0.5 + 0.2 * k)
    assert line(c) == pytest.approx(line(c2))
    acceptance = c.learnt.draft
    assert acceptance.tried[1] > 2.5 and acceptance.accepted[1] > 2.5


def test_uses_the_prior_cost_ratio_until_two_lengths_were_seen():
    c = DraftController(cost_ratio=0.25)
    record(c, 4, 2, 2.0)
    assert line(c) == pytest.approx((1.0, 1.0, 0.25))  # T0 unseen: taken as A
    record(c, 0, 0, 0.8)
    assert line(c) == pytest.approx((0.8, 2.0 - 4 * 0.2, 0.2))  # B = T0 * ratio, the line through the mean


def test_one_bad_first_round_does_not_stop_drafting():
    c = DraftController()
    record(c, 3, 0, 1.9)
    record(c, 0, 0, 1.0)
    # prior acceptance 0.85 over 4 rounds: after one miss the pooled rate is 3.4 / 5, and a1 that times
    # position 1's rate relative to it, which leans on 1 with RELATIVE_PRIOR rounds: still about 0.59
    pooled, w = 4 * DRAFT_PRIOR / 5, RELATIVE_PRIOR
    assert c.learnt.draft.rates(1)[0] == pytest.approx(pooled * (0 + w * pooled) / (DRAFT_PRIOR + w * pooled))
    assert c.choose() == Choice(DRAFT, 2)  # E(2) = 2.0 tokens for T(2) = 1.6 plain steps: keep drafting
    dear = DraftController()
    record(dear, 3, 0, 3.0)
    record(dear, 0, 0, 1.0)
    assert dear.choose() == Choice(PLAIN, 0)  # unless drafting is dear


def test_probes_back_off_while_plain_decoding_keeps_winning():
    c = DraftController(probe_every=4, max_probe_gap=16, cost_ratio=1.0)
    record(c, 3, 0, 4.0)
    chosen = []
    for _ in range(80):
        k = c.choose().num_draft
        chosen.append(k)
        record(c, k, 0, 1.0 if k == 0 else 2.0 + 1.0 * k)
    probes = [i for i, k in enumerate(chosen) if k > 0 and (i == 0 or chosen[i - 1] == 0)]
    assert all(chosen[i + 1] == 1 for i in probes)  # two rounds: one catches up, one is timed
    gaps = [b - a - 2 for a, b in zip(probes, probes[1:])]
    assert set(chosen) == {0, 1}
    assert probes[0] == 4 and gaps[:3] == [8, 16, 16]


def test_asking_whether_plain_decoding_goes_on_changes_nothing():
    """A queued plain round asks `keeps_plain`: the answer is `choose`'s, and asking neither starts a probe
    nor moves the probes' schedule."""
    c = DraftController(probe_every=4, max_probe_gap=16, cost_ratio=1.0)
    record(c, 3, 0, 4.0)
    chosen = []
    for _ in range(40):
        answers = {c.keeps_plain() for _ in range(3)}
        k = c.choose().num_draft
        assert answers == {k == 0}
        chosen.append(k)
        record(c, k, 0, 1.0 if k == 0 else 2.0 + 1.0 * k)
    probes = [i for i, k in enumerate(chosen) if k > 0 and (i == 0 or chosen[i - 1] == 0)]
    assert probes[:3] == [4, 14, 32]  # as without asking (the test above): gaps of 8 and 16


def test_falls_to_plain_decoding_when_the_draft_is_as_slow_as_the_main_model():
    chosen = simulate(DraftController(cost_ratio=1.0), lambda r: 0.6, 1.0, 1.0, 200)
    late = chosen[50:]
    assert late.count(0) > 0.8 * len(late)
    assert set(late) <= {0, 1}  # plain, and a one-token probe now and then
    assert 1 in late


def test_recovers_when_acceptance_rises():
    c = DraftController()
    hard = simulate(c, lambda r: 0.05, 1.0, 0.3, 100)
    assert hard[-40:].count(0) > 30
    easy = simulate(c, lambda r: 0.97, 1.0, 0.3, 100, seed=1)
    assert np.mean(easy[-30:]) >= 4


def test_first_round_drafts_and_choices_stay_in_range():
    c = DraftController(max_draft=5, first_draft=3)
    assert c.choose() == Choice(DRAFT, 3)
    chosen = simulate(c, lambda r: 0.99, 1.0, 0.01, 50)
    assert max(chosen) == 5 and min(chosen) >= 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_greedy_stays_exact_with_adaptive_drafting(arch):
    main = make_model(arch, layers=4)
    draft = perturbed(main, 0.005)
    for prompt in ([1, 5, 9, 22, 3], [40, 41, 42]):
        stats = GenerationStats()
        assert spec(prompt, main, draft, max_tokens=60, stats=stats) == reference(main, prompt, 60)
        assert stats.total_draft_tokens > 0


def test_a_draft_that_always_disagrees_ends_up_decoding_plainly():
    main = make_model("qwen2", layers=4, seed=0)
    # unrelated weights: it never agrees. Twice the layers: on tiny models host work dominates, and where
    # a draft round was timed at about a plain step, the ~4 % floor of its expected acceptance made drafting
    # look worth it (one CI run drafted in 51 rounds of 120, one of them 10 tokens: most likely so)
    stranger = make_model("qwen2", layers=8, seed=5)
    stats = GenerationStats()
    prompt = [1, 5, 9, 22, 3]
    assert spec(prompt, main, stranger, max_tokens=120, stats=stats, prompt_lookup=False) == reference(
        main, prompt, 120
    )
    assert stats.acceptance_rate < 0.1
    assert stats.draft_lengths[0] > 0.7 * stats.num_rounds


# --- lookup: a second source ----------------------------------------------------------------------


def simulate_sources(c, lookup_alpha, draft_alpha, match_length, costs, num_rounds, seed=0):
    """Drive a controller with both sources; costs: {source: (A, B)}, T0 = costs[PLAIN][0]. Returns the choices.

    A round that had a match and used another source tells the controller what the copy would have
    accepted of the tokens it emitted, as the engine does."""
    rng = np.random.default_rng(seed)
    chosen = []

    def run(alpha, limit):
        n = 0
        while n < limit and rng.random() < alpha:
            n += 1
        return n

    for _ in range(num_rounds):
        match = Match(10, match_length) if match_length else None
        choice = c.choose(match)
        accepted = run(lookup_alpha if choice.source == LOOKUP else draft_alpha, choice.num_draft)
        unused = None
        if match is not None and choice.source != LOOKUP:
            unused = (match, accepted + 1, run(lookup_alpha, accepted + 1))
        a, b = costs[choice.source]
        c.record(choice, accepted, a + b * choice.num_draft, unused=unused)
        chosen.append(choice)
    return chosen


COSTS = {PLAIN: (1.0, 0.0), DRAFT: (1.1, 0.35), LOOKUP: (1.05, 0.05)}


def test_a_call_starts_with_a_short_round_whatever_was_learnt():
    """The first token waits for the first round: a call starts with at most 3 draft tokens, even where
    the pair has learnt that 8 pay, and goes on at the learnt length."""
    learnt = Learnt()  # a draft of a twentieth of the main model's bytes, its steps as cheap
    simulate_sources(Controller(learnt, max_draft=8, cost_ratio=0.05), 0.0, 0.98, 0, {**COSTS, DRAFT: (1.0, 0.05)}, 60)
    c = Controller(learnt, max_draft=8, cost_ratio=0.05)
    first = c.choose()
    c.record(first, first.num_draft, 1.2)
    assert first == Choice(DRAFT, 3) and c.choose() == Choice(DRAFT, 8)
    c = Controller(learnt, max_draft=0, has_draft=False, max_lookup=16)
    assert c.choose(Match(10, 12)) == Choice(LOOKUP, 3, 4)  # a copying first round too


def test_a_cost_line_through_the_origin_does_not_make_plain_rounds_free():
    """Draft rounds timed so that their fitted line has no intercept left no plain round time: a division
    by zero. The mean round at the prior slope stands in for T0 then."""
    c = Controller(max_draft=10)
    for _ in range(20):
        c.record(Choice(DRAFT, 2), 2, 0.01)
        c.record(Choice(DRAFT, 10), 10, 10.0)
    assert c.plain_seconds() > 0
    assert c.choose().source in (DRAFT, PLAIN)


@pytest.mark.parametrize("source, prior", [(LOOKUP, 0.1), (DRAFT, 0.02)])
def test_no_round_is_expected_to_cost_less_than_a_plain_step(source, prior):
    """Rounds timed only at one long length leave the slope to its prior; where that prior is steeper than
    the rounds, the line's intercept fell below a plain step (to 0 here) and made short rounds look free.
    (A draft's slope stays above MIN_DRAFT_SLOPE of its prior: 0.01 of T0 here, the rounds' 0.0125 above it.)"""
    c = Controller(max_draft=16, max_lookup=16, cost_ratio=prior)
    c.record(Choice(PLAIN, 0), 0, 1.0)
    for _ in range(20):
        c.record(Choice(source, 16), 16, 1.2)
    on_line = 1.0 + 0.2 / 16
    if source == DRAFT:  # a draft length never tried: UNTRIED of the line, but a draft step above a plain one
        on_line = max(UNTRIED * on_line, 1.0 + MIN_DRAFT_SLOPE * prior)
    assert c.round_seconds(source, 1) == pytest.approx(on_line) and on_line > 1.0
    assert c.round_seconds(source, 16) == pytest.approx(1.2)


def test_draft_rounds_timed_at_a_plain_step_do_not_make_every_length_as_cheap_as_one():
    """On tiny models host work dominates: draft rounds of any length were timed below a plain step. The
    lengths tried cost what they took, less than a plain step; the floor flattened the line at T0 for the
    others; and a draft that never agrees drafted 2 tokens a round for ever on its floor of expected
    acceptance (about 0.04). A round costs at least a plain step and MIN_DRAFT_SLOPE of the prior slope
    per draft token."""
    c = DraftController(cost_ratio=0.3)
    chosen = simulate(c, lambda r: 0.0, 1.0, 0.0, 120, seconds=lambda k: 1.0 if k == 0 else 0.95)
    assert c.plain_seconds() == pytest.approx(1.0)
    for k in range(1, 11):
        assert c.round_seconds(DRAFT, k) == pytest.approx(1.0 + MIN_DRAFT_SLOPE * 0.3 * k)
    assert chosen[-60:].count(0) > 50 and max(chosen[-60:]) == 1  # plain, but for the probes


def test_a_length_already_tried_costs_what_its_rounds_took():
    """A verify pass is not a line in k: on this CPU 16 rows cost less than 9 (OpenBLAS works in blocks of
    rows). Lengths tried cost what their rounds took, leaning a little on the line; the line prices the
    others; and the choice follows: a sure copy takes the cheap 15 tokens."""
    c = Controller(max_draft=0, has_draft=False, max_lookup=16)
    c.record(Choice(PLAIN, 0), 0, 1.0)
    measured = {4: 1.8, 8: 2.25, 15: 1.68}
    for _ in range(10):
        for k, seconds in measured.items():
            c.record(Choice(LOOKUP, k, 4), k, seconds)
    a, b = c.learnt.main.lookup_cost.line(VERIFY_SLOPE * 1.0, floor=1.0)
    weight = sum(LENGTH_DECAY**i for i in range(10))
    for k, seconds in measured.items():
        expected = (weight * seconds + LENGTH_PRIOR * (a + b * k)) / (weight + LENGTH_PRIOR)
        assert c.round_seconds(LOOKUP, k) == pytest.approx(expected)
    assert c.round_seconds(LOOKUP, 15) < c.round_seconds(LOOKUP, 8) - 0.4  # what no line can say
    assert c.round_seconds(LOOKUP, 12) == pytest.approx(a + b * 12)  # never tried: the line's
    assert c.choose(Match(10, 8)) == Choice(LOOKUP, 15, 4)


def test_a_draft_length_never_tried_gets_a_round_where_the_line_overprices_it():
    """A verify pass is not a line in k: here 7 drafts cost 10 % more than 6, and 8 drafts 30 % more (a
    block of 8 rows, then 9). Tried at 6 and 8, the line prices 7 above what it costs; priced at UNTRIED of
    the line, 7 gets a round, and then wins at what it took."""
    seconds = {0: 1.0, 6: 3.38, 7: 3.73, 8: 4.39}
    c = DraftController(max_draft=8, cost_ratio=0.3)
    record(c, 0, 0, 1.0)
    for _ in range(4):
        for k in (6, 8):
            record(c, k, k, seconds[k])
    t0, a, b = line(c)
    assert a + 7 * b > seconds[7] + 0.05  # the line overprices 7
    assert c.round_seconds(DRAFT, 7) == pytest.approx(UNTRIED * (a + 7 * b))
    assert c.choose() == Choice(DRAFT, 7)
    record(c, 7, 7, seconds[7])
    assert c.round_seconds(DRAFT, 7) < a + 7 * b and c.choose() == Choice(DRAFT, 7)


def test_stores_kept_apart_learn_apart():
    """The benchmark runs each variant as if in a process of its own."""
    main, draft = make_model("llama", layers=1), make_model("llama", layers=1, seed=1)
    shared = learnt_for(main, draft)
    with kept_apart("a"):
        apart = learnt_for(main, draft)
        assert apart is not shared and apart.main is not shared.main
        assert learnt_for(main, None).main is apart.main  # within a store, the main model's facts are shared
    with kept_apart("b"):
        assert learnt_for(main, draft) is not apart
    with kept_apart("a"):
        assert learnt_for(main, draft) is apart  # and kept for the next time
    assert learnt_for(main, draft) is shared


def test_match_lengths_fall_into_buckets_and_realigned_copies_into_their_own():
    assert [bucket_of(Match(0, n)) for n in (1, 2, 3, 4, 7, 8, 16)] == [0, 1, 2, 3, 3, 4, 4]
    assert [bucket_of(Match(0, n, realigned=True)) for n in (7, 5, 4, 2)] == [5, 5, 6, 6]


def test_a_copy_realigned_on_few_agreeing_tokens_is_not_trusted_as_an_edited_copy():
    """Prose that shares 2 of its last 8 tokens with an earlier passage is not copying it: the draft serves."""
    c = Controller(max_draft=8, max_lookup=16, cost_ratio=0.35)
    simulate_sources(c, 0.0, 0.8, 0, COSTS, 40)  # no match yet: drafting rounds, 80 % accepted
    assert c.choose(Match(10, 2, realigned=True)).source == DRAFT
    choice = c.choose(Match(10, 7, realigned=True))  # 7 of 8 agree: a copy through a renamed identifier
    assert choice.source == LOOKUP and choice.num_draft >= 4


def test_copies_long_stretches_where_the_conversation_repeats():
    c = Controller(max_draft=8, max_lookup=16, cost_ratio=0.35)
    chosen = simulate_sources(c, 0.98, 0.7, 12, COSTS, 100)
    late = chosen[30:]
    assert all(ch.source == LOOKUP for ch in late)
    assert np.mean([ch.num_draft for ch in late]) > 10


def test_falls_back_to_the_draft_model_when_lookup_keeps_failing():
    c = Controller(max_draft=8, max_lookup=16, cost_ratio=0.35)
    chosen = simulate_sources(c, 0.0, 0.8, 2, COSTS, 200)
    late = chosen[50:]
    assert sum(ch.source == DRAFT for ch in late) > 0.85 * len(late)
    assert sum(ch.source == LOOKUP for ch in chosen) < 5  # the drafting rounds show the copy failing


def test_a_match_is_judged_by_the_rounds_that_did_not_use_it():
    """What the draft's rounds emitted tells whether a copy would have been accepted, without a round of it:
    where every copy would have been, the controller copies after few rounds; where none would have been,
    it never tries one. Without those observations a doubtful match keeps to its prior."""
    for lookup_alpha, copies in ((1.0, True), (0.0, False)):
        c = Controller(max_draft=8, max_lookup=16, cost_ratio=0.35)
        chosen = simulate_sources(c, lookup_alpha, 0.8, 1, COSTS, 40)  # one-token matches: prior 0.2
        assert any(ch.source == LOOKUP for ch in chosen) == copies
        if copies:
            first = next(i for i, ch in enumerate(chosen) if ch.source == LOOKUP)
            assert first < 10 and all(ch.source == LOOKUP for ch in chosen[first:])
            assert chosen[-1].num_draft == 16
    c = Controller(max_draft=8, max_lookup=16, cost_ratio=0.35)
    simulate_sources(c, 0.0, 0.8, 0, COSTS, 40)  # no match: nothing learnt of copies
    assert c.choose(Match(10, 1)).source == DRAFT


def test_falls_back_to_plain_decoding_when_lookup_keeps_failing_and_there_is_no_draft():
    c = Controller(max_draft=0, max_lookup=16, has_draft=False)
    chosen = simulate_sources(c, 0.0, 0.0, 1, COSTS, 200)
    late = chosen[50:]
    assert sum(ch.source == PLAIN for ch in late) > 0.9 * len(late)
    assert not any(ch.source == DRAFT for ch in chosen)


def test_buckets_learn_apart():
    """Short matches that fail do not stop copying after long matches that succeed."""
    c = Controller(max_draft=0, max_lookup=16, has_draft=False)
    simulate_sources(c, 0.0, 0.0, 1, COSTS, 60)
    assert c.choose(Match(10, 1)).source == PLAIN
    choice = c.choose(Match(10, 12))
    assert choice.source == LOOKUP and choice.bucket == 4 and choice.num_draft >= 4  # prior 0.8, cheap rows


def test_the_draft_catches_up_on_a_prompt_only_where_drafting_repays_it():
    """With lookup on the draft starts without the prompt. Nothing known, half of a long reply is expected
    to be drafted, which repays reading a 600-token prompt; a 2-token reply does not, nor a reply that
    copies nearly everything. Without a backlog the draft serves what the copy does not."""
    assert Controller(max_draft=8).choose(None, behind=600, left=256) == Choice(DRAFT, 3)
    assert Controller(max_draft=8).choose(None, behind=600, left=2) == Choice(PLAIN, 0)
    facts = MainFacts()
    simulate_sources(Controller(Learnt(facts), max_draft=0, has_draft=False), 0.97, 0.0, 12, COSTS, 40)
    c = Controller(Learnt(facts), max_draft=8)
    assert c.learnt.main.uncopied.value(0.5) < 0.2
    assert c.choose(None, behind=600, left=150) == Choice(PLAIN, 0)
    assert c.choose(Match(10, 12), behind=600, left=150).source == LOOKUP
    assert c.choose(None, behind=2, left=150).source == DRAFT


def test_a_copy_puts_off_the_drafts_reading_of_a_long_prompt():
    """Where the conversation offers a copy that beats plain decoding, a round copies rather than make the
    draft read a long prompt first (600 tokens: more than LAZY plain steps), even the first round of a
    process, which otherwise drafts to learn: a reply that copies its prompt need never pay that reading.
    Without such a copy the draft catches up; a short backlog does not wait either."""
    c = Controller(max_draft=8)
    assert c.choose(Match(10, 12), behind=600, left=256).source == LOOKUP
    assert c.choose(Match(10, 1), behind=600, left=256).source == LOOKUP  # prior 0.2: still above plain
    assert c.choose(None, behind=600, left=256) == Choice(DRAFT, 3)
    assert c.catch_up_seconds(600) > LAZY * c.plain_seconds() > c.catch_up_seconds(100)
    assert Controller(max_draft=8).choose(Match(10, 12), behind=100, left=256) == Choice(DRAFT, 3)
    for _ in range(30):  # copies of one token keep failing: below plain, they no longer put the draft off
        c.record(Choice(LOOKUP, 1, 0), 0, 1.1)
    assert c.choose(Match(10, 1), behind=600, left=256).source == DRAFT


def test_a_probe_catches_the_draft_up_on_a_backlog_only_after_a_long_plain_stretch():
    """A draft that failed and then sat out a copied prompt is probed again, but only once the plain
    stretch is four times as long as its catching up (3 s here) takes; a draft just behind after 4."""

    def probe_after(behind):
        c = Controller(max_draft=8)
        for _ in range(10):
            c.record(Choice(DRAFT, 3), 0, 1.0)
        c.record(Choice(DRAFT, 3), 0, 1.0, catch_up=(100, 1.0))  # 0.01 s per token
        for n in range(200):
            choice = c.choose(None, behind=behind + n, left=500)
            if choice.source == DRAFT:
                return n
            c.record(choice, 0, 0.3)

    assert probe_after(5) == 4
    assert probe_after(301) == 47  # the first n with (300 + n) * 0.01 <= 0.3 n / 4


def test_only_rounds_that_copied_nothing_count_as_text_left_to_the_draft():
    """The main model's own token after a copy comes with the copy; a draft could not have served it."""
    c = Controller(max_draft=8)
    for _ in range(20):
        c.record(Choice(LOOKUP, 8, 4), 8, 0.7)
    assert c.learnt.main.uncopied.value(0.5) == 0.0
    c.record(Choice(LOOKUP, 8, 4), 0, 0.7)
    c.record(Choice(PLAIN, 0), 0, 0.3)
    copied = 9 * sum(0.95**i for i in range(2, 22))  # 20 rounds of 9 tokens, decayed by the two since
    assert c.learnt.main.uncopied.value(0.5) == pytest.approx(1.95 / (1.95 + copied))


def test_catching_up_is_timed_apart_and_learnt_per_token():
    c = Controller(max_draft=8, cost_ratio=0.3)
    record(c, 0, 0, 1.0)
    assert c.catch_up_seconds(101) == pytest.approx(100 * 0.05 * 0.3)  # the prior: a batched forward
    c.record(Choice(DRAFT, 3), 3, 1.9, catch_up=(400, 2.0))
    assert c.catch_up_seconds(101) == pytest.approx(0.5) and c.catch_up_seconds(1) == 0.0
    assert c.round_seconds(DRAFT, 3) == pytest.approx(1.9, rel=0.2)  # the round's own time, without the catch-up


def test_a_new_call_keeps_the_acceptance_learnt_before_as_a_prior_it_soon_outweighs():
    """Costs are facts of the machine and carry over whole; acceptance is a fact of the text, and a new
    call's text may be another: earlier calls' counts keep their rates at CARRY of their weight."""
    learnt = Learnt()
    simulate(Controller(learnt, max_draft=8), lambda r: 0.95, 1.0, 0.1, 100)
    learnt.main.lookup[4].record(16, 16)
    rates, tried, copied = learnt.draft.rates(8), sum(learnt.draft.tried), sum(learnt.main.lookup[4].tried)
    line = learnt.draft_cost.sums
    c = Controller(learnt, max_draft=8)
    assert sum(learnt.draft.tried) == pytest.approx(CARRY * tried)
    assert sum(learnt.main.lookup[4].tried) == pytest.approx(CARRY * copied)
    assert learnt.draft.rates(8) == pytest.approx(rates, abs=0.03) and learnt.draft_cost.sums == line
    chosen = simulate(c, lambda r: 0.0, 1.0, 0.1, 30)  # text the draft never agrees with
    assert chosen[:2] == [3, 8] and min(i for i, k in enumerate(chosen) if i > 0 and k < 8) <= 10  # 19 at full weight


# seconds of a round of k drafts on this CPU, in plain steps: the step from k = 1 to 2 is the dearest
CPU_ROUNDS = [1.0, 1.45, 2.0, 2.4, 2.7, 3.15, 3.4, 3.7, 4.4]


def test_a_position_not_drafted_to_of_late_follows_the_pooled_rate():
    """The acceptance stall: prose taught the draft's position 2 a low rate; the next call's text is code,
    drafted one token a round, all accepted. Position 2 follows the pooled rate those rounds raise."""
    acceptance = RelativeAcceptance(0.8)
    for r in range(40):
        acceptance.record(3, r % 2)  # prose: half the first tokens accepted, never a second one
    assert acceptance.rates(3)[1] < 0.3
    acceptance.weigh(CARRY)  # the next call
    for _ in range(15):
        acceptance.record(1, 1)
    assert acceptance.rates(3)[1] > 0.75  # with a rate of its own (Acceptance): 0.51


def test_after_prose_a_call_on_code_drafts_further_sooner():
    rounds = []
    for seed in range(8):
        learnt, cost = Learnt(), CPU_ROUNDS.__getitem__
        simulate(Controller(learnt, max_draft=8), lambda r: 0.5, 0, 0, 80, seed, cost)  # prose: k = 1 or plain
        rounds += simulate(Controller(learnt, max_draft=8), lambda r: 0.97, 0, 0, 15, seed, cost)  # code: k = 7
    assert np.mean(rounds) > 2.7  # 2.3 when each position kept a rate of its own


def test_lookup_facts_are_shared_by_every_pair_with_the_main_model():
    main, draft = make_model("llama", layers=1), make_model("llama", layers=1, seed=1)
    assert learnt_for(main, draft).main is learnt_for(main, None).main
    assert learnt_for(main, draft).draft is not learnt_for(main, None).draft


def test_what_was_learnt_carries_over_to_the_next_call_with_the_same_pair():
    main, draft = make_model("llama", layers=1), make_model("llama", layers=1, seed=1)
    learnt = learnt_for(main, draft)
    assert learnt_for(main, draft) is learnt and learnt_for(main, None) is not learnt
    first = Controller(learnt, max_draft=8)
    assert first.choose() == Choice(DRAFT, 3)  # nothing known: the first round drafts 3
    simulate_sources(first, 0.0, 0.3, 0, {**COSTS, DRAFT: (1.1, 0.8)}, 40)
    second = Controller(learnt_for(main, draft), max_draft=8)
    assert second.choose() != Choice(DRAFT, 3)  # it starts from what the first call learnt
    keys = {(id(main), id(draft)), (id(main), id(None))}
    assert keys <= set(facts._pairs)
    del main, learnt, first, second
    gc.collect()
    assert not keys & set(facts._pairs)  # dropped with the model
