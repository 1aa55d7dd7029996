#!/usr/bin/env python3
"""What speculating on a hybrid model (Qwen3.5: GatedDeltaNet in 3 of 4 layers) costs, against an attention-only one.

  python3 benchmarks/hybrid_cost.py                          # both shapes, ~5 min on a 2-core CPU
  python3 benchmarks/hybrid_cost.py --shape 0.8b --repeats 3 --json hybrid_cost.json

A hybrid model's recurrent layers cannot be trimmed: before each forward mlx_spec keeps their state
(`recurrent.mark`, a copy of a list of array references), and on a partial acceptance (a of k drafts)
`CachePair.rollback()` puts them back and trims the attention layers to the round's start; the next
round's forward reads the a + 1 tokens again with its own last token and drafts (a + 2 + k rows, not
1 + k). Random-weight float32 models at real shapes (nothing downloaded), a cache prefilled with
`--prompt-tokens` tokens (`decode.prefill`, as the engine does), and the engine's own functions:

1. a main step (`verify.score` over 1 row) and a verify forward over k + 1 = 5 rows, both models;
2. recording: the hybrid's 5-row verify with `recurrent.mark` before it (as `verify.score` does) against
   the same forward with `mark` made a no-op (target: <= 1.05x);
3. commit: after a 5-row forward, `CachePair.rollback()` to a partial acceptance and `mx.eval` of the cache
   state, as a fraction of a main step (target: <= 0.05);
4. the verify forward over 5 + m rows, m = 0..5 (m tokens read again before the last one and 4 drafts);
   the attention model never needs them, its curve is there for comparison;
5. a projection over `benchmarks/traces.json` (per-position greedy agreement, or acceptance probability
   at temperature 0.7, of the real Qwen2.5-Coder 1.5B/0.5B pair on the benchmark prompts): fixed k = 4,
   rounds of draft cost k * r * main step plus the measured verify forward over k + 1 rows (attention
   model) or k + 1 + carry rows (hybrid; carry = a + 1 after a partial round, 0 after a full one), plus the
   measured commit after a partial round. r is the traces' `cost_ratio` (0.32: the weight bytes of the
   0.5B draft over the 1.5B main model, what benchmarks/replay.py uses) unless `--draft-ratio` is given.
   Prints each model's speed-up over its own plain decoding and hybrid / attention (target >= 0.95), and
   the hybrid as if it could be trimmed (no re-read rows): hybrid / trimmable is what the re-reading costs.

Timings are medians over `--repeats` passes after a warm-up; in each pass every variant runs once, in an
order rotated from pass to pass; the recording pair runs back to back, A B and B A in turn, and its ratio is
the median of the per-pass ratios. Each timed call ends with `mx.eval` of the log-probabilities and of every
cache array. The cache then goes back to the prompt's end: attention layers trimmed, recurrent layers given
fresh copies of the prompt's state, so that between steps only the cache holds a state, as in the engine (a
state kept by `mark` is a second reference, the one thing the recording pair differs in). The commit is
timed after the 5-row forward, on the state `mark` kept.
Where both models of a shape do not fit in memory together (4B in float32: ~17 + ~15 GB), they are built
and measured one after the other.

Shapes (the text model of each; `qwen3_5` ModelArgs, dense, no MoE; mlx-lm's layer layout: every 4th
layer full attention), from the `text_config` of Qwen/Qwen3.5-0.8B and Qwen/Qwen3.5-4B `config.json` as
public code that pins those configs reproduces them:

  0.8B: hidden 1024, 24 layers, intermediate 3584, 8 heads / 2 KV heads of head_dim 256 (gated output),
        linear attention 16 key heads / 16 value heads of dims 128 / 128, conv kernel 4
  4B:   hidden 2560, 32 layers, intermediate 9216, 16 heads / 4 KV heads of head_dim 256 (gated output),
        linear attention 16 key heads / 32 value heads of dims 128 / 128, conv kernel 4
  both: vocabulary 248320, tied embeddings, full_attention_interval 4, rope theta 1e7 on 1/4 of head_dim

The attention-only model is mlx-lm's `qwen3` with the same hidden size, layers, heads, head_dim,
intermediate size and vocabulary. Weights: normal draws * `--std` (0.02), float32; the matrices are tiled
from a 16M-value pool of draws at a random offset each (fresh draws for ~4B parameters take minutes on
this CPU; the values do not change what a forward costs). Norm weights stay at their initial ones.
"""

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import qwen3, qwen3_5

from mlx_spec import verify
from mlx_spec.cache import make_prompt_cache
from mlx_spec.decode import prefill
from mlx_spec.recurrent import RecurrentCache, leaves, recurrent
from mlx_spec.sampling import SamplingParams

SHAPES = {
    "0.8b": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        intermediate_size=3584,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=16,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
    ),
    "4b": dict(
        hidden_size=2560,
        num_hidden_layers=32,
        intermediate_size=9216,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
    ),
}
COMMON = dict(vocab_size=248320, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=262144)
ROPE_THETA = 1e7
K = 4  # draft tokens per round
MAX_CARRY = 5  # tokens read again, at most, in the curve (a partial round of k = 4 gives back at most 4)
POOL = 1 << 24  # normal draws the weights are tiled from
GREEDY = SamplingParams()
HYBRID, ATTENTION, TRIMMABLE = "hybrid", "attention", "trimmable"
TRACES = Path(__file__).with_name("traces.json")


# --- models --------------------------------------------------------------------------------------
def hybrid_model(shape: str, **overrides):
    """mlx-lm's Qwen3.5 (the multimodal wrapper's text model, as mlx-lm loads Qwen3.5 checkpoints); `overrides`
    replace sizes of the shape (fewer layers, a smaller vocabulary)."""
    rope = dict(rope_type="default", rope_theta=ROPE_THETA, partial_rotary_factor=0.25, mrope_section=[11, 11, 10])
    text = dict(
        model_type="qwen3_5_text",
        **{**SHAPES[shape], **COMMON, **overrides},
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        rope_parameters=rope,
    )
    return qwen3_5.Model(qwen3_5.ModelArgs.from_dict(dict(model_type="qwen3_5", text_config=text)))


def attention_model(shape: str):
    """mlx-lm's Qwen3 with the hybrid's sizes: every layer full attention."""
    sizes = {k: v for k, v in SHAPES[shape].items() if not k.startswith("linear_")}
    return qwen3.Model(qwen3.ModelArgs(model_type="qwen3", rope_theta=ROPE_THETA, **sizes, **COMMON))


BUILDERS = {HYBRID: hybrid_model, ATTENTION: attention_model}


def num_params(model) -> int:
    return sum(p.size for _, p in tree_flatten(model.parameters()))


def tiled(pool: mx.array, shape: tuple, rng: np.random.Generator) -> mx.array:
    """A float32 array of `shape` filled from `pool`: a block of whole rows repeated, from a random offset."""
    rows, cols = shape[0], math.prod(shape[1:])
    block = next(d for d in range(min(rows, POOL // cols), 0, -1) if rows % d == 0)  # rows per repeated block
    start = int(rng.integers(0, POOL - block * cols + 1))
    pattern = pool[start : start + block * cols].reshape(1, block, cols)
    return mx.contiguous(mx.broadcast_to(pattern, (rows // block, block, cols))).reshape(shape)


def fill_weights(model, std: float, seed: int):
    """Replace every matrix of `model` by normal draws * std (tiled, see `tiled`), one at a time."""
    rng = np.random.default_rng(seed)
    pool = mx.random.normal((POOL,), key=mx.random.key(seed)) * std
    mx.eval(pool)
    for name, param in tree_flatten(model.parameters()):
        if param.ndim >= 2:
            weight = tiled(pool, param.shape, rng)
            mx.eval(weight)
            model.update(tree_unflatten([(name, weight)]), strict=False)
    mx.eval(model.parameters())


def build(kind: str, shape: str, std: float, seed: int):
    model = BUILDERS[kind](shape)
    fill_weights(model, std, seed)
    model.eval()
    return model


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def fit_together(shape: str) -> bool:
    """Whether both models of `shape` fit in memory at once, with room to spare (shapes only, nothing built)."""
    needed = sum(4 * num_params(BUILDERS[kind](shape)) for kind in BUILDERS)
    return needed < 0.8 * available_bytes()


# --- the engine's steps on a prefilled cache -------------------------------------------------------
def copies(arrays: list) -> list:
    """New buffers holding the same values (evaluated)."""
    out = [None if a is None else a + 0 for a in arrays]
    mx.eval([a for a in out if a is not None])
    return out


@contextmanager
def no_marking():
    """`verify.score` without `recurrent.mark` before its forward (the state is then not kept)."""
    saved = verify.mark
    verify.mark = lambda *args, **kwargs: None
    try:
        yield
    finally:
        verify.mark = saved


class Prefilled:
    """A model and its CachePair holding `prompt_tokens` tokens; each step goes back to them afterwards.

    The recurrent layers go back to fresh copies of their state at the prompt's end: arrays only the cache
    holds, as between two rounds of the engine (nothing else keeps them alive; a kept state, `mark`, does).
    """

    def __init__(self, model, prompt_tokens: int, seed: int):
        self.model, self.prompt_tokens = model, prompt_tokens
        self.rng = np.random.default_rng(seed)
        self.vocab = COMMON["vocab_size"]
        self.caches = make_prompt_cache(model)
        self.caches.tokens = self.rng.integers(0, self.vocab, prompt_tokens + 1).tolist()
        prefill(model, self.caches.main, self.caches.tokens[:-1], self.caches, lambda _: None)
        self.snapshot = [copies(c.cache) for c in recurrent(self.caches.main)]

    def state(self) -> list:
        return [c.state for c in leaves(self.caches.main)]

    def inputs(self, num_carried: int, num_draft: int) -> tuple[mx.array, mx.array]:
        ids = mx.array(self.rng.integers(0, self.vocab, num_carried + 1 + num_draft), mx.int32)
        mx.eval(ids)
        return ids[: num_carried + 1], ids[num_carried + 1 :]

    def restore(self):
        """Back to the prompt's end: attention layers trimmed, recurrent layers given copies of its state."""
        self.caches.tokens = self.caches.tokens[: self.prompt_tokens + 1]
        for cache in leaves(self.caches.main):
            if not isinstance(cache, RecurrentCache):
                cache.trim(cache.offset - self.prompt_tokens)
        for cache, arrays in zip(recurrent(self.caches.main), self.snapshot):
            cache.state = (copies(arrays), cache.left_padding, cache.lengths, self.prompt_tokens)
        mx.eval(self.state())
        assert self.caches.main_offset == self.prompt_tokens

    def forward(self, num_carried: int = 0, num_draft: int = K, keep: bool = True, restore: bool = True) -> float:
        """Seconds of `verify.score` over num_carried + 1 + num_draft rows, until the logprobs and cache are in."""
        last, drafts = self.inputs(num_carried, num_draft)
        with nullcontext() if keep else no_marking():
            start = time.perf_counter()
            logprobs, _ = verify.score(self.model, self.caches.main, last, drafts, GREEDY)
            mx.eval(logprobs, self.state())
            seconds = time.perf_counter() - start
        if restore:
            self.restore()
        return seconds

    def commit(self, num_accepted: int = 1) -> tuple[float, float]:
        """(seconds of a 5-row verify, seconds of the rollback after it to `num_accepted` accepted drafts and
        the `mx.eval` of the cache state)."""
        forward = self.forward(restore=False)
        self.caches.tokens = self.caches.tokens[: self.prompt_tokens + 1] + [0] * (num_accepted + 1)
        start = time.perf_counter()
        assert self.caches.rollback()
        mx.eval(self.state())
        seconds = time.perf_counter() - start
        self.restore()
        return forward, seconds

    def recording(self, without_first: bool) -> tuple[float, float]:
        """(seconds without mark, with mark) of the 5-row verify, one after the other."""
        if without_first:
            without = self.forward(keep=False)
            return without, self.forward(keep=True)
        with_mark = self.forward(keep=True)
        return self.forward(keep=False), with_mark


def variants(kind: str, engine: Prefilled) -> dict:
    """name -> a call timing it once, given the pass number."""
    out = {"main": lambda _: engine.forward(num_draft=0), "commit": lambda _: engine.commit()}
    for m in range(1, MAX_CARRY + 1):
        out[f"rows {K + 1 + m}"] = lambda _, m=m: engine.forward(num_carried=m)
    if kind == HYBRID:
        out["recording"] = lambda rep: engine.recording(without_first=rep % 2 == 0)
    return out


def measure(engines: dict, repeats: int) -> dict:
    """kind -> name -> list of timings: every variant of every engine once per pass, in an order rotated
    from pass to pass, after a warm-up (the longest forward, a main step and a commit of each engine)."""
    for engine in engines.values():
        engine.forward(num_carried=MAX_CARRY)
        engine.forward(num_draft=0)
        engine.commit()
    calls = [(kind, name, call) for kind, engine in engines.items() for name, call in variants(kind, engine).items()]
    times = {kind: {} for kind in engines}
    for rep in range(repeats):
        shift = rep % len(calls)
        for kind, name, call in calls[shift:] + calls[:shift]:
            times[kind].setdefault(name, []).append(call(rep))
    return times


def summary(times: dict) -> dict:
    """Medians (seconds) of one model's timings, and the recording ratio (median of per-pass ratios)."""
    out = {name: statistics.median(values) for name, values in times.items() if name not in ("commit", "recording")}
    out[f"rows {K + 1}"] = statistics.median(forward for forward, _ in times["commit"])
    out["commit"] = statistics.median(seconds for _, seconds in times["commit"])
    if "recording" in times:
        pairs = times["recording"]
        out["recording"] = dict(
            without=statistics.median(a for a, _ in pairs),
            with_mark=statistics.median(b for _, b in pairs),
            ratio=statistics.median(b / a for a, b in pairs),
        )
    return out


def prefilled(kind: str, shape: str, args) -> Prefilled:
    start = time.perf_counter()
    mx.reset_peak_memory()
    engine = Prefilled(build(kind, shape, args.std, args.seed), args.prompt_tokens, args.seed)
    print(
        f"[{shape}] {kind}: {num_params(engine.model) / 1e9:.2f}B parameters, built and prefilled in "
        f"{time.perf_counter() - start:.0f} s, peak memory {mx.get_peak_memory() / 2**30:.1f} GiB",
        file=sys.stderr,
    )
    return engine


def measure_shape(shape: str, args) -> dict:
    """Build, prefill and time both models of `shape` (together where they fit, else one after the other)."""
    kinds = list(BUILDERS)
    groups = [kinds] if fit_together(shape) else [[kind] for kind in kinds]
    results, params = {}, {}
    for group in groups:
        engines = {kind: prefilled(kind, shape, args) for kind in group}
        params.update({kind: num_params(engine.model) for kind, engine in engines.items()})
        for kind, times in measure(engines, args.repeats).items():
            results[kind] = dict(summary(times), raw=times)
        engines.clear()  # the models go before the next group's are built
        gc.collect()
        mx.clear_cache()
    return dict(together=len(groups) == 1, params=params, seconds=results)


# --- projection over the traces ----------------------------------------------------------------------
def round_costs(seconds: dict, ratio: float, reread: bool) -> dict:
    """A model's costs for the projection, in seconds: plain step, draft step, verify by carry, commit."""
    main = seconds["main"]
    verify_rows = {m: seconds[f"rows {K + 1 + m}"] for m in range(MAX_CARRY + 1)}
    return dict(main=main, draft=ratio * main, verify=verify_rows, commit=seconds["commit"], reread=reread)


def simulate(positions: list, greedy: bool, costs: dict, rng: np.random.Generator) -> float:
    """Speed-up over plain decoding of fixed-k rounds over one trace (the last < k + 1 tokens decode plainly)."""
    n, t, seconds, carry = len(positions), 0, 0.0, 0
    while t < n:
        if n - t <= K:
            seconds += (n - t) * costs["main"]
            break
        accepted = 0
        while accepted < K and (positions[t + accepted] if greedy else rng.random() < positions[t + accepted]):
            accepted += 1
        seconds += K * costs["draft"] + costs["verify"][carry]
        partial = accepted < K
        seconds += costs["commit"] if partial else 0.0
        carry = accepted + 1 if partial and costs["reread"] else 0
        t += accepted + 1
    return n * costs["main"] / seconds


def project(traces: dict, seconds: dict, ratio: float, seeds: int) -> list[dict]:
    """Per trace: mean acceptance, and the speed-up (mean over `seeds` for sampled traces) of the attention
    model, of the hybrid, and of the hybrid as if its recurrent layers could be trimmed (no re-read rows).

    Every model sees the same acceptance draws (same seeds): hybrid / trimmable is the cost of the re-read
    rows alone, hybrid / attention adds what the architecture's forwards cost against each other.
    """
    costs = {
        ATTENTION: round_costs(seconds[ATTENTION], ratio, reread=False),
        HYBRID: round_costs(seconds[HYBRID], ratio, reread=True),
        TRIMMABLE: round_costs(seconds[HYBRID], ratio, reread=False),
    }
    rows = []
    for name, trace in traces["traces"].items():
        greedy = "agree" in trace
        positions = trace["agree"] if greedy else trace["accept"]
        row = dict(trace=name, acceptance=statistics.mean(float(p) for p in positions))
        for kind, cost in costs.items():
            draws = range(1 if greedy else seeds)
            row[kind] = statistics.mean(simulate(positions, greedy, cost, np.random.default_rng(s)) for s in draws)
        row["ratio"], row["reread"] = row[HYBRID] / row[ATTENTION], row[HYBRID] / row[TRIMMABLE]
        rows.append(row)
    return rows


# --- tables -------------------------------------------------------------------------------------------
def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def print_steps(shape: str, result: dict):
    print(f"\n### {shape}: main step and verify forward (k = {K}), ms, median\n")
    print("| model | parameters | main step (1 row) | verify (5 rows) | verify / main |\n|---|---|---|---|---|")
    for kind, s in result["seconds"].items():
        print(
            f"| {kind} | {result['params'][kind] / 1e9:.2f}B | {ms(s['main'])} | {ms(s['rows 5'])} "
            f"| {s['rows 5'] / s['main']:.2f} |"
        )


def print_recording(shape: str, result: dict):
    rec = result["seconds"][HYBRID]["recording"]
    print(f"\n### {shape}: recording (the hybrid's 5-row verify with and without `recurrent.mark`)\n")
    print("| without mark, ms | with mark, ms | ratio (median of per-pass ratios) | target |\n|---|---|---|---|")
    verdict = "ok" if rec["ratio"] <= 1.05 else "MISSED"
    print(f"| {ms(rec['without'])} | {ms(rec['with_mark'])} | {rec['ratio']:.3f} | <= 1.05: {verdict} |")


def print_commit(shape: str, result: dict):
    print(f"\n### {shape}: commit (rollback to a partial acceptance + `mx.eval` of the cache state)\n")
    print("| model | commit, ms | / main step | target |\n|---|---|---|---|")
    for kind, s in result["seconds"].items():
        fraction = s["commit"] / s["main"]
        target = f"<= 0.05: {'ok' if fraction <= 0.05 else 'MISSED'}" if kind == HYBRID else "(trim only)"
        print(f"| {kind} | {1e3 * s['commit']:.3f} | {fraction:.4f} | {target} |")


def print_rows(shape: str, result: dict):
    print(f"\n### {shape}: verify forward over 5 + m rows (m tokens read again), ms, and / 5 rows\n")
    cols = [f"rows {K + 1 + m}" for m in range(MAX_CARRY + 1)]
    print("| model | " + " | ".join(f"m={m} ({K + 1 + m} rows)" for m in range(MAX_CARRY + 1)) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for kind, s in result["seconds"].items():
        cells = [f"{ms(s[c])} ({s[c] / s['rows 5']:.2f})" for c in cols]
        print(f"| {kind} | " + " | ".join(cells) + " |")


def print_projection(shape: str, rows: list[dict], ratio: float, source: str):
    print(f"\n### {shape}: projection, k = {K}, draft step = {ratio:.2f} x main step ({source}); speed-ups over")
    print("each model's own plain decoding; 'trimmable': the hybrid without re-read rows (carry 0 every round)\n")
    keys = (ATTENTION, HYBRID, "ratio", TRIMMABLE, "reread")
    print(
        "| trace | mean acceptance | attention | hybrid | hybrid / attention | hybrid, trimmable "
        "| hybrid / trimmable |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(f"| {r['trace']} | {r['acceptance']:.3f} | " + " | ".join(f"{r[key]:.3f}" for key in keys) + " |")
    geo = {key: statistics.geometric_mean([r[key] for r in rows]) for key in keys}
    print("| geometric mean | | " + " | ".join(f"{geo[key]:.3f}" for key in keys) + " |")
    verdict = "ok" if geo["ratio"] >= 0.95 else "MISSED"
    print(
        f"\nhybrid / attention: geometric mean {geo['ratio']:.3f} (target >= 0.95: {verdict}), worst "
        f"{min(r['ratio'] for r in rows):.3f}; re-read rows alone (hybrid / trimmable): {geo['reread']:.3f}, "
        f"worst {min(r['reread'] for r in rows):.3f}"
    )


# --- command line -------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), action="append", help="default: both")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes after the warm-up (default 5)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="tokens in the cache (default 256)")
    parser.add_argument(
        "--traces", type=Path, default=TRACES, help="acceptance traces (default benchmarks/traces.json)"
    )
    parser.add_argument("--draft-ratio", type=float, help="draft step / main step (default: the traces' cost_ratio)")
    parser.add_argument("--seeds", type=int, default=32, help="acceptance draws per sampled trace (default 32)")
    parser.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights (default 0.02)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.prompt_tokens < 1:
        parser.error("--repeats and --prompt-tokens must be >= 1")
    return args


def main(argv=None) -> int:
    if argv is None:
        from mlx_spec.blas import ensure_openblas

        ensure_openblas()  # may re-execute this process with OpenBLAS preloaded
    from mlx_spec.blas import blas_info

    args = parse_args(argv)
    traces = json.loads(args.traces.read_text())
    ratio = args.draft_ratio if args.draft_ratio is not None else traces.get("cost_ratio", 0.3)
    source = "--draft-ratio" if args.draft_ratio is not None else f"cost_ratio of {args.traces.name}"
    print(f"mlx {mx.__version__}, {mx.default_device()}, BLAS: {blas_info()}, {os.cpu_count()} CPUs")
    print(
        f"float32 weights, {args.prompt_tokens} tokens in the cache, {args.repeats} timed passes after a warm-up",
        flush=True,
    )
    report = dict(
        mlx=mx.__version__, blas=blas_info(), prompt_tokens=args.prompt_tokens, repeats=args.repeats, shapes={}
    )
    for shape in args.shape or list(SHAPES):
        result = measure_shape(shape, args)
        result["projection"] = project(traces, result["seconds"], ratio, args.seeds)
        result["draft_ratio"] = ratio
        report["shapes"][shape] = result
        print(f"\n## {shape} ({'both models in memory' if result['together'] else 'models built one at a time'})")
        print_steps(shape, result)
        print_recording(shape, result)
        print_commit(shape, result)
        print_rows(shape, result)
        print_projection(shape, result["projection"], ratio, source)
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
