"""The benchmark on tiny models: every variant runs, results are written, the formula is right, bad input is refused."""

import argparse
import json
import os
import subprocess
import sys

import pytest
from tiny_folders import write_tiny_pair

from mlx_spec import bench, bench_report


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


def imported_after(code: str) -> set[str]:
    """The benchmark and plotting modules a fresh interpreter holds after running `code`."""
    listing = "import sys; print(*(m for m in sys.modules if m.startswith(('mlx_spec.bench', 'matplotlib'))))"
    result = subprocess.run([sys.executable, "-c", f"{code}; {listing}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_benchmark_stays_out_of_the_engine():
    assert imported_after("import mlx_spec, mlx_spec.generate") == set()
    # its flags; the report holds the variants' names, and imports matplotlib only when it plots
    assert imported_after("import mlx_spec.cli; mlx_spec.cli.build_parser()") == {
        "mlx_spec.bench",
        "mlx_spec.bench_report",
    }


def test_predicted_speedup_formula():
    alpha, predicted = bench.predicted_speedup(1 + 0.5 + 0.25, 2, 0.25)  # alpha = 0.5, k = 2
    assert alpha == pytest.approx(0.5, abs=1e-6)
    assert predicted == pytest.approx(1.75 / 1.5, abs=1e-6)
    assert bench.predicted_speedup(3.0, 2, 0.0)[1] == pytest.approx(3.0, abs=1e-4)  # everything accepted, free draft
    assert bench.predicted_speedup(1.75, 2, 0.25, verify_ratio=1.5)[1] == pytest.approx(1.75 / 2.0, abs=1e-6)


def test_comparisons_pair_each_repetition_with_the_same_repetition_of_the_other_variant():
    def run(prompt, variant, k, rep, seconds):
        return bench.Run(
            prompt, variant, k, 0.0, rep, tokens=12, seconds=seconds, time_to_first_token=0.1, prompt_tokens=5
        )

    runs = []
    for prompt, drift in (("a", (1.0, 2.0, 4.0)), ("b", (1.0, 1.0, 1.0))):  # the machine slows down on "a"
        for rep, slow in enumerate(drift):
            runs += [
                run(prompt, bench.MAIN_ALONE, None, rep, 12 * slow),
                run(prompt, bench.OURS_LOOKUP, "auto", rep, 10 * slow),
                run(prompt, bench.OURS, 1, rep, 6 * slow),
                run(prompt, bench.OURS, 2, rep, (5 if prompt == "a" else 8) * slow),
                run(prompt, bench.OURS, "auto", rep, 6 * slow),
            ]
    runs.append(run("b", bench.OURS_DRAFT_ONLY, "auto", 0, 3.0))  # one repetition only: one pair
    rows = {(c["comparison"], c["prompt"]): c for c in bench.compare(runs)}
    assert rows["lookup only / main alone", "a"]["ratios"] == pytest.approx([1.2, 1.2, 1.2])
    assert rows["lookup only / main alone", "all prompts"]["value"] == pytest.approx(1.2)
    assert rows["auto / best fixed k (k=2)", "a"]["value"] == pytest.approx(5 / 6)
    assert rows["auto / best fixed k (k=1)", "b"]["value"] == pytest.approx(1.0)
    assert rows["auto / best fixed k", "all prompts"]["value"] == pytest.approx((5 / 6) ** 0.5)
    assert rows["hybrid / draft only", "b"]["ratios"] == pytest.approx([0.5])
    assert ("hybrid / draft only", "a") not in rows and ("hybrid / draft only", "all prompts") not in rows
    table = bench_report.markdown({"summary": [], "comparisons": bench.compare(runs)})
    assert "| auto / best fixed k (k=2) | 0.0 | a | 0.83 (median) | 0.83, 0.83, 0.83 |" in table
    assert "| lookup only / main alone | 0.0 | all prompts | 1.20 (geometric mean of 6) |  |" in table


def test_benchmark_runs_every_variant_and_writes_results(tmp_path, folders, capsys):
    main, draft = folders
    a = args_for(
        tmp_path,
        model=main,
        draft_model=draft,
        prompt=["w5 w6 w7", "quicksort"],
        max_tokens=12,
        draft_lengths="1,3,auto",
        temps="0,0.7",
    )
    assert bench.run(a, progress=lambda s: None) == 0
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert (tmp_path / "out" / "bench.png").stat().st_size > 1000
    runs = result["runs"]
    # temps x prompts x (alone, plain ours, lookup only, ours k=1,3,auto, draft only auto, mlx-lm k=1,3)
    assert len(runs) == 2 * 2 * (3 + 3 + 1 + 2)
    assert {r["variant"] for r in runs} == {
        bench.MAIN_ALONE,
        bench.OURS_PLAIN,
        bench.OURS_LOOKUP,
        bench.OURS,
        bench.OURS_DRAFT_ONLY,
        bench.MLX_LM,
    }
    assert all(r["tokens"] == 12 and r["seconds"] > 0 for r in runs)
    rows = [r for r in result["summary"] if r["variant"] == bench.OURS and r["num_draft"] != "auto"]
    assert all(0 <= r["acceptance"] <= 1 and r["predicted"] > 0 and r["efficiency"] > 0 for r in rows)
    assert all(r["predicted_with_verify"] > 0 and r["engine_efficiency"] > 0 for r in rows)
    assert set(result["cost_ratio"]["prompt1"]["verify"]) == {"1", "3"}
    assert result["machine"]["main_dtype"] == "float32" and result["machine"]["mlx"]
    for r in result["summary"]:  # shares of tokens by source, decode speed beside end-to-end
        assert 0 <= r["lookup_share"] + r["draft_share"] <= 1 and r["decode_tps"] > 0
        if r["variant"] in (bench.MAIN_ALONE, bench.OURS_PLAIN, bench.OURS_DRAFT_ONLY, bench.MLX_LM):
            assert r["lookup_share"] == 0
        if r["variant"] == bench.OURS_LOOKUP:
            assert r["draft_share"] == 0
    out = capsys.readouterr().out
    assert "| temp | prompt | variant |" in out and "mlx_spec / mlx-lm" in out
    assert {c["comparison"].split(" (")[0] for c in result["comparisons"]} == {
        "lookup only / main alone",
        "hybrid / draft only",
        "auto / best fixed k",
    }
    assert "| comparison (paired runs) |" in out


def test_without_prompt_lookup_the_engine_drafts_with_the_draft_model_only(tmp_path, folders):
    main, draft = folders
    a = args_for(tmp_path, model=main, draft_model=draft, prompt=["w5 w6 w5 w6 w5"], max_tokens=12)
    a.no_prompt_lookup, a.draft_lengths, a.no_peer = True, "2,auto", True
    assert bench.run(a, progress=lambda s: None) == 0
    runs = json.loads((tmp_path / "out" / "bench.json").read_text())["runs"]
    assert {r["variant"] for r in runs} == {bench.MAIN_ALONE, bench.OURS_PLAIN, bench.OURS}
    assert all(r["lookup_draft_tokens"] == 0 for r in runs)


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_runs_start_from_nothing_learnt(tmp_path, folders, monkeypatch, fresh):
    from mlx_spec import adaptive

    started = []  # per controller: whether it started with nothing learnt
    init = adaptive.Controller.__init__

    def watched(controller, *args, **kwargs):
        init(controller, *args, **kwargs)
        started.append(controller.fresh)

    monkeypatch.setattr(adaptive.Controller, "__init__", watched)
    main, draft = folders
    a = args_for(tmp_path, model=main, draft_model=draft, prompt=["w5 w6 w7", "quicksort"], max_tokens=8)
    a.draft_lengths, a.no_peer, a.no_plain, a.repetitions, a.fresh = "auto", True, True, 2, fresh
    assert bench.run(a, progress=lambda s: None) == 0
    assert len(started) == 3 + 2 * 2 * 3  # warm-up and 2 reps x 2 prompts of lookup only, auto, draft only auto
    assert all(started) == fresh and all(started[:3])  # else each variant learns on from its warm-up


def test_default_workloads_put_the_repeats_first():
    assert list(bench.ALL_PROMPTS)[:3] == ["rename", "extract", "chat-rewrite"]
    assert set(bench.PROMPTS) < set(bench.ALL_PROMPTS)
    assert bench.INVENTORY_PY in bench.ALL_PROMPTS["rename"] and bench.HANDBOOK in bench.ALL_PROMPTS["extract"]
    chat = bench.ALL_PROMPTS["chat-rewrite"]
    assert [m["role"] for m in chat] == ["user", "assistant", "user"] and bench.WORD_COUNT_PY in chat[1]["content"]


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(preset="lmstudio-m1"), "unknown preset 'lmstudio-m1'"),
        (dict(prompt_file="/no/such/prompts.txt"), "prompt file not found: /no/such/prompts.txt"),
        (dict(draft_lengths="0-4"), "within 1..32"),
        (dict(draft_lengths="a,b"), "'a,b'"),
        (dict(temps="-1"), "--temps must be >= 0"),
        (dict(max_tokens=0), "--max-tokens must be >= 1"),
    ],
)
def test_bad_input(tmp_path, folders, over, message):
    a = args_for(tmp_path, model=folders[0], draft_model=folders[1], **over)
    with pytest.raises(ValueError, match=message):
        bench.run(a, progress=lambda s: None)


def test_preset_runs_each_published_pair_and_prints_its_figures(tmp_path, folders, monkeypatch, capsys):
    main, draft = folders
    monkeypatch.setitem(
        bench.PRESETS, "tiny", [(main, draft, "w5 w6 w7", 7.30, 17.74), (main, None, "w8 w9", 2.0, 3.0)]
    )
    a = args_for(tmp_path, preset="tiny", max_tokens=6, draft_lengths="2", no_peer=True, no_plain=True)
    assert bench.run(a, progress=lambda s: None) == 0
    out = capsys.readouterr().out
    assert (
        "LM Studio (M3 Pro): 7.30 -> 17.74 tok/s, 2.43x" in out
        and "LM Studio (M3 Pro): 2.00 -> 3.00 tok/s, 1.50x" in out
    )
    first, second = (json.loads((tmp_path / "out" / f"bench{i}.json").read_text()) for i in (1, 2))
    assert first["published"] == dict(main_alone_tps=7.30, with_draft_tps=17.74)
    assert first["models"] == dict(main=main, draft=draft) and second["models"] == dict(main=main, draft=None)
    assert {r["prompt"] for r in first["runs"]} == {"preset"}
    assert [r["variant"] for r in first["runs"]] == [bench.MAIN_ALONE, bench.OURS_LOOKUP, bench.OURS]  # k=2
    assert [r["variant"] for r in second["runs"]] == [bench.MAIN_ALONE, bench.OURS_LOOKUP]


def test_preset_with_the_hub_out_of_reach_is_one_clear_line():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_spec.cli",
            "bench",
            "--preset",
            "lmstudio-m3pro",
            "--out",
            "/tmp/mlx_spec_preset_test",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("mlx-spec: error: ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and errors[0].startswith(
        "mlx-spec: error: could not fetch mlx-community/Qwen2.5-32B-Instruct-4bit from the Hugging Face hub"
    )


def test_quick_mode_is_small(tmp_path):
    cfg = bench.config_from_args(args_for(tmp_path, quick=True))
    assert list(cfg.prompts) == ["quicksort"] and cfg.max_tokens == 32 and cfg.draft_lengths == [2, 4, "auto"]
    assert bench.parse_draft_lengths("1-3,6,auto") == [1, 2, 3, 6, "auto"]
