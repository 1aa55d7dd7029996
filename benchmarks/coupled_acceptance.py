#!/usr/bin/env python3
"""What a seed costs in acceptance: coupled sampling against rejection sampling and exact match, on the same texts.

  python3 benchmarks/coupled_acceptance.py [--prompt story --prompt quicksort] [--temp 0.7] [--max-tokens 96]

A seeded call samples by coupled sampling (the same text at any draft length: `mlx_spec.sampling.CoupledDraws`); an
unseeded one by rejection sampling. For each prompt this samples one text with the main model of the default pair
(seed 1), then, at every position of it, reads p (main) and q (draft) shaped by the same settings and prints the mean
per-position acceptance of a draft token under each rule, in closed form (no sampling noise):
  rejection sampling  sum_x min(p_x, q_x)
  coupled sampling    sum_x 1 / sum_y max(p_y / p_x, q_y / q_x)   (shared Gumbel noise)
  exact match         sum_x p_x q_x                                (mlx-lm's rule: independent draws)
The coupled sum runs over the TOP tokens of p (their mass is printed): each other x adds at most p_x.
"""

import argparse
import sys

import numpy as np

TOP = 512


def acceptances(p: np.ndarray, q: np.ndarray) -> tuple[float, float, float, float]:
    """(rejection, coupled, exact match, mass of p the coupled sum covers) for one position."""
    top = np.argsort(-p)[:TOP]
    coupled = sum(1 / np.maximum(p / p[x], q / q[x]).sum() for x in top if p[x] > 0 and q[x] > 0)
    return float(np.minimum(p, q).sum()), float(coupled), float((p * q).sum()), float(p[top].sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", action="append", help="a benchmark prompt name (default: story, quicksort)")
    parser.add_argument("--temp", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)

    from mlx_spec.blas import ensure_openblas

    ensure_openblas()  # may re-execute this process with OpenBLAS preloaded
    import mlx.core as mx

    from mlx_spec import load, speculative_generate_step
    from mlx_spec.bench import ALL_PROMPTS, _encode
    from mlx_spec.fetch import fetch_default_pair
    from mlx_spec.sampling import SamplingParams, filtered_scores, fit_vocab, log_probs

    main_path, draft_path = fetch_default_pair(progress=lambda s: print(s, file=sys.stderr))
    main_model, tokenizer = load(str(main_path))
    draft_model = load(str(draft_path))[0]
    params = SamplingParams(temp=args.temp)
    vocab = main_model.args.vocab_size

    def shaped(model, tokens):
        logits = fit_vocab(model(mx.array(tokens)[None])[0].astype(mx.float32), vocab)
        return np.array(mx.softmax(filtered_scores(log_probs(logits), params), axis=-1))

    print("| prompt | positions | rejection sampling | coupled sampling (seed) | exact match | p mass covered |")
    print("|---|---|---|---|---|---|")
    for name in args.prompt or ["story", "quicksort"]:
        prompt = _encode(tokenizer, ALL_PROMPTS[name])
        steps = speculative_generate_step(
            prompt, main_model, None, max_tokens=args.max_tokens, temp=args.temp, seed=1, prompt_lookup=False
        )
        text = [t for t, _, _ in steps]
        tokens = list(prompt) + text
        p_all, q_all = shaped(main_model, tokens), shaped(draft_model, tokens)
        rows = [acceptances(p_all[t], q_all[t]) for t in range(len(prompt) - 1, len(tokens) - 1)]
        rejection, coupled, exact, covered = np.mean(rows, axis=0)
        print(f"| {name} | {len(rows)} | {rejection:.3f} | {coupled:.3f} | {exact:.3f} | {covered:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
