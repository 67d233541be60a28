"""The one command that regenerates figures and tables: outputs, manifest, selection rule, resumability."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from helpers.experiments import cells, executors, reports, reproduce
from helpers.experiments.cells import best_dynamic, cell_params, flatten
from helpers.experiments.presets import SIZES, Settings
from helpers.experiments.reports import results_table
from helpers.experiments.results import NOT_RECORDED
from helpers.experiments.rules_report import run_rules
from helpers.experiments.sb_selection import SELECTION_RULES
from helpers.infra.integrity import machine_name
from helpers.models.loading import model_label


def cell(method, sp, sb, ppl_select, acc, correct=(1, 0) * 5, nll=(3.0,) * 4):
    tasks = {
        "piqa": {"acc": acc, "acc_norm": acc + 0.1, "n": 10, "correct": list(correct)},
        "winogrande": {"acc": acc, "acc_norm": None, "n": 10, "correct": list(correct)},
    }
    return {
        "eval_window_nll": [v * 10 for v in nll],
        "eval_window_tokens": [10] * len(nll),
        "method": method,
        "sp": sp,
        "sb": sb,
        "params": 100 if method == "dense" else 80,
        "realised_slice": sp,
        "ppl_select": ppl_select,
        "ppl_eval": ppl_select + 1,
        "tasks": tasks,
    }


def test_tables_use_paper_metrics_and_pick_sb_by_selection_perplexity():
    cells = flatten(
        [
            cell("dense", 0, 0, 10, 0.6),
            cell("constant", 0.3, 0.3, 30, 0.5),
            cell("dynamic", 0.3, 0.2, 25, 0.4),
            cell("dynamic", 0.3, 0.0, 28, 0.55),
        ],
        ("piqa", "winogrande"),
    )
    assert cells.loc[0, "piqa"] == pytest.approx(0.7) and cells.loc[0, "winogrande"] == pytest.approx(0.6)
    assert best_dynamic(cells)["sb"].tolist() == [0.2]  # lowest ppl_select, not the best accuracy
    table = results_table(cells, ("piqa", "winogrande"))
    assert table["method"].tolist() == ["dense", "constant", "dynamic"]
    assert table["params_kept"].tolist() == [1.0, 0.8, 0.8]
    assert table.loc[0, "piqa_se"] == pytest.approx(np.sqrt(0.25 / 9))  # five of ten right
    assert table.loc[0, "ppl_eval_low"] == pytest.approx(np.exp(3.0))  # identical windows: no spread


def test_comparisons_give_paired_verdicts_and_generated_statements():
    tasks = ("piqa", "winogrande")
    rng = np.random.default_rng(0)
    right = (rng.random(200) < 0.6).astype(int)
    worse = right.copy()
    worse[np.flatnonzero(right)[:40]] = 0  # constant misses 40 questions dynamic gets right
    nll = tuple(rng.normal(3.0, 0.2, 16))
    cells = flatten(
        [
            cell("dense", 0, 0, 10, 0.6, right, nll),
            cell("constant", 0.3, 0.3, 30, 0.5, worse, nll),
            cell("dynamic", 0.3, 0.1, 25, 0.6, right, nll),
        ],
        tasks,
    )
    table = reports.comparisons_table(cells, tasks).set_index("metric")
    assert table.loc["piqa", "verdict"] == "better" and table.loc["average", "verdict"] == "better"
    assert table.loc["perplexity", "verdict"] == "not resolved" and table.loc["perplexity", "diff"] == 0
    assert table.loc["piqa", "holm_p"] == pytest.approx(min(1.0, 2 * table.loc["piqa", "mcnemar_p"]))
    text = reports.comparison_statements(table.reset_index(), model_label("smollm2-135m"))
    assert "SmolLM2-135M-Instruct, Q4_1 weights dequantised to float32" in text
    assert "**better**" in text and "**not resolved**" in text and "2 paired accuracy comparisons" in text
    settings = Settings(tasks=tasks, eval_texts=("great-expectations",))
    summary = reports.results_summary(results_table(cells, tasks), table.reset_index(), settings, bos=False)
    assert "| constant | 0.30 | 0.30 |" in summary and "+/-" in summary and text in summary
    intervals = reports.reading_intervals(cells, tasks)
    assert intervals["accuracy_intervals"][0.3] == tuple(table.loc["average", ["low", "high"]])
    assert intervals["perplexity_intervals"][0.3] == (0.0, 0.0)  # same windows, same NLL: no spread
    same = intervals["task_intervals"][("dynamic", 0.3, "piqa")]  # dynamic answers exactly as dense does
    low, high = intervals["task_intervals"][("constant", 0.3, "piqa")]  # 40 of 200 lost: -0.2
    assert same == (0.0, 0.0) and low < -0.2 < high < 0


@pytest.mark.slow
def test_smoke_reproduce_writes_every_output_and_resumes(tmp_path, monkeypatch):
    settings = dataclasses.replace(SIZES["smoke"], depth=True)  # with the method comparison and its recovery
    tables = reproduce.reproduce(settings, tmp_path, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "manifest.json")
    assert written == sorted(manifest["files"]), "every output is in the manifest"
    for name in (
        "figure1_allocation.png",
        "figure2_accuracy_vs_sb_sp30.png",
        "perplexity_comparison.png",
        "results_table.md",
        "results_table.csv",
        "speed_table.csv",
        "sweep_cells.csv",
        "comparisons.csv",
        "results_summary.md",
        "depth_comparison.csv",
        "depth_summary.md",
        "replacement_vs_lora.csv",
        "accuracy_vs_removed.png",
        "accuracy_vs_speed.png",
    ):
        assert (tmp_path / name).stat().st_size > 100, name
    assert manifest["versions"]["torch"] and manifest["files"]["results_table.csv"]["params"]["limit"] == settings.limit
    for name in ("results_table.csv", "figure1_allocation.png", "speed_table.md"):  # cells computed here or cached
        assert set(manifest["files"][name]["cells_machines"]) <= {machine_name(), NOT_RECORDED}, name
        assert manifest["files"][name]["cells_machines"] and manifest["files"][name]["machine"] == machine_name()
    assert manifest["files"]["accuracy_vs_removed.png"]["params"]["recovery"]["tokens"] == settings.recovery_tokens

    results = pd.read_csv(tmp_path / "results_table.csv")
    assert results["method"].tolist() == ["dense", "constant", "dynamic", "constant", "dynamic"]
    assert results["recovery"].tolist() == ["none", "none", "none", "LoRA", "LoRA"]
    dense, constant, dynamic, constant_rft, dynamic_rft = results["params"]
    assert constant < dense and dynamic < dense  # tied layout: slicing removes parameters
    assert abs(dynamic - constant) / constant < 1e-3  # matched size
    assert (constant_rft, dynamic_rft) == (constant, dynamic)  # merged adapters add no parameter
    assert (results["ppl_eval_low"] <= results["ppl_eval"]).all() and (
        results["ppl_eval"] <= results["ppl_eval_high"]
    ).all()
    assert np.all(results["questions"] == settings.limit * len(settings.tasks))

    depth = pd.read_csv(tmp_path / "depth_comparison.csv")
    lora = depth[depth["recovery"] == "LoRA"].set_index("method")
    before = depth[depth["recovery"] == "none"].set_index("method")
    assert set(lora.index) == set(before.index) - {"dense"} and len(lora) == 5
    assert (lora["params"] == before.loc[lora.index, "params"]).all()  # recovery keeps every model's size
    budget = settings.recovery().planned_steps * settings.recovery().batch_size * settings.seqlen
    replacement = depth[depth["recovery"] == "replacement"].iloc[0]
    assert (lora["tokens"] == budget).all() and replacement["tokens"] == budget  # one budget for every method
    gain = lora["avg_acc"] - before.loc[lora.index, "avg_acc"]  # the paired gain's point estimate, in closed form
    assert np.allclose(lora["gain_acc_diff"], gain)
    assert np.allclose(lora.loc["dynamic slicing", ["acc_diff", "ppl_diff"]].astype(float), 0.0)
    assert 0.0 < before.loc["constant slicing", "removed_pct"] < 100
    assert abs(before.loc["ShortGPT", "removed_pct"] - before.loc["constant slicing", "removed_pct"]) < 3.0
    summary = (tmp_path / "depth_summary.md").read_text()
    assert "trained replacement minus LoRA at the same tokens" in summary and "both recovered" in summary

    speed = tables["speed"]
    labels = (
        {"dense"}
        | {f"{name} SP=0.3" for name in before.index if name != "dense"}
        | {"LLM-Streamline + replacement SP=0.3"}
    )
    assert set(speed["model"]) == labels and len(speed) == len(labels) * 2
    assert (speed["tokens_per_s"] > 0).all() and (speed["peak_memory_mb"] > 100).all()
    assert (speed.loc[speed["model"] == "dense", "ratio_to_dense"] == 1).all()
    report = (tmp_path / "speed_table.md").read_text()
    gen = speed[(speed["model"] == "ShortGPT SP=0.3") & speed["workload"].str.startswith("generate")]
    assert f"| {gen['ratio_to_dense'].iloc[0]:.3f} [" in report  # the benchmark's own table ...
    assert report.count("- ShortGPT SP=0.3, float32, ") == 2  # ... and one reading per workload

    gaps = reproduce.check(settings, tmp_path)  # `reproduce --check`: the committed cells come back
    assert gaps["relative"] < 1e-4 and gaps["accuracy_points"] == 0  # same machine: not one answer flips

    finer = dataclasses.replace(settings, sb_step=0.15)  # `rules --sb-only --sb-step 0.15`: one new cell, SB = 0.15
    run_rules(finer, tmp_path / "sb", progress=False, allocation=False)
    sb = pd.read_csv(tmp_path / "sb" / "sb_selection.csv")
    assert set(sb["rule"]) == set(SELECTION_RULES) and (sb["candidates"] == 2).all()
    assert {float(v) for v in " ".join(sb["picked_sb"].astype(str)).replace(",", " ").split()} <= {0.0, 0.15}
    text = (tmp_path / "sb" / "sb_selection_summary.md").read_text()
    assert text.startswith(model_label(settings.model)) and "steps of 0.15" in text
    assert not (tmp_path / "sb" / "allocation_rules.csv").exists()

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(cells.Lab, "measure", must_not_run)
    monkeypatch.setattr("helpers.evaluation.speed.interleaved_benchmark", must_not_run)
    again = reproduce.reproduce(settings, tmp_path / "again", progress=False)
    pd.testing.assert_frame_equal(again["results"], tables["results"])


@pytest.mark.slow
def test_local_executor_jobs_give_the_same_cells_as_the_in_process_sweep(tmp_path):
    """submitit's LocalExecutor runs each cell as its own process; the cell cache must match an in-process run."""
    pytest.importorskip("submitit")
    settings = dataclasses.replace(
        SIZES["smoke"], seqlen=32, calib_windows=2, select_windows=1, eval_windows=1, tasks=("piqa",), limit=2
    )
    inprocess, jobs = tmp_path / "inprocess", tmp_path / "jobs"
    cells.sweep(cells.Lab(settings, progress=False), cells.CellCache("sweep", inprocess))
    assert executors.missing_cells(settings, jobs) == cells.sweep_cells(settings)
    ran = executors.run_cells(settings, "local", cache_root=jobs, log_folder=tmp_path / "logs")
    assert ran == 3 and executors.missing_cells(settings, jobs) == []
    assert executors.run_cells(settings, "local", cache_root=jobs) == 0  # resumable: nothing left to run
    for sp, sb in cells.sweep_cells(settings):
        coords = {"kind": "dense"} if sb is None else {"kind": "sliced", "sp": sp, "sb": sb}
        params = cell_params(settings, **coords)
        expected = cells.CellCache("sweep", inprocess).get(params)
        got = cells.CellCache("sweep", jobs).get(params)
        assert got["params"] == expected["params"] and got["tasks"] == expected["tasks"]
        assert got["ppl_select"] == pytest.approx(expected["ppl_select"], rel=1e-6)
        assert got["ppl_eval"] == pytest.approx(expected["ppl_eval"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HELPERS_TEST_RAY"), reason="starts a Ray instance; set HELPERS_TEST_RAY=1")
def test_ray_job_fills_only_the_missing_cell_with_the_in_process_numbers(tmp_path):
    """Ray on a local instance: cached cells are left alone, the missing one matches the in-process run."""
    pytest.importorskip("ray")
    settings = dataclasses.replace(
        SIZES["smoke"], seqlen=32, calib_windows=2, select_windows=1, eval_windows=1, tasks=("piqa",), limit=2
    )
    inprocess, jobs = tmp_path / "inprocess", tmp_path / "jobs"
    cells.sweep(cells.Lab(settings, progress=False), cells.CellCache("sweep", inprocess))
    shutil.copytree(inprocess, jobs)
    dense = cells.CellCache("sweep", jobs).path(cell_params(settings, kind="dense"))
    dense.unlink()
    assert executors.missing_cells(settings, jobs) == [(0.0, None)]
    assert executors.run_cells(settings, "ray", cache_root=jobs) == 1
    expected = cells.CellCache("sweep", inprocess).get(cell_params(settings, kind="dense"))
    got = json.loads(dense.read_text())["result"]
    assert got["tasks"] == expected["tasks"] and got["params"] == expected["params"]
    assert got["ppl_eval"] == pytest.approx(expected["ppl_eval"], rel=1e-6)
