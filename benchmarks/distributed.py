#!/usr/bin/env python3
"""The main model sharded over ranks: collectives per token, one collective's latency, tok/s projected for a
network's hop latency, and mlx-lm's own sharded decoding against mlx_spec, interleaved, greedy.

  mlx.launch -n 2 --backend ring --env PYTHONPATH=$PWD --python $(which python) -- \\
      benchmarks/distributed.py [--pipeline] [--max-tokens 128] [--repetitions 3] [--model M --draft-model D]

or, on a machine of few cores, without mlx.launch (whose I/O threads keep a core busy): a hostfile of the ranks'
addresses and one process per rank, as mlx.launch starts them (benchmarks/RESULTS.md, "Several ranks"):

  echo '[["127.0.0.1:35100"], ["127.0.0.1:35101"]]' > /tmp/hosts.json
  for rank in 1 0; do
      MLX_HOSTFILE=/tmp/hosts.json MLX_RANK=$rank PYTHONPATH=$PWD python benchmarks/distributed.py &
  done; wait

Every rank loads the main model split by mlx-lm's sharded_load (tensor parallel, or a pipeline) and the draft
whole. Three variants run in turn, in alternating order: mlx-lm's stream_generate on the sharded model (it takes
no draft), mlx_spec plain (no draft, no lookup) and mlx_spec (draft model and lookup, auto). The collectives
(all_sum, all_gather, send, recv) each variant builds are counted by wrapping mx.distributed's functions; a
collective's latency is timed as one decoding step's all_sum. Projection, the same formula for every variant:
seconds per token = t + c * L, where c is its collectives per token and t its measured seconds per token less
c times the latency measured here (its computing); L the hop latency of a network. Rank 0 prints the tables.
"""

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
from mlx_lm import stream_generate as mlx_lm_stream_generate
from mlx_lm.generate import generation_stream

from mlx_spec import load, speculative_generate_step
from mlx_spec.bench import PROMPTS
from mlx_spec.blas import ensure_openblas
from mlx_spec.distributed import world

COLLECTIVES = ("all_sum", "all_gather", "send", "recv", "recv_like", "all_max", "all_min", "sum_scatter")
LATENCIES_US = (10, 50, 300)
counts = Counter()  # collectives built, by name


def count_collectives():
    """Wrap mx.distributed's collectives (looked up at call time by mlx-lm's layers) so that each call counts."""
    for name in COLLECTIVES:
        original = getattr(mx.distributed, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(mx.distributed, name, counted)


def collective_latency(group, hidden: int, reps: int = 20, chain: int = 56) -> tuple[float, float]:
    """Seconds of one all_sum of a decoding step's activations (1, 1, hidden) float32: (alone, one evaluation
    each, a round trip with the host; in a graph, `chain` of them evaluated together, as a forward pass's are)."""
    x = mx.zeros((1, 1, hidden), mx.float32)

    def chained():
        y = x
        for _ in range(chain):
            y = mx.distributed.all_sum(y, group=group) * 0.5
        mx.eval(y)

    chained()
    start = time.perf_counter()
    for _ in range(reps):
        chained()
    in_graph = (time.perf_counter() - start) / (reps * chain)
    start = time.perf_counter()
    for _ in range(reps * 5):
        mx.eval(mx.distributed.all_sum(x, group=group))
    return (time.perf_counter() - start) / (reps * 5), in_graph


def run_variant(name, model, draft, tokenizer, prompt, max_tokens):
    """(tokens, seconds after the first token, collectives after the first token by name)."""
    tokens, first, at_first = [], None, None
    start = time.perf_counter()
    if name == "mlx-lm":
        steps = (r.token for r in mlx_lm_stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))
    else:
        with_draft = name.startswith("mlx_spec") and name != "mlx_spec plain"  # "mlx_spec" (auto), "mlx_spec k=N"
        k = int(name.split("k=")[1]) if "k=" in name else "auto"
        steps = (
            t
            for t, _, _ in speculative_generate_step(
                prompt,
                model,
                draft if with_draft else None,
                max_tokens=max_tokens,
                prompt_lookup=with_draft,
                num_draft_tokens=k,
            )
        )
    for token in steps:
        if first is None:
            first, at_first = time.perf_counter(), Counter(counts)
        tokens.append(token)
    seconds = time.perf_counter() - first
    mx.synchronize(generation_stream)  # mlx-lm left a step queued on its stream: its collectives end here
    return tokens, seconds, counts - at_first, first - start


def main():
    ensure_openblas()  # float32 on Linux: restarts the rank once with OpenBLAS preloaded
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="main model (default: the default pair's)")
    p.add_argument("--draft-model", help="draft model (default: the default pair's)")
    p.add_argument("--pipeline", action="store_true", help="split the main model in a pipeline")
    p.add_argument("--prompt", default="quicksort", help=f"one of {', '.join(PROMPTS)}, or text")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument(
        "--variants", default="mlx-lm,mlx_spec plain,mlx_spec", help="comma-separated: these three, or mlx_spec k=N"
    )
    p.add_argument("--out", default="benchmarks/out/distributed.json")
    args = p.parse_args()
    group = world()
    if group is None:
        sys.exit("run it under mlx.launch with two or more ranks (see the docstring)")
    rank0 = group.rank() == 0
    say = print if rank0 else (lambda *a, **k: None)
    main_path, draft_path = args.model, args.draft_model
    if main_path is None:
        from mlx_spec.fetch import default_pair_paths

        main_path, default_draft = default_pair_paths()
        draft_path = draft_path or default_draft
    count_collectives()
    model, tokenizer = load(str(main_path), group=group, pipeline=args.pipeline)
    draft, _ = load(str(draft_path))
    text = PROMPTS.get(args.prompt, args.prompt)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    hidden = model.args.hidden_size
    alone, latency = collective_latency(group, hidden)
    say(
        f"one all_sum of (1, 1, {hidden}) float32 over {group.size()} local ranks: {latency * 1e6:.0f} us in a "
        f"graph of 56, {alone * 1e6:.0f} us evaluated alone"
    )

    variants = args.variants.split(",")
    for name in variants:  # warm-up
        run_variant(name, model, draft, tokenizer, prompt, 8)
    runs = {name: [] for name in variants}
    for rep in range(args.repetitions):
        for name in variants if rep % 2 == 0 else variants[::-1]:
            tokens, seconds, collectives, ttft = run_variant(name, model, draft, tokenizer, prompt, args.max_tokens)
            runs[name].append(dict(tokens=tokens, seconds=seconds, collectives=dict(collectives), ttft=ttft))
            say(f"[{rep + 1}/{args.repetitions}] {name}: {(len(tokens) - 1) / seconds:.2f} tok/s", file=sys.stderr)
    same = all(r["tokens"] == runs[variants[0]][0]["tokens"] for rs in runs.values() for r in rs)

    rows = {}
    for name, rs in runs.items():
        decoded = [len(r["tokens"]) - 1 for r in rs]
        seconds_per_token = statistics.median(r["seconds"] / n for r, n in zip(rs, decoded))
        per_token = sum(sum(r["collectives"].values()) for r in rs) / sum(decoded)
        kinds = Counter()
        for r in rs:
            kinds.update(r["collectives"])
        rows[name] = dict(
            tps=1 / seconds_per_token,
            collectives_per_token=per_token,
            by_kind={k: v / sum(decoded) for k, v in kinds.items()},
            compute=max(seconds_per_token - per_token * latency, 0.0),
        )
    base = rows[variants[0]]
    split = "pipeline" if args.pipeline else "tensor parallel"
    say(f"\n{main_path} ({split}) + draft {draft_path}; {args.prompt}, greedy, {args.max_tokens} tokens, ")
    say(f"{args.repetitions} repetitions interleaved; every variant gave {variants[0]}'s tokens: {same}\n")
    say(f"| variant | tok/s here | x {variants[0]} | collectives / token | of {variants[0]}'s | by kind / token |")
    say("|---|---|---|---|---|---|")
    for name, r in rows.items():
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["by_kind"].items()))
        say(
            f"| {name} | {r['tps']:.2f} | {r['tps'] / base['tps']:.2f}x | {r['collectives_per_token']:.1f} | "
            f"{r['collectives_per_token'] / base['collectives_per_token']:.2f}x | {kinds} |"
        )
    say("\nProjected tok/s at a hop latency L (seconds per token = computing + collectives per token x L):\n")
    say("| variant | computing ms / token | " + " | ".join(f"L = {us} us" for us in LATENCIES_US) + " |")
    say("|---|---|" + "---|" * len(LATENCIES_US))
    projected = {}
    for name, r in rows.items():
        tps = [1 / (r["compute"] + r["collectives_per_token"] * us * 1e-6) for us in LATENCIES_US]
        projected[name] = tps
        say(f"| {name} | {r['compute'] * 1e3:.1f} | " + " | ".join(f"{t:.2f}" for t in tps) + " |")
    ours = rows[variants[-1]]
    ratios = [a / b for a, b in zip(projected[variants[-1]], projected[variants[0]])]
    say(f"| {variants[-1]} / {variants[0]} | | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    fewer = base["collectives_per_token"] - ours["collectives_per_token"]
    break_even = (ours["compute"] - base["compute"]) / fewer if fewer > 0 else float("inf")
    if break_even <= 0:
        say(f"\nBreak-even: none; {variants[-1]} computes a token faster and makes fewer hops: it wins at any latency.")
    else:
        say(f"\nBreak-even hop latency: {break_even * 1e6:.0f} us ({variants[-1]} pays beyond it).")
    if rank0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = dict(
            model=str(main_path),
            draft=str(draft_path),
            split=split,
            ranks=group.size(),
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            latency_us=latency * 1e6,
            latency_alone_us=alone * 1e6,
            same_tokens=same,
            rows=rows,
            projected=dict(latencies_us=LATENCIES_US, tps=projected),
            break_even_us=break_even * 1e6,
            runs=runs,
        )
        out.write_text(json.dumps(result, indent=1))
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # no rank leaves while another still sends


if __name__ == "__main__":
    main()
