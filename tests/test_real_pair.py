"""The real default pair (Qwen2.5-Coder 1.5B main, 0.5B draft; fetched once and cached), through the CLI.

Each check runs `mlx-spec generate --json` in a subprocess, as a user would, so OpenBLAS is preloaded.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

QUICKSORT = "Write a quicksort algorithm in Python. Write code only."


def generate(*flags):
    cmd = [
        sys.executable,
        "-m",
        "mlx_spec.cli",
        "generate",
        "--prompt",
        QUICKSORT,
        "--max-tokens",
        "48",
        "--json",
        *flags,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    print({k: result[k] for k in ("generation_tps", "acceptance_rate", "mean_tokens_per_round", "draft_lengths")})
    return result


def test_draft_output_is_the_main_models_and_mostly_accepted():
    alone = generate("--no-draft")
    fixed = generate("--num-draft-tokens", "4")
    auto = generate()
    assert len(alone["tokens"]) == 48
    assert fixed["tokens"] == alone["tokens"]
    assert auto["tokens"] == alone["tokens"]
    assert "def quicksort" in alone["text"]
    assert fixed["acceptance_rate"] > 0.5
    assert fixed["host_syncs"] == fixed["num_rounds"]
    assert auto["total_draft_tokens"] > 0
