#!/usr/bin/env python3
"""What one MTP draft step costs against a main decoding step, at the Qwen3.5 4B shape (random weights, float32).

  flock /tmp/mlx_spec_bench.lock python3 benchmarks/mtp_cost.py                 # ~3 min on a 2-core CPU
  flock /tmp/mlx_spec_bench.lock python3 benchmarks/mtp_cost.py --repeats 9 --json mtp_cost.json

The 4B shape (hidden 2560, 32 layers: 8 times 3 GatedDeltaNet layers and 1 full-attention layer, intermediate
9216, vocabulary 248320, tied embeddings; see benchmarks/hybrid_cost.py) needs ~17 GB in float32. It is
measured in parts that fit beside other work, each part whole at its real shape, in one process, the variants
interleaved pass by pass (medians over `--repeats` passes after a warm-up):

- a block of the body, the 4 layers the body repeats 8 times, over 1 .. 5 rows after a `--context`-token
  cache (a main step reads 1 row; a verify of k drafts k + 1);
- the output layer over a quarter of the vocabulary (62080 rows: a matrix-vector product costs what its bytes
  cost, so the whole layer is 4 of them), and over its first 32768 ids (`--draft-vocab-size 32768`);
- the MTP layer's step: its two input norms, `fc`, the full-attention decoder layer after a `--context`-entry
  cache, its norm (mlx_spec.mtp.MTPHead), without the output layer.

main step = 8 blocks(1 row) + 4 quarters;  MTP step = MTP layer + 4 quarters (or + the first 32768 ids).
Target: MTP step / main step <= 0.1. Then the projection of the speed-up for acceptance a per depth (each
draft accepted with probability a once those before it were): E(k) = 1 + a + a^2 + ... + a^k tokens per round,
a round costs verify(k + 1 rows) + k MTP steps, speed-up(k) = E(k) * main step / round; the best k is printed.

Beside it, the bandwidth-bound projection (Apple GPUs, where a decoding step reads every weight once and a verify
of up to 9 rows costs about one step): verify(k + 1 rows) = 1 main step, MTP step = its weight bytes over the main
model's (the whole 4B shape, counted without building it), k up to 8.

Last, the host reads: the engine's rounds on the 4-layer model with the MTP layer (vocabulary cut to 62080),
16 tokens, fixed k = 3: `GenerationStats.host_syncs` (the engine's `HostReads` count, one per `.tolist()` of
a round's result) against the rounds.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

sys.path.insert(0, str(Path(__file__).parent))
from hybrid_cost import COMMON, SHAPES, fill_weights, hybrid_model, num_params  # noqa: E402

from mlx_spec import GenerationStats, facts, speculative_generate_step  # noqa: E402
from mlx_spec.draft import first_rows  # noqa: E402
from mlx_spec.mtp import MTPHead  # noqa: E402

QUARTER = COMMON["vocab_size"] // 4  # 62080
SHORTLIST = 32768
BLOCK = 4  # layers the 4B body repeats: 3 GatedDeltaNet, 1 full attention
NUM_BLOCKS = SHAPES["4b"]["num_hidden_layers"] // BLOCK
MAX_K = 4


def block_model(seed: int):
    """mlx-lm's Qwen3.5 at the 4B shape with one block of 4 layers and a quarter of the vocabulary."""
    model = hybrid_model("4b", num_hidden_layers=BLOCK, vocab_size=QUARTER)
    fill_weights(model, 0.02, seed)
    model.eval()
    return model


def mtp_head(model, seed: int) -> MTPHead:
    text = model.language_model
    args = text.args
    head = MTPHead(type(text.model.layers[0])(args, args.full_attention_interval - 1), args.hidden_size, 1e-6)
    fill_weights(head, 0.02, seed + 1)
    head.eval()
    return head


def timed(fn, state_of) -> float:
    start = time.perf_counter()
    out = fn()
    mx.eval(out, state_of())
    return time.perf_counter() - start


def measure(model, head, context: int, repeats: int) -> dict:
    """Seconds of each part (see the module docstring), one list per part: a value per pass."""
    body, embed = model.language_model.model, model.language_model.model.embed_tokens
    prompt = mx.random.randint(0, QUARTER, (1, context))
    main_cache = mlx_lm_cache(model)
    body(prompt, cache=main_cache)
    mx.eval([c.state for c in main_cache])
    hidden = mx.random.normal((1, context, body.norm.weight.shape[0])) * 0.5
    mtp_cache = [KVCache()]
    head(embed(prompt), hidden, mtp_cache)
    mx.eval(mtp_cache[0].state)
    states = [list(c.state) if hasattr(c, "keys") else list(c.cache) for c in main_cache]
    row = mx.random.normal((1, 1, hidden.shape[-1]))

    def body_rows(n):
        def run():
            for cache, state in zip(main_cache, states):  # back to the context's end, as a rollback would
                if hasattr(cache, "keys"):
                    cache.offset = context
                else:
                    cache.cache = list(state)
            return body(mx.random.randint(0, QUARTER, (1, n)), cache=main_cache)

        return run

    def mtp_step():
        mtp_cache[0].offset = context
        return head(embed(mx.array([[7]])), row, mtp_cache)

    layer = model.language_model.model.embed_tokens
    parts = {f"block x{n}": body_rows(n) for n in range(1, MAX_K + 2)}
    parts |= {
        f"quarter x{n}": (lambda n=n: layer.as_linear(mx.random.normal((n, row.shape[-1]))))
        for n in range(1, MAX_K + 2)
    }
    parts["first 32768 ids"] = lambda: first_rows(layer, row[0], SHORTLIST)
    parts["mtp layer"] = mtp_step
    names = list(parts)
    seconds = {name: [] for name in names}
    state_of = lambda: [c.state for c in main_cache] + [mtp_cache[0].state]  # noqa: E731
    for name in names:  # warm-up
        timed(parts[name], state_of)
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # a rotated order each pass
            seconds[name].append(timed(parts[name], state_of))
    return seconds


def host_reads(model, head) -> tuple[int, int, int]:
    """(host syncs, rounds, MTP rounds) of the engine's rounds with the MTP layer (facts: as `head_for` keeps
    it)."""
    facts.of(model).mtp = head
    stats = GenerationStats()
    prompt = mx.random.randint(0, QUARTER, (32,)).tolist()
    for _ in speculative_generate_step(
        prompt, model, "mtp", num_draft_tokens=3, max_tokens=16, prompt_lookup=False, stats=stats
    ):
        pass
    return stats.host_syncs, stats.num_rounds, stats.rounds_by_source["mtp"]


def bytes_ratios() -> tuple[float, float]:
    """(MTP step / main step, the same with the first 32768 ids) in weight bytes read, at the whole 4B shape (built
    lazily: nothing is allocated). Where a step is bound by memory bandwidth (Apple GPUs), this is its cost ratio."""
    model = hybrid_model("4b")
    text = model.language_model
    args = text.args
    head = MTPHead(type(text.model.layers[0])(args, args.full_attention_interval - 1), args.hidden_size, 1e-6)
    output_layer = args.vocab_size * args.hidden_size  # tied: the embedding table, read whole by the output layer
    main = num_params(model)  # the embedding table counted once: a step reads one row of it for the input
    return (num_params(head) + output_layer) / main, (num_params(head) + SHORTLIST * args.hidden_size) / main


def project(main_step: float, verify: dict, mtp_step: float, acceptance: float) -> tuple[float, int]:
    """(best speed-up over plain decoding, its k) for acceptance `acceptance` per depth; `verify[k]`: seconds of a
    verify over k + 1 rows."""
    best = (1.0, 0)
    for k in verify:
        expected = sum(acceptance**i for i in range(k + 1))
        best = max(best, (expected * main_step / (verify[k] + k * mtp_step), k))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--context", type=int, default=256, help="tokens in the caches before the step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    try:
        from mlx_spec.blas import ensure_openblas
    except ImportError:
        pass
    else:
        ensure_openblas()  # may re-execute this process with OpenBLAS preloaded
    mx.random.seed(args.seed)
    model = block_model(args.seed)
    head = mtp_head(model, args.seed)
    from mlx_spec.blas import blas_info

    print(f"BLAS: {blas_info()}")
    passes = measure(model, head, args.context, args.repeats)
    t = {name: statistics.median(values) for name, values in passes.items()}
    for name, values in passes.items():
        print(f"{name:>18}: {1e3 * t[name]:8.2f} ms (median; {1e3 * min(values):.1f}..{1e3 * max(values):.1f})")
    output_layer = 4 * t["quarter x1"]
    main_step = NUM_BLOCKS * t["block x1"] + output_layer
    verify = {k: NUM_BLOCKS * t[f"block x{k + 1}"] + 4 * t[f"quarter x{k + 1}"] for k in range(1, MAX_K + 1)}
    mtp_full = t["mtp layer"] + output_layer
    mtp_short = t["mtp layer"] + t["first 32768 ids"]
    per_pass = [  # the ratio within each pass: the parts of one pass ran back to back
        (passes["mtp layer"][i] + 4 * passes["quarter x1"][i])
        / (NUM_BLOCKS * passes["block x1"][i] + 4 * passes["quarter x1"][i])
        for i in range(args.repeats)
    ]
    print(f"MTP step / main step per pass: {', '.join(f'{r:.3f}' for r in sorted(per_pass))}")
    print(f"main step (composed): {1e3 * main_step:.1f} ms; verify of k+1 rows / main step: "
          + ", ".join(f"k={k} {v / main_step:.2f}" for k, v in verify.items()))  # fmt: skip
    print(f"MTP step / main step: {mtp_full / main_step:.3f} (whole vocabulary), "
          f"{mtp_short / main_step:.3f} (--draft-vocab-size {SHORTLIST})")  # fmt: skip
    by_bytes = bytes_ratios()
    print(f"MTP step / main step in weight bytes read: {by_bytes[0]:.3f} (whole vocabulary), {by_bytes[1]:.3f} "
          f"(--draft-vocab-size {SHORTLIST})")  # fmt: skip
    syncs, rounds, mtp_rounds = host_reads(model, head)
    print(f"host reads: {syncs} in {rounds} rounds ({mtp_rounds} of them drafted by the MTP layer)")
    projection = {}
    bound = {k: 1.0 for k in range(1, 9)}  # bandwidth-bound (Apple GPUs): a verify of k + 1 <= 9 rows, one step
    for a in (0.6, 0.75, 0.9):
        full, short = project(main_step, verify, mtp_full, a), project(main_step, verify, mtp_short, a)
        gpu_full, gpu_short = project(1.0, bound, by_bytes[0], a), project(1.0, bound, by_bytes[1], a)
        projection[a] = dict(whole=full, shortlist=short, bound_whole=gpu_full, bound_shortlist=gpu_short)
        print(
            f"acceptance {a}: this CPU {full[0]:.2f}x (k={full[1]}), with the shortlist {short[0]:.2f}x "
            f"(k={short[1]}); bandwidth-bound {gpu_full[0]:.2f}x (k={gpu_full[1]}), with the shortlist "
            f"{gpu_short[0]:.2f}x (k={gpu_short[1]})"
        )
    if args.json:
        out = dict(
            parts=t,
            passes=passes,
            per_pass=per_pass,
            main_step=main_step,
            verify=verify,
            mtp_step=dict(whole=mtp_full, shortlist=mtp_short),
        )
        out |= dict(
            bytes_ratios=by_bytes,
            host_syncs=syncs,
            rounds=rounds,
            mtp_rounds=mtp_rounds,
            projection=projection,
            args=vars(args),
        )
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
