"""The paper's SB sweep: slice at every SB for a target SP and select the best dynamic allocation.

One selection rule for the whole lab (`best_dynamic`): among SB < SP, the
lowest score; SB = SP is constant slicing and never counts as dynamic.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from helpers.compression.allocation import ModelShape, layer_allocation
from helpers.compression.ledger import ledger_totals, parameter_ledger
from helpers.compression.slicing import rotate_and_slice
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.infra.progress import progress_bar


def best_dynamic(table: pd.DataFrame, score: str) -> pd.DataFrame:
    """For each SP, the row with SB < SP and the lowest `score`: the one rule that picks "best dynamic".

    SB = SP is constant slicing, never a dynamic result, even when it scores best.
    """
    dynamic = table[table["sb"] < table["sp"] - 1e-9]
    return dynamic.loc[dynamic.groupby("sp")[score].idxmin()]


def sb_values(sp: float, step: float = 0.02) -> list[float]:
    """SB from SP down to 0 in steps of `step` (the paper's sweep), SP first, 0 last."""
    if not 0 < step <= 1 or not 0 <= sp < 1:
        raise ValueError(f"Need 0 <= sp < 1 and 0 < step <= 1; got sp={sp}, step={step}.")
    values = [abs(round(sp - k * step, 6)) for k in range(int(sp / step + 1e-9) + 1)]
    return values if values[-1] == 0 else [*values, 0.0]


def sb_sweep(
    model: nn.Module,
    scores: Sequence[float],
    sp: float,
    calib_ids: torch.Tensor,
    select_ids: torch.Tensor,
    step: float = 0.02,
    eval_ids: torch.Tensor | None = None,
    tied: bool | None = None,
    batch_size: int = 8,
    progress: bool = True,
    size: str = "matched",
) -> pd.DataFrame:
    """Slice a copy of the dense `model` for every SB in `sb_values(sp, step)`; perplexity on `select_ids`.

    `scores`: per-layer scores, higher = slice more (LR, or any formula rule's `allocation_rules.rule_scores`);
    each SB is allocated by `allocation.layer_allocation` at `size` (matched: the gallery's rows).

    Returns columns sp, sb, mean_slice (realised), params, perplexity, best
    (`best_dynamic`: the lowest perplexity among SB < SP, the paper's selection
    rule) and, with `eval_ids`, eval_perplexity. `select_ids` should come from a text other than the one
    used for the final evaluation.
    """
    shape = ModelShape.from_config(model.config)
    d, scores = shape.hidden_size, np.asarray(scores, dtype=np.float64)
    rows = []
    for sb in progress_bar(sb_values(sp, step), desc=f"SB sweep (SP={sp})", unit="SB", disable=not progress):
        dims = [int(v) for v in layer_allocation(scores, sp, sb, shape, size).kept_dim]
        sliced = copy.deepcopy(model)
        rotate_and_slice(sliced, calib_ids, dims, tied=tied, batch_size=batch_size, progress=False)
        ppl = perplexity_on_ids(sliced, select_ids, batch_size=batch_size, progress=False).perplexity
        params = ledger_totals(parameter_ledger(sliced))["total"]
        realised = 1 - float(np.mean(dims)) / d
        rows.append({"sp": sp, "sb": sb, "mean_slice": realised, "params": params, "perplexity": ppl})
        if eval_ids is not None:
            rows[-1]["eval_perplexity"] = perplexity_on_ids(sliced, eval_ids, batch_size, progress=False).perplexity
        del sliced
    table = pd.DataFrame(rows)
    table["best"] = table.index.isin(best_dynamic(table, "perplexity").index)
    return table


def constant_vs_dynamic(sweeps: dict[float, pd.DataFrame]) -> pd.DataFrame:
    """From `sb_sweep` tables keyed by SP: the constant row (SB = SP) and the selected dynamic row of each.

    The dynamic row is the sweep's `best` (lowest perplexity on the selection text); columns method, sp,
    sb, mean_slice, params and perplexity (the held-out `eval_perplexity`).
    """
    rows = []
    for sp, table in sweeps.items():
        for method, row in (("constant", table[table["sb"] == sp].iloc[0]), ("dynamic", table[table["best"]].iloc[0])):
            rows.append({"method": method, "sp": sp, **row[["sb", "mean_slice", "params", "eval_perplexity"]]})
    return pd.DataFrame(rows).rename(columns={"eval_perplexity": "perplexity"})
