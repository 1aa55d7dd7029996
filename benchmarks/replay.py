#!/usr/bin/env python3
"""Replay the adaptive draft-length controller offline, on traces recorded from a real pair.

  python3 benchmarks/replay.py record [--max-tokens 256] [--out traces.json]   # ~30 min on a 2-core CPU
  python3 benchmarks/replay.py replay traces.json                                 # seconds
  python3 benchmarks/replay.py replay benchmarks/traces_lookup.json --carry       # learning across prompts
  python3 benchmarks/replay.py replay benchmarks/traces_lookup.json --carry --traces story@0,quicksort@0
  python3 benchmarks/replay.py replay benchmarks/traces_lookup.json --noise 0.15  # a shared machine's round costs
  python3 benchmarks/replay.py replay benchmarks/traces_lookup.json --max-tokens 128 --shifts 8  # from 8 starts

`record` generates each benchmark prompt once per temperature (`--samples N`
texts at temperature > 0) with the default pair and stores, for every
generated position, what a draft token there would have met: at temperature 0
whether the draft's greedy token equals the main model's; above it the
probability that rejection sampling accepts the draft's sample, sum(min(p, q)),
and that an exact-match check accepts it (mlx-lm's rule at temp > 0), sum(p q).
It also measures the seconds of a round at each draft length k on this
machine, and of the draft catching up on skipped tokens.

`replay` drives the controller (`mlx_spec.adaptive.Controller`: draft model
only, and with prompt lookup) and every fixed k over those traces with those
costs and prints tokens per second relative to plain decoding. Greedy traces
recorded with their tokens also replay prompt lookup exactly: the index sees
the prompt and the text so far, and a copied token is accepted where it equals
the text; a lookup round costs a verify pass (`lookup_seconds`, or the drafting
round less its draft steps). A round
with k drafts starting at position t accepts the run of agreeing positions
from t on (at temp > 0, each with its acceptance probability), which is what
the engine does when the draft and main model see the same accepted prefix.
The first round goes as in the engine with the recorded pair: the prompt's
pass gives the first token (the prompt is not timed), and the draft reads the
prompt with its first drafting round.
Beside them, for greedy traces, the hindsight bound: the rate of the fastest
rounds chosen knowing the text (`hindsight`), with the draft model only, with
lookup only, and with both. No controller can beat it; what is left between a
controller and it is what better choices could still win with these costs.
Controller changes can thus be tried on every prompt in seconds instead of
hours; the benchmark then confirms them (benchmarks/RESULTS.md). For traces
above temperature 0 it also prints the acceptance rate (accepted / drafted) of
rounds of k drafts under both rules, rejection sampling against exact match, on
the same texts: free of the sampling noise of timed runs.
"""

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from mlx_spec.adaptive import DRAFT, LOOKUP, PLAIN, Choice, Controller, Learnt
from mlx_spec.bench import ALL_PROMPTS
from mlx_spec.cache import SLACK
from mlx_spec.lookup import NgramIndex, agreeing
from mlx_spec.options import AUTO_MAX_LOOKUP as MAX_LOOKUP


def replay(
    policy,
    trace: dict,
    round_seconds: list[float],
    catch_up_seconds: float,
    seed: int = 0,
    noise: float = 0.03,
    lookup_seconds: list[float] | None = None,
) -> float:
    """Tokens per second of `policy` over `trace`, in plain-decoding steps (round_seconds[0] = 1 step).

    With `trace["tokens"]` (prompt and text) and `lookup_seconds`, the policy is shown the lookup's match.
    """
    rng = np.random.default_rng(seed)
    greedy = "agree" in trace
    positions = trace["agree"] if greedy else trace["accept"]
    index = None
    if lookup_seconds is not None and "tokens" in trace:
        text = trace["tokens"][trace["num_prompt"] :]
        index = NgramIndex()
        index.extend(trace["tokens"][: trace["num_prompt"]])
    n, t, seconds, behind = len(positions), 0, 0.0, 1
    if "num_prompt" in trace:
        # as in the engine with the pair the traces come from (its output layer is cut to the last row): the
        # prompt's pass gives the first token (the prompt is not timed here), the draft reads them later
        t, behind = 1, trace["num_prompt"] + 1
        if index is not None:
            index.extend(text[:1])
    while t < n:
        match = index.match() if index is not None else None
        choice = policy.choose(match, behind, n - t)
        longest = len(round_seconds if choice.source == DRAFT else lookup_seconds or [0]) - 1
        k = min(choice.num_draft, n - t - 1, longest)
        choice = choice._replace(num_draft=k, source=choice.source if k > 0 else PLAIN)
        accepted = 0
        if choice.source == LOOKUP:
            accepted = agreeing(index.continuation(match, k), text[t : t + k])
        while (
            choice.source == DRAFT
            and accepted < k
            and (positions[t + accepted] if greedy else rng.random() < positions[t + accepted])
        ):
            accepted += 1
        caught_up = choice.source == DRAFT and behind > 2
        chunked = choice.source == DRAFT and behind > SLACK + 1  # timed apart, as in DraftSource.propose
        noisy = 1.0 + noise * rng.standard_normal()
        cost = (lookup_seconds if choice.source == LOOKUP else round_seconds)[k] * noisy
        catch_up = catch_up_seconds * (behind - 1) * noisy if caught_up else 0.0
        seconds += cost + catch_up
        # as decode.rounds does
        unused = None
        if match is not None and choice.source != LOOKUP:  # what a copy would have accepted of the emitted tokens
            emitted = text[t : t + accepted + 1]
            unused = (match, len(emitted), agreeing(index.continuation(match, len(emitted)), emitted))
        policy.record(
            choice,
            accepted,
            None if caught_up and not chunked else cost,
            (behind - 1, catch_up) if chunked else None,
            unused,
        )
        behind = 1 + (accepted == k) if choice.source == DRAFT else behind + accepted + 1  # tokens the draft lacks
        if index is not None:
            index.extend(text[t : t + accepted + 1])
        t += accepted + 1
    return n / seconds * round_seconds[0]


def hindsight(
    trace: dict, round_seconds: list[float], catch_up_seconds: float, lookup_seconds: list[float] | None = None
) -> float:
    """Tokens per second, as `replay` counts them (no noise), of the fastest rounds over a greedy `trace`
    chosen knowing its text: how many drafts agree from each position, and what a copy there would get.

    An upper bound for any controller with these sources and costs. The fastest schedule is found by
    dynamic programming over (position, tokens the draft lacks), keeping per position only the states no
    other beats on both time and backlog. The lookup's match is taken at every position, as if a round
    started there (a real schedule asks at its rounds' starts only, and the copy cursor may differ).
    """
    agree, n = trace["agree"], len(trace["agree"])
    run = [0] * (n + 1)  # drafts that agree in a row from each position
    for t in range(n - 1, -1, -1):
        run[t] = run[t + 1] + 1 if agree[t] else 0
    t0, behind0 = (1, trace["num_prompt"] + 1) if "num_prompt" in trace else (0, 1)  # as `replay` starts
    copies = [(0, 0)] * n  # per position: (tokens a copy proposes there, of which agree in a row)
    if lookup_seconds is not None and "tokens" in trace:
        text, index = trace["tokens"][trace["num_prompt"] :], NgramIndex()
        index.extend(trace["tokens"][: trace["num_prompt"] + t0])
        for t in range(t0, n):
            match = index.match()
            if match is not None:
                proposal = index.continuation(match, len(lookup_seconds) - 1)
                copies[t] = (len(proposal), agreeing(proposal, text[t:]))
            index.extend(text[t : t + 1])
    states: list[dict[int, float]] = [{} for _ in range(n + 1)]  # position -> {behind: seconds}
    states[t0][behind0] = 0.0

    def reach(t: int, behind: int, seconds: float):
        if seconds < states[t].get(behind, math.inf):
            states[t][behind] = seconds

    for t in range(t0, n):
        front, least = {}, math.inf
        for behind, seconds in sorted(states[t].items()):  # more backlog only if it saves time
            if seconds < least:
                front[behind], least = seconds, seconds
        for behind, seconds in front.items():
            reach(t + 1, behind + 1, seconds + round_seconds[0])
            catch_up = catch_up_seconds * (behind - 1) if behind > 2 else 0.0
            for k in range(1, min(len(round_seconds) - 1, n - t - 1) + 1):
                accepted = min(run[t], k)
                reach(t + accepted + 1, 1 + (accepted == k), seconds + round_seconds[k] + catch_up)
            proposed, copied = copies[t]
            for k in range(1, min(proposed, n - t - 1) + 1):
                accepted = min(copied, k)
                reach(t + accepted + 1, behind + accepted + 1, seconds + lookup_seconds[k])
    return n / min(states[n].values()) * round_seconds[0]


class Fixed:
    """A fixed draft length of the draft model; counts what its rounds drafted and accepted."""

    def __init__(self, k: int):
        self.k = self.max_draft = k
        self.drafted = self.accepted = 0

    def choose(self, match=None, behind=1, left=None) -> Choice:
        return Choice(DRAFT, self.k) if self.k else Choice(PLAIN, 0)

    def record(self, choice: Choice, num_accepted: int, _seconds, catch_up=None, unused=None):
        self.drafted += choice.num_draft
        self.accepted += num_accepted


def lookup_costs(costs: dict, cost_ratio: float) -> list[float]:
    """Seconds of a lookup round of k tokens: measured, or a drafting round less its k draft steps."""
    if "lookup_seconds" in costs:
        seconds = list(costs["lookup_seconds"])
    else:
        plain = costs["round_seconds"][0]
        seconds = [max(plain, t - k * cost_ratio * plain) for k, t in enumerate(costs["round_seconds"])]
    slope = (seconds[-1] - seconds[1]) / (len(seconds) - 2) if len(seconds) > 2 else 0.0
    while len(seconds) <= MAX_LOOKUP:  # as long as the engine's lookups, extended along the measured slope
        seconds.append(seconds[-1] + slope)
    return seconds


def acceptance_rate(accept: list[float], k: int, seeds: int = 200) -> float:
    """Accepted / drafted of rounds of k drafts along a trace whose position t accepts with accept[t]."""
    total = [0, 0]
    for s in range(seeds):
        policy = Fixed(k)
        replay(policy, dict(accept=accept), [1.0] * (k + 1), 0.0, seed=s, noise=0.0)
        total[0] += policy.accepted
        total[1] += policy.drafted
    return total[0] / total[1]


def acceptance_table(traces: dict, ks=(1, 2, 3, 4)) -> list[str]:
    """Rejection sampling against exact match, per prompt and draft length, pooled over a prompt's samples."""
    groups: dict[str, list[dict]] = {}
    for name, trace in traces["traces"].items():
        if "exact_match" in trace:
            groups.setdefault(name.split("#")[0], []).append(trace)
    lines = ["| trace | samples | per token | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 3) + "|"]
    for name, group in groups.items():
        ours = [x for t in group for x in t["accept"]]
        theirs = [x for t in group for x in t["exact_match"]]
        cells = []
        for k in ks:
            a = statistics.mean(acceptance_rate(t["accept"], k) for t in group)
            b = statistics.mean(acceptance_rate(t["exact_match"], k) for t in group)
            cells.append(f"{a:.3f} vs {b:.3f} ({a / b:.2f}x)")
        lines.append(
            f"| {name} | {len(group)} | {statistics.mean(ours):.3f} vs {statistics.mean(theirs):.3f} "
            f"({statistics.mean(ours) / statistics.mean(theirs):.2f}x) | " + " | ".join(cells) + " |"
        )
    return lines


def replay_table(
    traces: dict,
    make_auto: Callable,
    seeds: int = 8,
    noise: float = 0.03,
    variants: dict | None = None,
    carry: bool = False,
) -> list[dict]:
    """Per trace: mean rate of each fixed k, of auto, and of each of `variants` (name -> make policy from a
    Learnt store). `carry`: each adaptive policy goes through the traces in order with one store of its own,
    as in the benchmark's process; otherwise each trace starts from nothing learnt."""
    costs = traces["costs"]
    looked_up = lookup_costs(costs, traces.get("cost_ratio", 0.3))
    adaptive = {"auto": make_auto, **(variants or {})}
    rates: dict[str, dict[str, list[float]]] = {v: {t: [] for t in traces["traces"]} for v in adaptive}
    for s in range(seeds):
        stores = {v: Learnt() for v in adaptive}
        for name, trace in traces["traces"].items():
            for v, make in adaptive.items():
                policy = make(stores[v] if carry else Learnt())
                rate = replay(policy, trace, costs["round_seconds"], costs["catch_up_seconds"], s, noise, looked_up)
                rates[v][name].append(rate)
    rows = []
    for name, trace in traces["traces"].items():
        fixed = {
            k: statistics.mean(
                replay(Fixed(k), trace, costs["round_seconds"], costs["catch_up_seconds"], s, noise, looked_up)
                for s in range(seeds)
            )
            for k in range(len(costs["round_seconds"]))
        }
        best = max(fixed, key=fixed.get)
        auto = statistics.mean(rates["auto"][name])
        row = dict(trace=name, fixed=fixed, best_k=best, auto=auto, auto_over_best=auto / fixed[best])
        row["variants"] = {v: statistics.mean(rates[v][name]) for v in variants or {}}
        if "agree" in trace:  # what rounds chosen knowing the text would reach: draft only, and with lookup
            args = (trace, costs["round_seconds"], costs["catch_up_seconds"])
            lookup_only = hindsight(trace, costs["round_seconds"][:1], 0.0, looked_up)  # no draft lengths
            row["bound"] = dict(draft=hindsight(*args), hybrid=hindsight(*args, looked_up), lookup=lookup_only)
        rows.append(row)
    return rows


# --- recording on the real pair ----------------------------------------------------------------
def record(args) -> dict:
    from mlx_spec.blas import ensure_openblas

    ensure_openblas()
    import mlx.core as mx

    from mlx_spec import GenerationStats, speculative_generate_step
    from mlx_spec.bench import _encode
    from mlx_spec.fetch import fetch_default_pair
    from mlx_spec.load import load

    main_path, draft_path = fetch_default_pair(progress=lambda s: print(s, file=sys.stderr))
    main, tokenizer = load(str(main_path))
    draft = load(str(draft_path))[0]
    traces: dict[str, dict] = {}
    for name in args.prompt or ALL_PROMPTS:
        prompt = _encode(tokenizer, ALL_PROMPTS[name])
        for temp, seed in [(t, s) for t in args.temps for s in range(1, (args.samples if t > 0 else 1) + 1)]:
            steps = speculative_generate_step(
                prompt, main, draft, num_draft_tokens=4, max_tokens=args.max_tokens, temp=temp, seed=seed
            )
            out = [t for t, _, _ in steps]
            seq = mx.array(prompt + out, mx.int32)[None]
            main_logits = main(seq)[0, len(prompt) - 1 : -1]
            draft_logits = draft(seq)[0, len(prompt) - 1 : -1, : main_logits.shape[-1]]
            if temp == 0:  # with the tokens: the replay can look them up
                agree = (mx.argmax(draft_logits, -1) == mx.array(out)).tolist()
                trace = dict(agree=agree, tokens=prompt + out, num_prompt=len(prompt))
            else:
                p, q = mx.softmax(main_logits / temp, -1), mx.softmax(draft_logits / temp, -1)
                trace = dict(accept=mx.minimum(p, q).sum(-1).tolist(), exact_match=(p * q).sum(-1).tolist())
            traces[f"{name}@{temp:g}" + (f"#{seed}" if seed > 1 else "")] = trace
            rates = trace.get("agree") or trace["accept"]
            print(f"{name} temp {temp:g} seed {seed}: mean acceptance {sum(rates) / len(rates):.3f}", file=sys.stderr)
    result = dict(traces=traces, cost_ratio=_nbytes(draft) / _nbytes(main))
    if not args.no_costs:
        result["costs"] = measure_costs(
            main,
            draft,
            _encode(tokenizer, ALL_PROMPTS["quicksort"]),
            args.max_draft,
            speculative_generate_step,
            GenerationStats,
            mx,
        )
    return result


def measure_costs(main, draft, prompt, max_draft, generate_step, stats_type, mx, tokens: int = 24) -> dict:
    """Seconds per round at each fixed k (median of 3 runs), and per token the draft catches up on."""
    round_seconds = []
    for k in range(max_draft + 1):
        samples = []
        for _ in range(3):
            stats = stats_type()
            for _ in generate_step(
                prompt, main, draft if k else None, num_draft_tokens=max(k, 1), max_tokens=tokens, stats=stats
            ):
                pass
            samples.append(stats.generation_time / stats.num_rounds)
        round_seconds.append(statistics.median(samples))
        print(f"k={k}: {round_seconds[-1]:.3f} s per round", file=sys.stderr)
    from mlx_lm.models.cache import make_prompt_cache

    def draft_forward(n):
        cache = make_prompt_cache(draft)
        mx.eval(draft(mx.array(prompt)[None], cache=cache))
        start = time.perf_counter()
        mx.eval(draft(mx.array(prompt[-n:])[None], cache=cache))
        return time.perf_counter() - start

    catch_up = statistics.median((draft_forward(9) - draft_forward(1)) / 8 for _ in range(3))
    lookup_seconds = [round_seconds[0]]
    for k in range(1, MAX_LOOKUP + 1):  # a lookup round: a plain step's cost times a verify pass over k + 1 tokens
        ratio = statistics.median(
            verify_forward(main, prompt, k + 1, mx) / verify_forward(main, prompt, 1, mx) for _ in range(3)
        )
        lookup_seconds.append(round_seconds[0] * ratio)
        print(f"lookup k={k}: {lookup_seconds[-1]:.3f} s per round", file=sys.stderr)
    return dict(round_seconds=round_seconds, catch_up_seconds=max(catch_up, 0.0), lookup_seconds=lookup_seconds)


def verify_forward(model, prompt, num_tokens, mx) -> float:
    """Seconds of one forward of `model` over `num_tokens` tokens after `prompt`."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(prompt)[None], cache=cache))
    start = time.perf_counter()
    mx.eval(model(mx.array(prompt[-num_tokens:])[None], cache=cache))
    return time.perf_counter() - start


def _nbytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(w.nbytes for _, w in tree_flatten(model.parameters()))


def shifted(traces: dict, shifts: int) -> dict:
    """Each trace from `shifts` start offsets (`name+s`: its first s tokens joined to the prompt).

    A greedy trace is one path: where its rejections fall against the
    controller's first rounds moves auto by several percent on one trace
    (quicksort at 128 tokens: auto 0.99 of the best k from the first token,
    0.92 over 8 starts); the mean over starts does not hang on that luck.
    """
    out = {}
    for name, trace in traces.items():
        for s in range(shifts):
            copy = {key: value[s:] if key in PER_POSITION else value for key, value in trace.items()}
            if "num_prompt" in trace:
                copy["num_prompt"] = trace["num_prompt"] + s
            out[name if s == 0 else f"{name}+{s}"] = copy
    return out


PER_POSITION = ("agree", "accept", "exact_match")  # a trace's lists with an entry per generated token


def merged(rows: list[dict]) -> list[dict]:
    """replay_table's rows of shifted copies (`name+s`) as one row per trace: the mean rate of each variant."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["trace"].split("+")[0], []).append(row)
    out = []
    for name, group in groups.items():
        fixed = {k: statistics.mean(r["fixed"][k] for r in group) for k in group[0]["fixed"]}
        best = max(fixed, key=fixed.get)
        auto = statistics.mean(r["auto"] for r in group)
        variants = {v: statistics.mean(r["variants"][v] for r in group) for v in group[0]["variants"]}
        row = dict(
            trace=name, fixed=fixed, best_k=best, auto=auto, auto_over_best=auto / fixed[best], variants=variants
        )
        if "bound" in group[0]:
            row["bound"] = {v: statistics.mean(r["bound"][v] for r in group) for v in group[0]["bound"]}
        out.append(row)
    return out


def print_table(traces: dict, seeds: int, carry: bool = False, noise: float = 0.03):
    """Fixed k and auto with the draft model only, then auto with prompt lookup (hybrid) and lookup alone
    (traces shifted by `shifted`: the mean over their starts)."""
    max_draft = len(traces["costs"]["round_seconds"]) - 1
    ratio = traces["cost_ratio"]
    variants = {
        "hybrid": lambda learnt: Controller(learnt, max_draft=max_draft, cost_ratio=ratio),
        "lookup only": lambda learnt: Controller(learnt, max_draft=0, has_draft=False),
    }
    draft_only = lambda learnt: Controller(learnt, max_draft=max_draft, max_lookup=0, cost_ratio=ratio)  # noqa: E731
    rows = merged(replay_table(traces, draft_only, seeds, noise, variants=variants, carry=carry))
    ks = list(rows[0]["fixed"])
    print(
        "| trace | "
        + " | ".join(f"k={k}" for k in ks)
        + " | auto | auto / best fixed | hybrid (lookup + draft) | lookup only "
        + "| bound: draft only | bound: hybrid | bound: lookup only |"
    )
    print("|---" * (len(ks) + 8) + "|")
    for r in rows:
        bound = r.get("bound")
        print(
            f"| {r['trace']} | "
            + " | ".join(f"{r['fixed'][k]:.3f}" for k in ks)
            + f" | {r['auto']:.3f} | {r['auto_over_best']:.3f} (best k={r['best_k']}) "
            + f"| {r['variants']['hybrid']:.3f} | {r['variants']['lookup only']:.3f} "
            + (f"| {bound['draft']:.3f} | {bound['hybrid']:.3f} | {bound['lookup']:.3f} |" if bound else "| | | |")
        )
    geo = statistics.geometric_mean([r["auto_over_best"] for r in rows])
    print(f"\nauto / best fixed: geometric mean {geo:.3f}, worst {min(r['auto_over_best'] for r in rows):.3f}")
    hybrid = [r["variants"]["hybrid"] / r["auto"] for r in rows]
    worst_lookup = min(r["variants"]["lookup only"] for r in rows)
    print(
        f"hybrid / auto (draft only): geometric mean {statistics.geometric_mean(hybrid):.3f}, worst {min(hybrid):.3f}"
    )
    print(f"lookup only / plain: worst {worst_lookup:.3f}")
    bounded = [r for r in rows if "bound" in r]
    if bounded:  # how much of what knowing the text would reach each controller gets
        draft = statistics.geometric_mean([r["auto"] / r["bound"]["draft"] for r in bounded])
        both = statistics.geometric_mean([r["variants"]["hybrid"] / r["bound"]["hybrid"] for r in bounded])
        copy = statistics.geometric_mean([r["variants"]["lookup only"] / r["bound"]["lookup"] for r in bounded])
        print(
            f"of the hindsight bound: auto (draft only) {draft:.3f}, hybrid {both:.3f}, lookup only {copy:.3f} "
            "(geometric means)"
        )


# --- command line ----------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record traces and costs on the default pair")
    rec.add_argument("--max-tokens", type=int, default=256)
    rec.add_argument("--max-draft", type=int, default=8)
    rec.add_argument("--temps", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.7])
    rec.add_argument("--prompt", action="append", choices=list(ALL_PROMPTS), help="default: every benchmark prompt")
    rec.add_argument("--samples", type=int, default=1, help="texts sampled per prompt at temp > 0 (seeds 1..N)")
    rec.add_argument("--no-costs", action="store_true", help="traces only (the costs need a quiet machine)")
    rec.add_argument("--out", default="traces.json")
    rep = sub.add_parser("replay", help="replay the controller and fixed draft lengths over recorded traces")
    rep.add_argument("traces")
    rep.add_argument("--seeds", type=int, default=8)
    rep.add_argument("--max-tokens", type=int, help="replay only the first N tokens of each trace (short replies)")
    rep.add_argument(
        "--carry", action="store_true", help="each variant learns across the traces in order, as in one process"
    )
    rep.add_argument(
        "--noise",
        type=float,
        default=0.03,
        help="relative noise of each round's cost (default 0.03; a shared machine's rounds vary by 0.15-0.3)",
    )
    rep.add_argument(
        "--traces",
        type=lambda s: s.split(","),
        metavar="NAMES",
        dest="names",
        help="only these traces, in this order (e.g. story@0,quicksort@0: with --carry, quicksort after story)",
    )
    rep.add_argument(
        "--shifts",
        type=int,
        default=1,
        metavar="N",
        help="replay each trace from N starts (its first 0..N-1 tokens joined to the prompt) and show the mean: "
        "less luck of where one text's rejections fall (default 1)",
    )
    args = parser.parse_args(argv)
    if args.command == "record":
        result = record(args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    if args.noise < 0:
        print(f"error: --noise must be >= 0, got {args.noise}", file=sys.stderr)
        return 2
    if args.shifts < 1 or (args.shifts > 1 and args.carry):
        why = "with --carry a text would be learnt from its own copies" if args.shifts > 1 else "it must be >= 1"
        print(f"error: --shifts {args.shifts}: {why}", file=sys.stderr)
        return 2
    try:
        with open(args.traces) as f:
            traces = json.load(f)
    except (OSError, ValueError) as e:
        print(f"error: cannot read traces {args.traces}: {e}", file=sys.stderr)
        return 2
    if args.names:
        unknown = [name for name in args.names if name not in traces["traces"]]
        if unknown:
            print(f"error: no trace {', '.join(unknown)}; the file has {', '.join(traces['traces'])}", file=sys.stderr)
            return 2
        traces["traces"] = {name: traces["traces"][name] for name in args.names}
    replayed = dict(traces, traces=shifted(traces["traces"], args.shifts))
    if args.max_tokens:
        for trace in (*traces["traces"].values(), *replayed["traces"].values()):
            for key in PER_POSITION:
                if key in trace:
                    trace[key] = trace[key][: args.max_tokens]
    if "costs" in traces:
        print_table(replayed, args.seeds, args.carry, args.noise)
    if any("exact_match" in t for t in traces["traces"].values()):
        print("\nAcceptance at temp > 0, rejection sampling vs exact match (mlx-lm), accepted / drafted:\n")
        print("\n".join(acceptance_table(traces)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
