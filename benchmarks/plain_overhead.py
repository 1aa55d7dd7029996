#!/usr/bin/env python3
"""Per-token host overhead of decoding loops: mlx-lm's against mlx_spec's, plain and at k = 4.

  python3 benchmarks/plain_overhead.py [--tokens 200] [--repetitions 7]   # about 3 min on a 2-core CPU

On a model whose layers are tiny (the default pair's main architecture, 28
layers, hidden size 256), a step costs mostly the building and dispatching of
its graph, which is where a decoding loop's own overhead shows. Three loops,
interleaved: mlx-lm's generate_step; mlx_spec with no draft; and mlx_spec
with a draft that never drafts (k = 0 every round). Both of mlx_spec's queue
each step before the previous token is read, as mlx-lm does; the second also
asks its policy each round. Then a round's overhead at equal k: mlx-lm's
speculative_generate_step against mlx_spec, k = 4, with a copy of the model as
the draft (every draft accepted: the same rounds in both). Prints ms per token
and each loop's ratio to mlx-lm's of its kind.
"""

import argparse
import importlib
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.generate import speculative_generate_step as mlx_lm_speculative
from mlx_lm.models import qwen2

from mlx_spec import speculative_generate_step
from mlx_spec.decode import FixedDraft

# Qwen2.5-1.5B's layout with tiny matrices: same number of operations per step, almost no arithmetic.
CONFIG = dict(
    model_type="qwen2",
    hidden_size=256,
    num_hidden_layers=28,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    vocab_size=4096,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repetitions", type=int, default=7)
    args = parser.parse_args(argv)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(CONFIG))
    mx.eval(model.parameters())
    prompt = list(range(1, 20))
    generate_module = importlib.import_module("mlx_spec.generate")

    def mlx_lm():
        return list(generate_step(mx.array(prompt), model, max_tokens=args.tokens))

    def no_draft():
        return list(speculative_generate_step(prompt, model, None, max_tokens=args.tokens, prompt_lookup=False))

    def never_drafts():
        policy = generate_module._policy
        generate_module._policy = lambda *_: FixedDraft(0)
        try:
            return list(speculative_generate_step(prompt, model, model, max_tokens=args.tokens, prompt_lookup=False))
        finally:
            generate_module._policy = policy

    def mlx_lm_k4():
        return list(mlx_lm_speculative(mx.array(prompt), model, model, num_draft_tokens=4, max_tokens=args.tokens))

    def ours_k4():
        steps = speculative_generate_step(
            prompt, model, model, num_draft_tokens=4, max_tokens=args.tokens, prompt_lookup=False
        )
        return list(steps)

    plain, spec = "mlx-lm generate_step", "mlx-lm speculative_generate_step, k = 4"
    loops = {
        plain: mlx_lm,
        "mlx_spec, no draft": no_draft,
        "mlx_spec, a draft that never drafts (k = 0 rounds)": never_drafts,
        spec: mlx_lm_k4,
        "mlx_spec, k = 4 (every draft accepted)": ours_k4,
    }
    baseline = {name: spec if "k = 4" in name else plain for name in loops}
    times = {name: [] for name in loops}
    for rep in range(args.repetitions + 1):  # the first pass warms up
        for name, loop in loops.items():
            start = time.perf_counter()
            loop()
            if rep:
                times[name].append(1e3 * (time.perf_counter() - start) / args.tokens)
    print("| loop | ms per token, median | min | against mlx-lm's (median of per-pass ratios) |\n|---|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, times[baseline[name]]))
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
