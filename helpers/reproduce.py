"""Regenerate the paper's figures and tables in one command: `python -m helpers reproduce`.

1. SB sweeps: for every SP, slice the dense model at every SB from SP down to 0
   and measure perplexity on a selection book, perplexity on a held-out book and
   zero-shot accuracy. SB = SP is constant slicing (SliceGPT); the dynamic row
   of each SP is the SB < SP with the lowest selection-book perplexity (the
   paper's rule, never looking at the evaluation book).
2. Figures: Figure 1 (allocation at the first SP and its best SB), Figures 2-5
   (accuracy per task and average against SB, constant slicing as a red line),
   the perplexity comparison; the results table (method x SP) as CSV and Markdown.
3. Speed and memory of dense, constant and best dynamic at each SP, each
   measured in a fresh process so that peak memory is that model's own.
4. Depth pruning against slicing at matched parameter counts (`helpers.compare`).

Every cell is cached (`helpers.results.CellCache`): a rerun skips finished work
and an interrupted run loses at most the cell in progress. Each file written is
recorded in `figures/manifest.json` with the settings that produced it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from helpers.models import DEFAULT_MODEL
from helpers.results import CellCache, Manifest
from helpers.storage import DATA_DIR, FIGURES_DIR, cache_key, slug, write_csv_atomic, write_text_atomic

TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande")
ACC_ONLY = ("winogrande",)  # SliceGPT reports acc for WinoGrande and acc_norm for the rest


@dataclass(frozen=True)
class Settings:
    """Everything that determines the numbers; the relevant fields key every cached cell."""

    model: str = DEFAULT_MODEL
    calib_text: str = "pride-and-prejudice"  # LR and PCA calibration
    select_text: str = "war-of-the-worlds"  # picks the best SB; never the evaluation text
    eval_text: str = "great-expectations"  # held-out perplexity
    seqlen: int = 256
    calib_windows: int = 32
    select_windows: int = 8
    eval_windows: int = 16
    sps: tuple[float, ...] = (0.30, 0.35, 0.40)
    sb_step: float = 0.15
    tasks: tuple[str, ...] = TASKS
    limit: int | None = 40  # questions per task; None = the whole validation split
    speed_prompt: int = 128
    speed_new_tokens: int = 32
    depth: bool = True  # also run the depth-pruning comparison
    depth_steps: int = 150  # replacement training steps in the depth comparison
    seed: int = 0

    def cell_params(self, **coordinates) -> dict:
        """The fields that change a sweep cell's numbers, plus the cell's coordinates."""
        keep = (
            "model",
            "calib_text",
            "select_text",
            "eval_text",
            "seqlen",
            "calib_windows",
            "select_windows",
            "eval_windows",
            "tasks",
            "limit",
            "seed",
        )
        return {**{k: getattr(self, k) for k in keep}, **coordinates}


SIZES: dict[str, Settings] = {
    "reduced": Settings(),  # the README's main command, under 30 minutes on 2 CPU cores
    # The paper's protocol sizes (SB step 0.02, whole validation splits): hours on a GPU.
    "full": Settings(
        seqlen=512, calib_windows=128, select_windows=32, eval_windows=64, sb_step=0.02, limit=None, depth_steps=1000
    ),
    # Every step in about a minute: the notebooks' fast mode and the tests.
    "smoke": Settings(
        seqlen=64,
        calib_windows=4,
        select_windows=2,
        eval_windows=2,
        sps=(0.3,),
        sb_step=0.3,
        tasks=("piqa", "winogrande"),
        limit=4,
        speed_prompt=16,
        speed_new_tokens=4,
        depth=False,
    ),
}


class Lab:
    """The dense model, its LR and the token windows, loaded once and shared by every cell."""

    def __init__(self, settings: Settings, progress: bool = True) -> None:
        from helpers.models import load_model
        from helpers.redundancy import cached_layer_redundancy
        from helpers.textdata import load_windows

        s = self.settings = settings
        self.progress = progress
        self.model, self.tokenizer = load_model(s.model, device="cpu")
        self.calib = load_windows(self.tokenizer, s.calib_text, s.seqlen, s.calib_windows)
        self.select = load_windows(self.tokenizer, s.select_text, s.seqlen, s.select_windows)
        self.eval = load_windows(self.tokenizer, s.eval_text, s.seqlen, s.eval_windows)
        self.lr = cached_layer_redundancy(
            s.model, s.calib_text, s.seqlen, s.calib_windows, progress=progress, loaded=(self.model, self.tokenizer)
        )

    def allocation(self, sp: float, sb: float):
        """The allocation (fractions and kept dimensions) for (SP, SB)."""
        from helpers.allocation import allocate

        return allocate(self.lr["lr"].to_numpy(), sp, sb, self.model.config.hidden_size)

    def sliced(self, sp: float, sb: float) -> torch.nn.Module:
        """A freshly sliced copy of the dense model at (SP, SB)."""
        from helpers.slicing import rotate_and_slice

        torch.manual_seed(self.settings.seed)
        model = copy.deepcopy(self.model)
        rotate_and_slice(model, self.calib, [int(d) for d in self.allocation(sp, sb).kept_dim], progress=False)
        return model

    def measure(self, model: torch.nn.Module) -> dict:
        """Parameter count, both perplexities and zero-shot accuracy of one model."""
        from helpers.evaluation import perplexity_on_ids
        from helpers.ledger import ledger_totals, parameter_ledger
        from helpers.zeroshot import evaluate

        s = self.settings
        return {
            "params": ledger_totals(parameter_ledger(model))["total"],
            "ppl_select": perplexity_on_ids(model, self.select, progress=False).perplexity,
            "ppl_eval": perplexity_on_ids(model, self.eval, progress=False).perplexity,
            "tasks": {task: r.summary for task, r in evaluate(model, self.tokenizer, list(s.tasks), s.limit).items()},
        }


def sweep(lab: Lab, cache: CellCache | None = None) -> pd.DataFrame:
    """Dense plus every (SP, SB) cell, computed or read from the cache; one flat row per cell."""
    from helpers.slicing import sb_values

    s, cache = lab.settings, cache or CellCache("sweep")
    cells = [(0.0, None)] + [(sp, sb) for sp in s.sps for sb in sb_values(sp, s.sb_step)]
    rows = []
    for sp, sb in tqdm(cells, desc="sweep cells", unit="cell", disable=not lab.progress):
        if sb is None:
            result = cache.get_or_compute(s.cell_params(kind="dense"), lambda: lab.measure(lab.model))
            rows.append({"method": "dense", "sp": 0.0, "sb": 0.0, "realised_slice": 0.0, **result})
            continue
        realised = 1 - float(np.mean(lab.allocation(sp, sb).kept_dim)) / lab.model.config.hidden_size
        result = cache.get_or_compute(
            s.cell_params(kind="sliced", sp=sp, sb=sb), lambda sp=sp, sb=sb: lab.measure(lab.sliced(sp, sb))
        )
        method = "constant" if np.isclose(sb, sp) else "dynamic"
        rows.append({"method": method, "sp": sp, "sb": sb, "realised_slice": realised, **result})
    return flatten(rows, s.tasks)


def paper_metric(task: str) -> str:
    """The metric SliceGPT and the dynamic-slicing paper report for a task."""
    return "acc" if task in ACC_ONLY else "acc_norm"


def flatten(rows: list[dict], tasks: tuple[str, ...]) -> pd.DataFrame:
    """One column per task (the paper's metric), plus their average and the questions scored."""
    flat = []
    for row in rows:
        out = {k: v for k, v in row.items() if k != "tasks"}
        for task in tasks:
            out[task] = row["tasks"][task][paper_metric(task)]
        out["average"] = float(np.mean([out[t] for t in tasks]))
        out["questions"] = int(sum(row["tasks"][t]["n"] for t in tasks))
        flat.append(out)
    return pd.DataFrame(flat)


def best_dynamic(cells: pd.DataFrame) -> pd.DataFrame:
    """For each SP, the dynamic cell (SB < SP) with the lowest selection-book perplexity (slicing.best_dynamic)."""
    from helpers.slicing import best_dynamic as pick

    return pick(cells, "ppl_select")


def results_table(cells: pd.DataFrame, tasks: tuple[str, ...]) -> pd.DataFrame:
    """The paper-style table: rows method x SP; tasks, average, perplexity, parameters kept."""
    picked = pd.concat([cells[cells["method"].isin(["dense", "constant"])], best_dynamic(cells)])
    dense_params = int(cells.loc[cells["method"] == "dense", "params"].iloc[0])
    table = picked.assign(params_kept=picked["params"] / dense_params)
    table = table.sort_values(
        ["sp", "method"], key=lambda c: c.map({"dense": 0, "constant": 1, "dynamic": 2}) if c.name == "method" else c
    )
    columns = [
        "method",
        "sp",
        "sb",
        "realised_slice",
        *tasks,
        "average",
        "ppl_eval",
        "params",
        "params_kept",
        "questions",
    ]
    return table[columns].reset_index(drop=True)


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A Markdown table with fixed precision (percent-looking columns stay fractions)."""
    return table.to_markdown(index=False, floatfmt=f".{digits}f") + "\n"


def write_table(table: pd.DataFrame, stem: Path, manifest: Manifest, step: str, **params) -> list[Path]:
    """Write `stem`.csv and `stem`.md atomically and record both."""
    files = [
        write_csv_atomic(table, stem.with_suffix(".csv")),
        write_text_atomic(stem.with_suffix(".md"), markdown(table)),
    ]
    manifest.record(files, step, **params)
    return files


def speed_of(folder_or_name: str, settings: Settings) -> dict:
    """Run `python -m helpers speed` on one model in a fresh process (so peak memory is its own)."""
    command = [
        sys.executable,
        "-m",
        "helpers",
        "speed",
        "--model",
        folder_or_name,
        "--text",
        settings.eval_text,
        "--prompt",
        str(settings.speed_prompt),
        "--new-tokens",
        str(settings.speed_new_tokens),
        "--json",
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), check=False)
    if out.returncode != 0:
        raise RuntimeError(f"speed measurement failed for {folder_or_name}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed_table(lab: Lab, cells: pd.DataFrame, cache: CellCache | None = None) -> pd.DataFrame:
    """Speed and memory of dense, constant and best-dynamic models; sliced ones saved once under data/sliced/."""
    from helpers.slicing import save_sliced

    s, cache = lab.settings, cache or CellCache("speed")
    picked = pd.concat([cells[cells["method"].isin(["dense", "constant"])], best_dynamic(cells)])
    rows = []
    for row in tqdm(picked.itertuples(), total=len(picked), desc="speed", unit="model", disable=not lab.progress):

        def measure(row=row) -> dict:
            if row.method == "dense":
                return speed_of(s.model, s)
            folder = (
                DATA_DIR
                / "sliced"
                / "reproduce"
                / f"{slug(s.model)}-{cache_key(**s.cell_params(sp=row.sp, sb=row.sb))}"
            )
            if not (folder / "slicing.json").exists():
                save_sliced(lab.sliced(row.sp, row.sb), lab.tokenizer, folder)
            return speed_of(str(folder), s)

        params = {
            "model": s.model,
            "sp": row.sp,
            "sb": row.sb,
            "method": row.method,
            "prompt": s.speed_prompt,
            "new_tokens": s.speed_new_tokens,
            **s.cell_params(),
        }
        rows.append(
            {
                "method": row.method,
                "sp": row.sp,
                "sb": row.sb,
                "params": row.params,
                **cache.get_or_compute(params, measure),
            }
        )
    return pd.DataFrame(rows)


def figures(lab: Lab, cells: pd.DataFrame, out: Path, manifest: Manifest) -> None:
    """Figure 1, Figures 2-5 (one per SP), the perplexity comparison."""
    from helpers import plots

    s = lab.settings
    best = best_dynamic(cells).set_index("sp")
    sp0 = s.sps[0]
    sb0 = float(best.loc[sp0, "sb"]) if sp0 in best.index else 0.0
    fig = plots.plot_allocation(lab.allocation(sp0, sb0), title=f"{s.model}: SP={sp0}, SB={sb0} (best by perplexity)")
    manifest.record(plots.save_figure(fig, out / "figure1_allocation"), "figure1", sp=sp0, sb=sb0, **s.cell_params())
    for index, sp in enumerate(s.sps, start=2):
        fig = plots.plot_accuracy_vs_sb(cells[cells["sp"] == sp], list(s.tasks), sp)
        files = plots.save_figure(fig, out / f"figure{index}_accuracy_vs_sb_sp{round(sp * 100)}")
        manifest.record(files, "accuracy_vs_sb", sp=sp, **s.cell_params())
    fig = plots.plot_perplexity_comparison(cells, best.reset_index())
    manifest.record(plots.save_figure(fig, out / "perplexity_comparison"), "perplexity_comparison", **s.cell_params())


def depth_comparison(settings: Settings, sb: float, out: Path, manifest: Manifest, progress: bool) -> pd.DataFrame:
    """Depth pruning vs slicing at the parameter count of constant slicing at the first SP (notebook 05)."""
    from helpers.compare import CompareSettings, compare
    from helpers.compare import write_table as write_depth

    compare_settings = CompareSettings(
        model=settings.model,
        calib=settings.calib_text,
        seqlen=settings.seqlen,
        calib_windows=settings.calib_windows,
        train_windows=settings.calib_windows // 2,
        max_steps=settings.depth_steps,
        slice_fraction=settings.sps[0],
        base_slice=sb,
        eval_text=settings.eval_text,
        eval_seqlen=settings.seqlen,
        eval_windows=settings.eval_windows,
        tasks=settings.tasks,
        task_limit=settings.limit,
    )
    table, _ = compare(compare_settings, progress=progress)
    manifest.record(
        write_depth(table, out / "depth_comparison"), "depth_comparison", **dataclasses.asdict(compare_settings)
    )
    return table


def reproduce(settings: Settings, out: Path = FIGURES_DIR, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run every step and write figures, tables and the manifest into `out`; returns the tables."""
    started = time.time()
    manifest = Manifest(out, model=settings.model, seed=settings.seed, settings=dataclasses.asdict(settings))
    lab = Lab(settings, progress)
    cells = sweep(lab)
    tables = {"cells": cells, "results": results_table(cells, settings.tasks)}
    write_table(cells, out / "sweep_cells", manifest, "sweep", **settings.cell_params())
    write_table(tables["results"], out / "results_table", manifest, "results_table", **settings.cell_params())
    figures(lab, cells, out, manifest)
    tables["speed"] = speed_table(lab, cells)
    write_table(
        tables["speed"],
        out / "speed_table",
        manifest,
        "speed",
        prompt=settings.speed_prompt,
        new_tokens=settings.speed_new_tokens,
        **settings.cell_params(),
    )
    if settings.depth:
        tables["depth"] = depth_comparison(
            settings, float(best_dynamic(cells).set_index("sp").loc[settings.sps[0], "sb"]), out, manifest, progress
        )
    if progress:
        print(f"reproduce ({settings.model}) finished in {(time.time() - started) / 60:.1f} min; see {out}")
    return tables
