"""The adaptive draft length: the controller alone on synthetic rounds, then inside the engine."""

import numpy as np
import pytest
from tiny import make_model, perturbed, reference, spec

from mlx_spec import GenerationStats
from mlx_spec.adaptive import DraftController


def formula(alpha, k, a, b):
    """Expected tokens per second of draft length k: Leviathan et al.'s (1 - alpha^(k+1)) / ((1 - alpha) T(k))."""
    return (1 - alpha ** (k + 1)) / (1 - alpha) / (a + b * k)


def simulate(controller, alpha_of_round, a, b, num_rounds, seed=0):
    """Drive the controller: each draft token is accepted with probability alpha while all before it were."""
    rng = np.random.default_rng(seed)
    chosen = []
    for r in range(num_rounds):
        k = controller.choose()
        accepted = 0
        while accepted < k and rng.random() < alpha_of_round(r):
            accepted += 1
        controller.record(k, accepted, a + b * k)
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
        c.record(k, 0, 0.4 if k == 0 else 0.5 + 0.2 * k)  # a verify pass is dearer than a plain step
    assert c.cost() == pytest.approx((0.4, 0.5, 0.2), rel=0.05)  # the slope prior (0.12) pulls a little


def test_one_slow_round_neither_tilts_the_line_far_nor_counts_in_full():
    c = DraftController(cost_ratio=0.4)
    c.record(0, 0, 1.0)
    for _ in range(10):
        c.record(4, 4, 2.6)
    c.record(4, 4, 26.0)  # e.g. the machine was busy: counts as 1.5 x 2.6
    t0, a, b = c.cost()
    weights = [0.95**i for i in range(1, 11)]
    assert a + 4 * b == pytest.approx((2.6 * sum(weights) + 1.5 * 2.6) / (sum(weights) + 1))
    assert b == pytest.approx(0.4, rel=0.05)  # one length seen: the prior slope T0 * cost_ratio


def test_a_round_without_a_time_teaches_acceptance_only():
    c = DraftController()
    for k in (3, 5):
        c.record(k, 1, 0.5 + 0.2 * k)
    c.record(1, 1, None)  # e.g. the draft caught up on skipped tokens in that round
    before = c.cost()
    assert c.tried[1] > 2.5 and c.accepted[1] > 2.5
    c2 = DraftController()
    for k in (3, 5):
        c2.record(k, 1, 0.5 + 0.2 * k)
    assert before == pytest.approx(c2.cost())
    assert c.tried[1] > 2.5 and c.accepted[1] > 2.5


def test_uses_the_prior_cost_ratio_until_two_lengths_were_seen():
    c = DraftController(cost_ratio=0.25)
    c.record(4, 2, 2.0)
    assert c.cost() == pytest.approx((1.0, 1.0, 0.25))  # T0 unseen: taken as A
    c.record(0, 0, 0.8)
    assert c.cost() == pytest.approx((0.8, 2.0 - 4 * 0.2, 0.2))  # B = T0 * ratio, the line through the mean


def test_one_bad_first_round_does_not_stop_drafting():
    c = DraftController()
    c.record(3, 0, 1.9)
    c.record(0, 0, 1.0)
    # prior acceptance 0.8 over 4 rounds: after one miss a1 is still about 0.56
    assert c.acceptance()[0] == pytest.approx((0 + 2 * (3.2 / 5)) / 3)
    assert c.choose() == 1  # E(1) = 1.43 tokens for T(1) = 1.3 plain steps: keep drafting
    dear = DraftController()
    dear.record(3, 0, 3.0)
    dear.record(0, 0, 1.0)
    assert dear.choose() == 0  # unless drafting is dear


def test_probes_back_off_while_plain_decoding_keeps_winning():
    c = DraftController(probe_every=4, max_probe_gap=16, cost_ratio=1.0)
    c.record(3, 0, 4.0)
    chosen = []
    for _ in range(80):
        k = c.choose()
        chosen.append(k)
        c.record(k, 0, 1.0 if k == 0 else 2.0 + 1.0 * k)
    probes = [i for i, k in enumerate(chosen) if k > 0 and (i == 0 or chosen[i - 1] == 0)]
    assert all(chosen[i + 1] == 1 for i in probes)  # two rounds: one catches up, one is timed
    gaps = [b - a - 2 for a, b in zip(probes, probes[1:])]
    assert set(chosen) == {0, 1}
    assert probes[0] == 4 and gaps[:3] == [8, 16, 16]


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
    assert c.choose() == 3
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
    stranger = make_model("qwen2", layers=4, seed=5)  # unrelated weights
    stats = GenerationStats()
    prompt = [1, 5, 9, 22, 3]
    assert spec(prompt, main, stranger, max_tokens=120, stats=stats) == reference(main, prompt, 120)
    assert stats.acceptance_rate < 0.1
    assert stats.draft_lengths[0] > 0.7 * stats.num_rounds
