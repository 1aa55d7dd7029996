"""The offline controller replay (benchmarks/replay.py) on synthetic traces."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import replay  # noqa: E402

from mlx_spec.adaptive import LOOKUP, Controller  # noqa: E402

COSTS = dict(round_seconds=[0.5, 0.7, 0.9, 1.1, 1.3], catch_up_seconds=0.01)


def test_a_fixed_k_over_a_trace_that_always_agrees_emits_k_plus_one_per_round():
    trace = dict(agree=[True] * 100)
    rate = replay.replay(replay.Fixed(4), trace, COSTS["round_seconds"], 0.01, noise=0.0)
    # 20 rounds of 5 tokens at 1.3 s, in plain steps of 0.5 s
    assert rate == pytest.approx(100 / (20 * 1.3) * 0.5)


def test_a_round_stops_at_the_first_disagreement():
    trace = dict(agree=[True, False] * 50)  # every round: 1 accepted, then the main token
    rate = replay.replay(replay.Fixed(3), trace, COSTS["round_seconds"], 0.01, noise=0.0)
    # the last round drafts only 1 token: one position is left for its own main token, as in the engine
    assert rate == pytest.approx(100 / (49 * 1.1 + 0.7) * 0.5)


def test_auto_decodes_plainly_when_the_draft_never_agrees_and_drafts_when_it_always_does():
    traces = dict(costs=COSTS, traces={"never": dict(agree=[False] * 300), "always": dict(agree=[True] * 300)})
    make = lambda learnt: Controller(learnt, max_draft=4, max_lookup=0, cost_ratio=0.3)  # noqa: E731
    rows = {r["trace"]: r for r in replay.replay_table(traces, make, seeds=2)}
    assert rows["never"]["best_k"] == 0 and rows["never"]["auto_over_best"] > 0.9
    assert rows["always"]["best_k"] == 4 and rows["always"]["auto_over_best"] > 0.95


def test_carried_over_the_auto_policy_starts_each_trace_from_what_the_traces_before_taught_it():
    traces = dict(costs=COSTS, traces={"always": dict(agree=[True] * 200), "never": dict(agree=[False] * 40)})
    make = lambda learnt: Controller(learnt, max_draft=4, max_lookup=0, cost_ratio=0.3)  # noqa: E731
    fresh = {r["trace"]: r["auto"] for r in replay.replay_table(traces, make, seeds=2)}
    carried = {r["trace"]: r["auto"] for r in replay.replay_table(traces, make, seeds=2, carry=True)}
    assert carried["always"] == fresh["always"]  # the first trace: nothing learnt before it either way
    assert carried["never"] < 0.95 * fresh["never"]  # it drafts on, trusting the first trace's acceptance


def test_temperature_traces_accept_with_their_probability():
    trace = dict(accept=[0.5] * 4000)
    rate = replay.replay(replay.Fixed(1), trace, [1.0, 1.0], 0.0, noise=0.0)
    assert rate == pytest.approx(1.5, abs=0.05)  # 1 + 0.5 tokens per round of one plain step


def test_acceptance_rate_of_fixed_rounds():
    # rounds of 2 drafts accept 0, 1 or 2 with chances 1 - a, a (1 - a), a^2: rate (a + a^2) / 2
    assert replay.acceptance_rate([0.5] * 2000, 2, seeds=20) == pytest.approx(0.375, abs=0.01)
    assert replay.acceptance_rate([0.9] * 2000, 1, seeds=20) == pytest.approx(0.9, abs=0.01)
    assert replay.acceptance_rate([1.0] * 100, 4, seeds=2) == 1.0


def test_replay_command_prints_the_table_and_refuses_a_missing_file(tmp_path, capsys):
    path = tmp_path / "traces.json"
    path.write_text(
        json.dumps(
            dict(
                costs=COSTS,
                cost_ratio=0.3,
                traces={
                    "code@0": dict(agree=[True] * 60 + [False] * 4),
                    "prose@0.7": dict(accept=[0.6] * 64, exact_match=[0.3] * 64),
                    "prose@0.7#2": dict(accept=[0.8] * 64, exact_match=[0.5] * 64),
                },
            )
        )
    )
    assert replay.main(["replay", str(path), "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| code@0 |" in out and "| prose@0.7 |" in out and "| prose@0.7#2 |" in out
    assert "of the hindsight bound: auto (draft only) " in out  # greedy traces only: prose has none
    assert next(line for line in out.splitlines() if line.startswith("| prose@0.7 |")).endswith("| | | |")
    row = next(line for line in out.splitlines() if line.startswith("| prose@0.7 | 2 |"))  # both samples pooled
    assert "| 0.700 vs 0.400 (1.75x) |" in row
    assert replay.main(["replay", str(tmp_path / "nope.json")]) == 2
    assert "cannot read traces" in capsys.readouterr().err

    # --traces: these, in this order; a name the file lacks is an error naming what it has
    assert replay.main(["replay", str(path), "--seeds", "1", "--traces", "prose@0.7#2,code@0"]) == 0
    rows = [" | ".join(line.split(" | ")[:2]) for line in capsys.readouterr().out.splitlines() if "@" in line]
    assert [row.split(" | ")[0] for row in rows[:2]] == ["| prose@0.7#2", "| code@0"]  # the replay table
    assert rows[2:] == ["| prose@0.7 | 1"]  # the acceptance table: the one sample left of prose@0.7
    assert replay.main(["replay", str(path), "--traces", "code@0,story@0"]) == 2
    assert "no trace story@0; the file has code@0, prose@0.7, prose@0.7#2" in capsys.readouterr().err

    # --noise: each round's cost varies by that much; without noise every seed replays the same
    def code_row(*options):
        assert replay.main(["replay", str(path), "--traces", "code@0", *options]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| code@0 |"))

    assert code_row("--seeds", "1", "--noise", "0") == code_row("--seeds", "3", "--noise", "0")
    assert code_row("--seeds", "1", "--noise", "0.3") != code_row("--seeds", "3", "--noise", "0.3")
    assert replay.main(["replay", str(path), "--noise", "-0.1"]) == 2
    assert "--noise must be >= 0, got -0.1" in capsys.readouterr().err

    # --shifts: one row per trace, the mean over its starts; the acceptance table is the traces' own
    assert replay.main(["replay", str(path), "--seeds", "1", "--shifts", "3"]) == 0
    out = capsys.readouterr().out
    assert "| code@0 |" in out and "+1" not in out and "| prose@0.7 | 2 |" in out
    assert replay.main(["replay", str(path), "--shifts", "0"]) == 2
    assert "--shifts 0: it must be >= 1" in capsys.readouterr().err
    assert replay.main(["replay", str(path), "--shifts", "2", "--carry"]) == 2
    assert "learnt from its own copies" in capsys.readouterr().err


def test_shifted_traces_start_later_and_merge_into_one_row_per_trace():
    trace = dict(agree=[True, False, True, True], tokens=[1, 2, 3, 10, 11, 12, 13], num_prompt=3)
    copies = replay.shifted({"t@0": trace}, 3)
    assert list(copies) == ["t@0", "t@0+1", "t@0+2"]
    assert copies["t@0+2"] == dict(agree=[True, True], tokens=trace["tokens"], num_prompt=5)
    rows = [
        dict(trace="t@0", fixed={0: 1.0, 1: 2.0}, auto=1.5, variants={"hybrid": 1.0}),
        dict(trace="t@0+1", fixed={0: 1.0, 1: 4.0}, auto=2.5, variants={"hybrid": 3.0}),
    ]
    assert replay.merged(rows) == [
        dict(
            trace="t@0", fixed={0: 1.0, 1: 3.0}, best_k=1, auto=2.0, auto_over_best=2.0 / 3.0, variants={"hybrid": 2.0}
        )
    ]


def test_lookup_replays_exactly_over_a_text_that_repeats_its_prompt():
    """Greedy traces with their tokens replay prompt lookup: the copy of the prompt is accepted, and costs
    one verify pass per round."""
    prompt = list(range(100, 140))
    text = prompt[10:] + list(range(200, 230))  # 30 copied tokens, then 30 new ones
    trace = dict(agree=[False] * 60, tokens=prompt + text, num_prompt=len(prompt))
    lookup_seconds = [0.5 + 0.02 * k for k in range(17)]
    policy = Controller(max_draft=0, has_draft=False)
    chosen = []
    record = policy.record
    policy.record = lambda choice, accepted, seconds, catch_up, unused: (
        chosen.append((choice, accepted)),
        record(choice, accepted, seconds, catch_up, unused),
    )
    rate = replay.replay(policy, trace, COSTS["round_seconds"], 0.0, noise=0.0, lookup_seconds=lookup_seconds)
    copied = sum(accepted for choice, accepted in chosen if choice.source == LOOKUP)
    assert copied >= 25 and rate > 1.5  # the copy: many tokens per round; the rest: nearly plain
    assert replay.lookup_costs(COSTS, 0.3)[2] == pytest.approx(0.9 - 2 * 0.3 * 0.5)


@pytest.mark.parametrize("num_prompt", [10, 300])
def test_the_draft_reads_the_prompt_as_in_the_engine(num_prompt):
    """As in the engine with the recorded pair, whose output layer is cut to the last row: the prompt's pass
    gives the first token, and the draft reads the prompt with the first drafting round. Plain decoding does
    not read it."""
    prompt = list(range(100, 100 + num_prompt))
    trace = dict(agree=[True] * 100, tokens=prompt + list(range(300, 400)), num_prompt=len(prompt))
    costs = COSTS["round_seconds"]
    rate = replay.replay(replay.Fixed(4), trace, costs, 0.01, noise=0.0)
    # the draft catches up on the prompt and the first token; 99 tokens in 19 rounds of 5 and one of 4
    assert rate == pytest.approx(100 / (num_prompt * 0.01 + 19 * costs[4] + costs[3]) * costs[0])
    plain = replay.replay(replay.Fixed(0), trace, costs, 0.01, noise=0.0)
    assert plain == pytest.approx(100 / 99)
    policy = Controller(max_draft=4, cost_ratio=0.3)
    behind = []
    choose = policy.choose
    policy.choose = lambda match, b, left: (behind.append(b), choose(match, b, left))[1]
    replay.replay(policy, trace, costs, 0.01, noise=0.0, lookup_seconds=[0.5] * 17)
    assert behind[0] == len(prompt) + 1


def test_the_hindsight_bound_is_the_fastest_schedule_of_rounds():
    # 5 tokens that all agree, rounds of 0, 1, 2 drafts at 1.0, 1.5, 1.6 s: a round of 2 and one of 1 (the
    # last position is left for its own main token), 3.1 s; two plain rounds instead of the last cost 3.6
    assert replay.hindsight(dict(agree=[True] * 5), [1.0, 1.5, 1.6], 0.0) == pytest.approx(5 / 3.1)
    # knowing where the draft fails: each round drafts just the tokens that agree, 2 then 1 (3.1 s per 5
    # tokens), where any fixed length drafts in vain or stops short
    trace = dict(agree=[True, True, False, True, False] * 12)
    costs = [1.0, 1.5, 1.6, 3.0]
    assert replay.hindsight(trace, costs, 0.0) == pytest.approx(60 / (12 * 3.1))
    assert replay.hindsight(trace, costs, 0.0) > max(
        replay.replay(replay.Fixed(k), trace, costs, 0.0, noise=0.0) for k in range(4)
    )


def test_the_hindsight_bound_is_above_every_controller_and_copies_what_repeats():
    prompt = list(range(100, 160))
    text = list(range(300, 340)) + prompt[5:45] + list(range(400, 440))  # new, copied, new again
    agree = [i % 5 != 4 for i in range(40)] + [False] * 40 + [i % 3 != 2 for i in range(40)]
    trace = dict(agree=agree, tokens=prompt + text, num_prompt=len(prompt))
    costs, lookup_seconds = COSTS["round_seconds"], [0.5 + 0.02 * k for k in range(17)]
    draft_only = replay.hindsight(trace, costs, 0.01)
    hybrid = replay.hindsight(trace, costs, 0.01, lookup_seconds)
    assert hybrid > 1.2 * draft_only  # the copy's 40 tokens in a few rounds, where the draft never agrees
    lookup_only = replay.hindsight(trace, costs[:1], 0.0, lookup_seconds)  # no draft lengths: copies and plain
    assert draft_only < hybrid and lookup_only < hybrid
    controllers = [
        Controller(max_draft=4, cost_ratio=0.3),
        Controller(max_draft=4, max_lookup=0, cost_ratio=0.3),
        Controller(max_draft=0, has_draft=False),
    ]
    for policy in controllers:
        assert replay.replay(policy, trace, costs, 0.01, noise=0.0, lookup_seconds=lookup_seconds) < hybrid
    copying = Controller(max_draft=0, has_draft=False)
    assert replay.replay(copying, trace, costs, 0.01, noise=0.0, lookup_seconds=lookup_seconds) < lookup_only
    assert max(replay.replay(replay.Fixed(k), trace, costs, 0.01, noise=0.0) for k in range(5)) < draft_only
