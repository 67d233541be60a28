"""Regenerate the paper's figures and tables in one command: `python -m helpers reproduce`.

1. SB sweeps: for every SP, slice the dense model at every SB from SP down to 0
   and measure perplexity on a selection book, perplexity on a held-out book and
   zero-shot accuracy. SB = SP is constant slicing (SliceGPT); the dynamic row
   of each SP is the SB < SP with the lowest selection-book perplexity (the
   paper's rule, never looking at the evaluation book).
2. Figures: Figure 1 (allocation at the first SP and its best SB), Figures 2-5
   (accuracy per task and average against SB, constant slicing as a red line),
   the perplexity comparison; the results table (method x SP) as CSV and Markdown.
3. Speed and memory of dense, constant and best dynamic at the first SP: each model
   in its own worker process, repeats interleaved (`helpers.evaluation.speed`).
4. Depth pruning against slicing at matched parameter counts (`helpers.experiments.compare`).
5. With `rules` on, after these: allocation rules and SB selection rules compared (`helpers.experiments.rules_report`,
   which builds on this module; `python -m helpers reproduce --rules` runs it into the same folder and manifest).

The jobs live apart: `presets` (the one `Settings` and its sizes), `cells` (the lab and the sweep's cells),
`reports` (tables, statements, figures, speed, depth), `executors` (cells as jobs); this module runs them in order.
Every cell is cached (`helpers.experiments.results.CellCache`): a rerun skips finished work
and an interrupted run loses at most the cell in progress. Each file written is
recorded in `figures/manifest.json` with the settings that produced it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd

from helpers.experiments.cells import Lab, best_dynamic, cell_params, flatten, sweep
from helpers.experiments.executors import run_cells
from helpers.experiments.presets import Settings
from helpers.experiments.reports import (
    depth_comparison,
    figures,
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
    tables = {"cells": cells, "results": results_table(cells, settings.tasks)}
    write_table(cells, out / "sweep_cells", manifest, "sweep", **cell_params(settings))
    write_table(tables["results"], out / "results_table", manifest, "results_table", **cell_params(settings))
    tables["comparisons"] = write_comparisons(cells, tables["results"], lab, out, manifest)
    figures(lab, cells, out, manifest)
    tables["speed"] = speed_table(lab, cells)
    write_speed_report(tables["speed"], settings, out, manifest)
    if settings.depth:
        tables["depth"] = depth_comparison(
            settings, float(best_dynamic(cells).set_index("sp").loc[settings.sps[0], "sb"]), out, manifest, progress
        )
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
