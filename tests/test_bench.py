"""The benchmark on tiny models: every variant runs, results are written, the formula is right, bad input is refused."""

import argparse
import json

import pytest

from mlx_spec import bench
from tiny_folders import write_tiny_pair


def args_for(tmp_path, **over):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    a = p.parse_args([])
    a.out = str(tmp_path / "out")
    for k, v in over.items():
        setattr(a, k, v)
    return a


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tuple(map(str, write_tiny_pair(tmp_path_factory.mktemp("models"))))


def test_predicted_speedup_formula():
    alpha, predicted = bench.predicted_speedup(1 + 0.5 + 0.25, 2, 0.25)  # alpha = 0.5, k = 2
    assert alpha == pytest.approx(0.5, abs=1e-6)
    assert predicted == pytest.approx(1.75 / 1.5, abs=1e-6)
    assert bench.predicted_speedup(3.0, 2, 0.0)[1] == pytest.approx(3.0, abs=1e-4)  # everything accepted, free draft
    assert bench.predicted_speedup(1.75, 2, 0.25, verify_ratio=1.5)[1] == pytest.approx(1.75 / 2.0, abs=1e-6)


def test_benchmark_runs_every_variant_and_writes_results(tmp_path, folders, capsys):
    main, draft = folders
    a = args_for(tmp_path, model=main, draft_model=draft, prompt=["w5 w6 w7", "quicksort"], max_tokens=12,
                 draft_lengths="1,3,auto", temps="0,0.7")
    assert bench.run(a, progress=lambda s: None) == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert (tmp_path / "out" / "bench.png").stat().st_size > 1000
    runs = result["runs"]
    assert len(runs) == 2 * 2 * (2 + 3 + 2)  # temps x prompts x (alone, plain ours, ours k=1,3,auto, mlx-lm k=1,3)
    assert {r["variant"] for r in runs} == {bench.MAIN_ALONE, bench.OURS_PLAIN, bench.OURS, bench.MLX_LM}
    assert all(r["tokens"] == 12 and r["seconds"] > 0 for r in runs)
    rows = [r for r in result["summary"] if r["variant"] == bench.OURS and r["num_draft"] != "auto"]
    assert all(0 <= r["acceptance"] <= 1 and r["predicted"] > 0 and r["efficiency"] > 0 for r in rows)
    assert all(r["predicted_with_verify"] > 0 and r["engine_efficiency"] > 0 for r in rows)
    assert set(result["cost_ratio"]["prompt1"]["verify"]) == {"1", "3"}
    assert result["machine"]["main_dtype"] == "float32" and result["machine"]["mlx"]
    out = capsys.readouterr().out
    assert "| temp | prompt | variant |" in out and "mlx_spec / mlx-lm" in out


@pytest.mark.parametrize("over, message", [
    (dict(preset="lmstudio-m1"), "unknown preset 'lmstudio-m1'"),
    (dict(prompt_file="/no/such/prompts.txt"), "prompt file not found: /no/such/prompts.txt"),
    (dict(draft_lengths="0-4"), "within 1..32"),
    (dict(draft_lengths="a,b"), "'a,b'"),
    (dict(temps="-1"), "--temps must be >= 0"),
    (dict(max_tokens=0), "--max-tokens must be >= 1"),
])
def test_bad_input(tmp_path, folders, over, message):
    a = args_for(tmp_path, model=folders[0], draft_model=folders[1], **over)
    with pytest.raises(ValueError, match=message):
        bench.run(a, progress=lambda s: None)


def test_quick_mode_is_small(tmp_path):
    cfg = bench.config_from_args(args_for(tmp_path, quick=True))
    assert list(cfg.prompts) == ["quicksort"] and cfg.max_tokens == 32 and cfg.draft_lengths == [2, 4, "auto"]
    assert bench.parse_draft_lengths("1-3,6,auto") == [1, 2, 3, 6, "auto"]
