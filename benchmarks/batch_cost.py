#!/usr/bin/env python3
"""The cost of one main forward over B sequences x (k+1) rows, and the aggregate tok/s it bounds.

  python3 benchmarks/batch_cost.py [--context 200] [--repetitions 3] [--acceptance 0.6]

Times one forward of the default main model over B sequences of `context` cached tokens each, verifying k+1
rows per sequence (B = 1, 2, 4, 8; k = 0..4), as a batched round does. With a per-position acceptance a,
a round of k drafts emits E(k) = (1 - a^(k+1)) / (1 - a) tokens per sequence (Leviathan et al.), so the
round's aggregate rate is B * E(k) / T(B, k); the best k at each B bounds what batched speculative rounds give
here (draft proposals not counted: prompt lookup is nearly free). Prints the table and the bound, then the same
bound for a device where T(B, k) = T(B, 0) (verifying more rows nearly free, as on an Apple GPU at small
batches). With a draft model, each draft step adds `--draft-ratio` of a main step there: E(k) / (1 + ratio * k).
Also times the forward of a batched round as the server runs it, gathered from each request's own
caches, against one batch cache.
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.models.cache import KVCache

import mlx_spec
from mlx_spec.blas import ensure_openblas
from mlx_spec.fetch import default_pair_paths


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a round of k drafts emits on average at per-position acceptance `acceptance`."""
    return float(k + 1) if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def gathered_cost(model, batch: int, context: int, k: int, repetitions: int) -> float:
    """Median seconds of one forward over `batch` sequences of k+1 rows, each with its own KVCaches."""
    from mlx_spec.batch import batched_logits

    layers = []
    for b in range(batch):
        caches = [KVCache() for _ in model.layers]
        model(mx.random.randint(0, 1000, (1, context + b)), cache=caches)  # ragged: each its own length
        mx.eval([c.state for c in caches])
        layers.append(caches)
    samples = []
    for _ in range(repetitions + 1):
        rows = [mx.random.randint(0, 1000, (k + 1,)) for _ in range(batch)]
        mx.eval(rows)
        start = time.perf_counter()
        mx.eval(batched_logits(model, rows, layers, [k + 1] * batch))
        samples.append(time.perf_counter() - start)
        for caches in layers:
            for c in caches:
                c.trim(k + 1)
    return statistics.median(samples[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--acceptance", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--max-draft", type=int, default=4)
    p.add_argument("--draft-ratio", type=float, default=0.33, help="a batched draft step's cost / a main step's")
    args = p.parse_args(argv)
    ensure_openblas()  # as mlx-spec's CLI: the mlx-cpu wheel's reference BLAS is ~40x slower
    model, _ = mlx_spec.load(str(default_pair_paths()[0]))
    times, overhead = {}, {}
    for batch in args.batches:
        caches = [KVCache() for _ in model.layers]
        prompt = mx.random.randint(0, 1000, (batch, args.context))
        model(prompt, cache=caches)
        mx.eval([c.state for c in caches])
        for k in range(args.max_draft + 1):
            samples = []
            for _ in range(args.repetitions + 1):
                rows = mx.random.randint(0, 1000, (batch, k + 1))
                mx.eval(rows)
                start = time.perf_counter()
                mx.eval(model(rows, cache=caches))
                samples.append(time.perf_counter() - start)
                for c in caches:
                    c.trim(k + 1)
            times[batch, k] = statistics.median(samples[1:])
            print(f"B={batch} k={k} rows={batch * (k + 1)}: {1000 * times[batch, k]:.0f} ms", flush=True)
        if batch > 1:  # the same forward over B separate caches, gathered as a batched round does (batch.py)
            gathered = gathered_cost(model, batch, args.context, 2, args.repetitions)
            print(f"B={batch} k=2 gathered from {batch} caches: {1000 * gathered:.0f} ms", flush=True)
            overhead[batch] = gathered / times[batch, 2]
    print("\nT(B, k) ms, one forward over B x (k+1) rows:")
    print("B  " + "".join(f"{'k=' + str(k):>8}" for k in range(args.max_draft + 1)))
    for batch in args.batches:
        print(f"{batch:<3}" + "".join(f"{1000 * times[batch, k]:8.0f}" for k in range(args.max_draft + 1)))
    print(
        "\ngathered from separate caches / one batch cache, k=2: "
        + ", ".join(f"B={b} {r:.2f}x" for b, r in overhead.items())
    )
    for a in args.acceptance:
        print(f"\nacceptance {a}: aggregate tok/s = B * E(k) / T(B, k), best k (plain k=0 for reference)")
        for batch in args.batches:
            rate = {k: batch * expected_tokens(a, k) / times[batch, k] for k in range(args.max_draft + 1)}
            best = max(rate, key=rate.get)
            free = batch * expected_tokens(a, args.max_draft) / times[batch, 0]
            drafted = {k: expected_tokens(a, k) / (1 + args.draft_ratio * k) for k in range(args.max_draft + 1)}
            k_d = max(drafted, key=drafted.get)
            print(
                f"  B={batch}: plain {rate[0]:.2f}, best k={best} {rate[best]:.2f} tok/s ({rate[best] / rate[0]:.2f}x);"
                f" rows free (GPU): copies k={args.max_draft} {free / rate[0]:.2f}x,"
                f" draft model k={k_d} {drafted[k_d]:.2f}x"
            )


if __name__ == "__main__":
    main()
