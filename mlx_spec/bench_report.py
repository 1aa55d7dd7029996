"""The benchmark's report: a markdown table, a plot and the machine's description, written next to the JSON.

Kept apart from the runner (`mlx_spec.bench`); the variants' names live here, and the runner imports them
from here (this module imports nothing of the runner's).
"""

import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx

MAIN_ALONE, OURS, OURS_PLAIN, MLX_LM = "main alone", "mlx_spec", "mlx_spec, no draft", "mlx-lm"
OURS_LOOKUP, OURS_DRAFT_ONLY = "mlx_spec, lookup only", "mlx_spec, draft only"  # with prompt lookup on


def _fmt(x, spec=".2f"):
    return "" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    rows = result["summary"]
    out = [
        "| temp | prompt | variant | k | tok/s | speed-up | decode tok/s | decode speed-up | accepted "
        "| from lookup | from draft | lookup accepted | tokens/round | predicted | efficiency "
        "| predicted (measured verify) | efficiency (measured verify) | TTFT s | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['temp']} | {r['prompt']} | {r['variant']} | {r['num_draft'] or ''} | {r['tps']:.2f} "
            f"| {r['speedup']:.2f}x | {r['decode_tps']:.2f} | {r['decode_speedup']:.2f}x "
            f"| {_fmt(r['acceptance'] and 100 * r['acceptance'], '.0f')}{'%' if r['acceptance'] is not None else ''} "
            f"| {100 * r['lookup_share']:.0f}% | {100 * r['draft_share']:.0f}% "
            f"| {_pct(r['lookup_acceptance'])} "
            f"| {_fmt(r['tokens_per_round'])} | {_fmt(r['predicted'])} | {_fmt(r['efficiency'])} "
            f"| {_fmt(r['predicted_with_verify'])} | {_fmt(r['engine_efficiency'])} "
            f"| {r['time_to_first_token']:.2f} | {r['peak_memory']:.2f} |"
        )
    out += [
        "",
        "| temp | prompt | main alone tok/s | mlx_spec best | mlx-lm best | mlx_spec / mlx-lm |",
        "|---|---|---|---|---|---|",
    ]
    for temp, prompt in dict.fromkeys((r["temp"], r["prompt"]) for r in rows):
        mine = [r for r in rows if (r["temp"], r["prompt"], r["variant"]) == (temp, prompt, OURS)]
        peer = [r for r in rows if (r["temp"], r["prompt"], r["variant"]) == (temp, prompt, MLX_LM)]
        base = next(r["tps"] for r in rows if (r["temp"], r["prompt"], r["variant"]) == (temp, prompt, MAIN_ALONE))
        best = max(mine, key=lambda r: r["tps"]) if mine else None
        best_peer = max(peer, key=lambda r: r["tps"]) if peer else None
        out.append(
            f"| {temp} | {prompt} | {base:.2f} "
            f"| {_best(best)} | {_best(best_peer)} "
            f"| {_fmt(best and best_peer and best['tps'] / best_peer['tps'])}{'x' if best and best_peer else ''} |"
        )
    if result.get("comparisons"):
        out += ["", "| comparison (paired runs) | temp | prompt | ratio | by repetition |", "|---|---|---|---|---|"]
        for c in result["comparisons"]:
            pooled = c["statistic"] != "median"  # over all prompts: too many pairs to list
            how = f"{c['statistic']} of {len(c['ratios'])}" if pooled else c["statistic"]
            shown = "" if pooled else ", ".join(f"{x:.2f}" for x in c["ratios"])
            out.append(f"| {c['comparison']} | {c['temp']} | {c['prompt']} | {c['value']:.2f} ({how}) | {shown} |")
    return "\n".join(out)


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _best(row) -> str:
    return "" if row is None else f"{row['speedup']:.2f}x (k={row['num_draft']})"


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"] if r["num_draft"] and r["num_draft"] != "auto"]
    auto = {
        (r["temp"], r["prompt"]): r["speedup"]
        for r in result["summary"]
        if r["num_draft"] == "auto" and r["variant"] == OURS
    }
    panels = sorted({(r["temp"], r["prompt"]) for r in rows})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (temp, prompt) in zip(axes[0], panels):
        for variant, style in ((OURS, "o-"), (MLX_LM, "s--")):
            pts = sorted(
                (r["num_draft"], r["speedup"])
                for r in rows
                if (r["temp"], r["prompt"], r["variant"]) == (temp, prompt, variant)
            )
            if pts:
                ax.plot(*zip(*pts), style, label=variant)
        ax.axhline(1.0, color="gray", lw=0.8)
        if (temp, prompt) in auto:
            ax.axhline(auto[(temp, prompt)], color="C0", ls=":", label=f"{OURS}, auto")
        ax.set_title(f"{prompt}, temp {temp}")
        ax.set_xlabel("draft tokens k")
        ax.set_ylabel("speed-up over main alone")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(main_dtype: str, draft_dtype: str | None) -> dict:
    from .blas import blas_info

    backend = "metal" if mx.metal.is_available() else ("cuda" if mx.cuda.is_available() else "cpu")
    chip = platform.processor()
    try:
        chip = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if sys.platform == "darwin":
        import subprocess

        chip = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        ).stdout.strip()
    return dict(
        chip=chip,
        platform=platform.platform(),
        mlx=mx.__version__,
        backend=backend,
        blas=blas_info(),
        main_dtype=main_dtype,
        draft_dtype=draft_dtype,
        date=time.strftime("%Y-%m-%d %H:%M"),
    )


def save(result: dict, out_dir: Path, stem: str = "bench") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(result, indent=1))
    paths[1].write_text(markdown(result) + "\n")
    plot(result, paths[2])
    return paths
