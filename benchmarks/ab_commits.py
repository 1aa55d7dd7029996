#!/usr/bin/env python3
"""Another commit's engine against this one, in one process on the default pair: the same tokens? how fast?

  python3 benchmarks/ab_commits.py COMMIT [--prompt quicksort --prompt story] [--max-tokens 128] [--repetitions 2]

The other commit's `mlx_spec` is exported with `git archive` and imported as `mlx_spec_old` (the package imports
itself relatively), so both engines share one process, one pair of loaded models and the machine's drift. For each
prompt and draft length (k=4 and auto, each engine's controller learning in its own process-wide store), the two run
greedy, interleaved in alternating order after a warm-up; it prints each run's tok/s, new / old per repetition and
their geometric mean, and whether every run gave the same tokens.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def export(commit: str, folder: Path) -> None:
    """`commit`'s mlx_spec package as `folder`/mlx_spec_old."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
    archive = subprocess.run(
        ["git", "-C", root.stdout.strip(), "archive", commit, "mlx_spec"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    (folder / "mlx_spec").rename(folder / "mlx_spec_old")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commit")
    parser.add_argument("--prompt", action="append", help="a benchmark prompt name (default: quicksort, story)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=2)
    args = parser.parse_args(argv)

    from mlx_spec.blas import ensure_openblas

    ensure_openblas()  # may re-execute this process with OpenBLAS preloaded
    folder = Path(tempfile.mkdtemp(prefix="mlx_spec_old_"))
    export(args.commit, folder)
    sys.path.insert(0, str(folder))
    import mlx_spec_old

    import mlx_spec
    from mlx_spec.bench import ALL_PROMPTS, _encode
    from mlx_spec.fetch import fetch_default_pair

    main_path, draft_path = fetch_default_pair(progress=lambda s: print(s, file=sys.stderr))
    main_model, tokenizer = mlx_spec.load(str(main_path))
    draft_model = mlx_spec.load(str(draft_path))[0]
    engines = {"old": mlx_spec_old.speculative_generate_step, "new": mlx_spec.speculative_generate_step}

    def run(name, prompt, k):
        start = time.perf_counter()
        steps = engines[name](prompt, main_model, draft_model, max_tokens=args.max_tokens, num_draft_tokens=k)
        tokens = [t for t, _, _ in steps]
        return tokens, len(tokens) / (time.perf_counter() - start)

    print(f"| prompt | k | new / old by repetition | geometric mean | same tokens |  (old = {args.commit})")
    print("|---|---|---|---|---|")
    for name in args.prompt or ["quicksort", "story"]:
        prompt = _encode(tokenizer, ALL_PROMPTS[name])
        run("old", prompt, 4), run("new", prompt, 4)  # warm-up
        for k in (4, "auto"):
            ratios, same = [], True
            for rep in range(args.repetitions):
                order = ("old", "new") if rep % 2 == 0 else ("new", "old")
                runs = {engine: run(engine, prompt, k) for engine in order}
                same &= runs["old"][0] == runs["new"][0]
                ratios.append(runs["new"][1] / runs["old"][1])
                print(
                    f"  {name} k={k}: " + ", ".join(f"{e} {r[1]:.2f} tok/s" for e, r in runs.items()), file=sys.stderr
                )
            ratio_list = " ".join(f"{r:.3f}" for r in ratios)
            print(f"| {name} | {k} | {ratio_list} | {statistics.geometric_mean(ratios):.3f} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
