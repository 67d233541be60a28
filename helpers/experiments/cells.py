"""The sweep's cells: the dense model and every (SP, SB) slice of it, measured once and cached.

`Lab` loads the model, its windows and LR once; `cell_result` computes one cell or reads it from the cache.
Everything this module imports keys the cache (`cell_params`): editing any of it computes fresh cells.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.analysis.redundancy import cached_layer_redundancy
from helpers.compression.allocation import Allocation, ModelShape, layer_allocation
from helpers.compression.checkpoints import load_model
from helpers.compression.depth import parameter_count
from helpers.compression.sliced_io import save_sliced
from helpers.compression.slicing import rotate_and_slice
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.evaluation.stats import accuracy_se, perplexity_interval
from helpers.evaluation.tasks import paper_metric
from helpers.experiments import sweeps
from helpers.experiments.measure import correct, measure, per_character_scores
from helpers.experiments.presets import Settings
from helpers.experiments.results import CellCache
from helpers.experiments.sweeps import sb_values
from helpers.infra.integrity import code_fingerprint, imported_code
from helpers.infra.progress import progress_bar
from helpers.infra.storage import DATA_DIR, cache_key, slug
from helpers.infra.textdata import load_split, load_windows
from helpers.models.adapters import get_adapter


class Lab:
    """The dense model, its LR and the token windows, loaded once and shared by every cell."""

    def __init__(self, settings: Settings, progress: bool = True) -> None:
        s = self.settings = settings
        self.progress = progress
        self.model, self.tokenizer = load_model(s.model, device="cpu")
        self.calib = load_windows(self.tokenizer, s.calib_text, s.seqlen, s.calib_windows)
        skip = s.calib_windows if s.select_text == s.calib_text else 0  # never select on calibration windows
        _, self.select = load_split(self.tokenizer, s.select_text, s.seqlen, skip, s.select_windows)
        if s.select_text in s.eval_texts:
            raise ValueError(f"The selection text {s.select_text!r} must not be an evaluation text.")
        self.eval = torch.cat([load_windows(self.tokenizer, t, s.seqlen, s.eval_windows) for t in s.eval_texts])
        self.lr = cached_layer_redundancy(
            s.model, s.calib_text, s.seqlen, s.calib_windows, progress=progress, loaded=(self.model, self.tokenizer)
        )

    def allocation(self, sp: float, sb: float) -> Allocation:
        """The allocation of cell (SP, SB) at constant slicing's parameter count (`allocation.layer_allocation`)."""
        return layer_allocation(self.lr["lr"].to_numpy(), sp, sb, ModelShape.from_config(self.model.config))

    def dense_copy(self) -> torch.nn.Module:
        """A copy of the dense model to compress (the lab's own stays untouched), under the settings' seed."""
        torch.manual_seed(self.settings.seed)
        return copy.deepcopy(self.model)

    def sliced(self, sp: float, sb: float) -> torch.nn.Module:
        """A freshly sliced copy of the dense model at (SP, SB)."""
        model = self.dense_copy()
        dims = [int(d) for d in self.allocation(sp, sb).kept_dim]
        rotate_and_slice(model, self.calib, dims, progress=False)
        return model

    def measure(self, model: torch.nn.Module, select: bool = True) -> dict:
        """Parameter count, layers, held-out perplexity (with each window's NLL), zero-shot answers (with each
        option's score per character, for stability) and, with `select`, the selection-book perplexity."""
        s = self.settings
        result = measure(model, self.tokenizer, self.eval, {t: s.task_limit(t) for t in s.tasks}, s.dtype)
        held_out = result.perplexity
        return {
            "params": parameter_count(model),
            "layers": len(get_adapter(model).layers(model)),
            "ppl_select": perplexity_on_ids(model, self.select, progress=False).perplexity if select else None,
            "ppl_eval": held_out.perplexity,
            "eval_window_nll": list(held_out.window_nll),
            "eval_window_tokens": list(held_out.window_tokens),
            "tasks": {
                task: {
                    **r.summary,
                    "correct": correct(r),
                    "scores": per_character_scores(r),
                    "labels": [int(v) for v in r.labels],
                }
                for task, r in result.tasks.items()
            },
        }


def cell_params(settings: Settings, **coordinates) -> dict:
    """The cache key of a sweep cell: the settings that change its numbers, the code, the cell's coordinates."""
    keep = (
        "model",
        "calib_text",
        "select_text",
        "seqlen",
        "calib_windows",
        "select_windows",
        "eval_texts",
        "eval_windows",
        "tasks",
        "limit",
        "task_limits",
        "dtype",
        "seed",
    )
    code = code_fingerprint(*imported_code(__name__, leaves=(Settings.__module__,)))  # all that computes cells
    return {**{k: getattr(settings, k) for k in keep}, "code": code, **coordinates}


def sweep_cells(settings: Settings) -> list[tuple[float, float | None]]:
    """Every cell of the sweep as (SP, SB); (0, None) is the dense model."""
    return [(0.0, None)] + [(sp, sb) for sp in settings.sps for sb in sb_values(sp, settings.sb_step)]


def speed_folder(settings: Settings, sp: float, sb: float) -> Path:
    """Where the speed step keeps the sliced model of cell (SP, SB)."""
    key = cache_key(**cell_params(settings, sp=sp, sb=sb))
    return DATA_DIR / "sliced" / "reproduce" / f"{slug(settings.model)}-{key}"


def cell_result(lab: Lab, cache: CellCache, sp: float, sb: float | None) -> dict:
    """One cell's measurements, from the cache or computed and cached (atomically).

    A sliced model at an SP of `recover_sps` is also saved, for recovery and the speed step, which would otherwise
    slice it again.
    """
    s = lab.settings
    if sb is None:
        return cache.get_or_compute(cell_params(s, kind="dense"), lambda: lab.measure(lab.model))

    def compute() -> dict:
        model = lab.sliced(sp, sb)
        folder = speed_folder(s, sp, sb)
        if np.isclose(sp, s.recover_sps).any() and not (folder / "slicing.json").exists():
            save_sliced(model, lab.tokenizer, folder)
        return lab.measure(model)

    return cache.get_or_compute(cell_params(s, kind="sliced", sp=sp, sb=sb), compute)


def sweep(lab: Lab, cache: CellCache | None = None) -> pd.DataFrame:
    """Dense plus every (SP, SB) cell, computed or read from the cache; one flat row per cell."""
    s, cache = lab.settings, cache or CellCache("sweep")
    rows = []
    for sp, sb in progress_bar(sweep_cells(s), desc="sweep cells", unit="cell", disable=not lab.progress):
        result = cell_result(lab, cache, sp, sb)
        if sb is None:
            rows.append({"method": "dense", "sp": 0.0, "sb": 0.0, "sliced_sp": 0.0, "realised_slice": 0.0, **result})
            continue
        alloc = lab.allocation(sp, sb)
        method = "constant" if np.isclose(sb, sp) else "dynamic"
        row = {"method": method, "sp": sp, "sb": sb, "sliced_sp": alloc.sp, "realised_slice": alloc.realised_mean}
        rows.append({**row, **result})
    return flatten(rows, s.tasks)


RAW = ("tasks", "eval_window_nll", "eval_window_tokens")  # per-question and per-window records of a cell


def flatten(rows: list[dict], tasks: tuple[str, ...]) -> pd.DataFrame:
    """One column per task (the paper's metric) with its standard error, their average, the perplexity interval.

    The per-question answers and per-window NLLs stay in the `raw` column (for paired comparisons, not written).
    """
    flat = []
    for row in rows:
        out = {k: v for k, v in row.items() if k not in RAW}
        for task in tasks:
            out[task] = row["tasks"][task][paper_metric(task)]
            out[f"{task}_se"] = accuracy_se(np.array(row["tasks"][task]["correct"]))
        out["average"] = float(np.mean([out[t] for t in tasks]))
        ci = perplexity_interval(row["eval_window_nll"], row["eval_window_tokens"])
        out["ppl_eval_low"], out["ppl_eval_high"] = ci.low, ci.high
        out["questions"] = int(sum(row["tasks"][t]["n"] for t in tasks))
        out["raw"] = {k: row[k] for k in RAW}
        flat.append(out)
    return pd.DataFrame(flat)


def best_dynamic(cells: pd.DataFrame) -> pd.DataFrame:
    """For each SP, the dynamic cell (SB < SP) with the lowest selection-book perplexity (sweeps.best_dynamic)."""
    return sweeps.best_dynamic(cells, "ppl_select")
