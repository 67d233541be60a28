"""Regenerate the paper's figures and tables in one command: `python -m helpers reproduce`.

1. SB sweeps: for every SP, slice the dense model at every SB from SP down to 0
   and measure perplexity on a selection book, perplexity on held-out books and
   zero-shot accuracy. SB = SP is constant slicing (SliceGPT); the dynamic row
   of each SP is the SB < SP with the lowest selection-book perplexity (the
   paper's rule, never looking at the evaluation books).
2. Every method at matched size at each SP of `recover_sps` (constant and dynamic slicing, ShortGPT,
   LLM-Streamline, the hybrid), before and after recovery fine-tuning at one token budget, and
   LLM-Streamline's trained replacement at that budget (`helpers.experiments.compare`).
3. Tables: the results table (method x SP x recovery), the paired dynamic-vs-constant comparisons
   before and after recovery, the method comparison; Figure 1 (allocation at the first of
   `figure_sps` and its best SB), Figures 2-4 (accuracy against SB, constant slicing as a red line),
   the perplexity comparison.
4. Speed of every architecture of step 2 against dense: each model in its own worker process,
   repeats interleaved (`helpers.evaluation.speed`); then accuracy against parameters removed and
   against measured speed-up, every method before and after recovery.
5. With `rules` on, after these: allocation rules and SB selection rules compared (`helpers.experiments.rules_report`,
   which builds on this module; `python -m helpers reproduce --rules` runs it into the same folder and manifest).

The jobs live apart: `presets` (the one `Settings` and its sizes), `cells` (the lab and the sweep's cells),
`compare` (the method comparison's cells), `methods_report` (its tables and statements), `reports` (every file
written), `executors` (cells as jobs); this module runs them in order.
Every cell is cached (`helpers.experiments.results.CellCache`): a rerun skips finished work
and an interrupted run loses at most the cell in progress. Each file written is
recorded in `figures/manifest.json` with the settings that produced it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd

from helpers.experiments.cells import Lab, cell_params, flatten, sweep
from helpers.experiments.compare import ensure_saved
from helpers.experiments.executors import run_cells
from helpers.experiments.presets import Settings
from helpers.experiments.reports import (
    SOURCES,
    dynamic_sbs,
    figures,
    method_comparison,
    method_figures,
    recovered_rows,
    results_table,
    speed_table,
    write_comparisons,
    write_speed_report,
    write_table,
)
from helpers.experiments.results import Manifest
from helpers.infra.storage import FIGURES_DIR


def reproduce(
    settings: Settings, out: Path = FIGURES_DIR, progress: bool = True, executor: str = "inprocess"
) -> dict[str, pd.DataFrame]:
    """Run every step and write figures, tables and the manifest into `out`; returns the tables.

    With `executor` local, slurm or ray the sweep cells run first as independent jobs (`run_cells`).
    """
    started = time.time()
    manifest = Manifest(out, model=settings.model, seed=settings.seed, settings=dataclasses.asdict(settings))
    lab = Lab(settings, progress)  # also caches the LR scores before any job needs them
    run_cells(settings, executor)
    cells = sweep(lab)
    tables: dict[str, pd.DataFrame] = {"cells": cells}
    write_table(cells, out / "sweep_cells", manifest, "sweep", **cell_params(settings))
    recovered, folders = None, None
    if settings.depth:
        tables["depth"], grid = method_comparison(lab, cells, out, manifest)
        recovered = recovered_rows(grid, cells, settings.tasks)
        folders = ensure_saved(lab, dynamic_sbs(cells, settings.recover_sps))
    tables["results"] = results_table(cells, settings.tasks, recovered)
    sources = ("sweep",) if recovered is None else SOURCES
    write_table(tables["results"], out / "results_table", manifest, "results_table", sources, **cell_params(settings))
    tables["comparisons"] = write_comparisons(cells, tables["results"], lab, out, manifest, recovered)
    figures(lab, cells, out, manifest)
    tables["speed"] = speed_table(lab, cells, folders)
    write_speed_report(tables["speed"], settings, out, manifest)
    if settings.depth:
        method_figures(tables["depth"], tables["speed"], settings, out, manifest)
    if progress:
        print(f"reproduce ({settings.model}) finished in {(time.time() - started) / 60:.1f} min; see {out}")
    return tables


def check(
    settings: Settings, out: Path = FIGURES_DIR, sample: tuple[str, ...] = ("dense", "constant")
) -> dict[str, float]:
    """Recompute the first committed cell of each method in `sample` (no cache) against `out`/sweep_cells.csv.

    Returns the largest relative difference over parameters and both perplexities (float rounding only),
    and the largest accuracy difference in points, kept apart: scoring runs in bfloat16, whose products
    round differently on another CPU, flipping answers the model nearly ties.
    """
    committed = pd.read_csv(out / "sweep_cells.csv")
    lab = Lab(settings, progress=False)
    gaps = {"relative": 0.0, "accuracy_points": 0.0}
    for method in sample:
        row = committed[committed["method"] == method].iloc[0]
        model = lab.model if method == "dense" else lab.sliced(float(row["sp"]), float(row["sb"]))
        fresh = flatten([{**lab.measure(model), "method": method}], settings.tasks).iloc[0]
        for column in ("params", "ppl_select", "ppl_eval", *settings.tasks):
            old, new = float(row[column]), float(fresh[column])
            print(f"{method:>9} {column:>14}: committed {old:.6g}, now {new:.6g}")
            if column in settings.tasks:
                gaps["accuracy_points"] = max(gaps["accuracy_points"], 100 * abs(new - old))
            else:
                gaps["relative"] = max(gaps["relative"], abs(new - old) / max(abs(old), 1e-12))
    return gaps
