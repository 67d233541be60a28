# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Benchmark tables and the paper's figures
#
# The dynamic-slicing paper compares constant slicing (SliceGPT: every layer keeps the same
# dimension) with dynamic slicing (each layer keeps a dimension set by its Layer Redundancy) at
# the same mean slice SP, sweeping the base slice SB from SP (constant) down to 0 (fully
# dynamic). This notebook renders that comparison: zero-shot accuracy against SB (the paper's
# Figures 2-5), perplexity, and a table of method x SP.
#
# Every number comes from `helpers.reproduce`, which caches one result per (SP, SB) cell under
# `data/cache/sweep/`: after `python -m helpers reproduce` has run, this notebook only reads.
# Change SP, tasks or the question limit below and it computes the missing cells (slicing
# SmolLM2-135M plus evaluation takes a minute or two per cell on a laptop CPU).

# %% tags=["parameters"]
import os

FAST = os.environ.get("HELPERS_FAST", "0") == "1"
SIZE = "smoke" if FAST else "reduced"  # see helpers.reproduce.SIZES
MODEL = "smollm2-135m"
SPS = None  # e.g. (0.30, 0.35, 0.40); None keeps the size's own
TASKS = None  # e.g. ("piqa", "arc_easy"); None keeps the size's own
LIMIT = None  # questions per task; None keeps the size's own

# %%
import dataclasses

from IPython.display import Markdown, display

from helpers import plots
from helpers.reproduce import SIZES, Lab, best_dynamic, results_table, sweep
from helpers.storage import FIGURES_DIR

overrides = {k: v for k, v in {"sps": SPS, "tasks": TASKS, "limit": LIMIT}.items() if v is not None}
settings = dataclasses.replace(SIZES[SIZE], model=MODEL, **overrides)
print(settings)

# %% [markdown]
# ## The sweep
#
# One row per model: dense, then for every SP each SB from SP down to 0. Accuracy columns use the
# metric SliceGPT reports (acc_norm for PIQA, HellaSwag and ARC; acc for WinoGrande).
# `ppl_select` is measured on a book that is used only to pick SB; `ppl_eval` on a held-out book.

# %%
lab = Lab(settings)
cells = sweep(lab)
tasks = list(settings.tasks)
cells[["method", "sp", "sb", "realised_slice", *tasks, "average", "ppl_select", "ppl_eval", "params"]].round(4)

# %% [markdown]
# ## The paper's table
#
# Rows are method x SP. The dynamic row of each SP is the SB < SP with the lowest `ppl_select`
# (the paper's selection rule, which never looks at the evaluation data). `params_kept` is the
# realised parameter count (the ledger's, tied embeddings counted once) over the dense model's.

# %%
table = results_table(cells, settings.tasks)
(
    table.style.format(precision=3, thousands=",")
    .background_gradient(subset=[*tasks, "average"], cmap="Greens")
    .background_gradient(subset=["ppl_eval"], cmap="Reds")
)

# %% [markdown]
# ## Figure 1: how LR becomes a slice per layer
#
# At the first SP, with the SB the sweep picked.

# %%
best = best_dynamic(cells).set_index("sp")
sp0 = settings.sps[0]
sb0 = float(best.loc[sp0, "sb"])
plots.plot_allocation(lab.allocation(sp0, sb0), title=f"SP = {sp0}, SB = {sb0}")
# %% [markdown]
# ## Figures 2-5: accuracy against SB
#
# The red line is constant slicing (SB = SP). Points above it are settings where dynamic slicing
# beats SliceGPT at the same mean slice. With a few dozen questions per task one question moves
# accuracy by a few points: read the average and the perplexity before single tasks.

# %%
for sp in settings.sps:
    plots.plot_accuracy_vs_sb(cells[cells["sp"] == sp], tasks, sp)

# %% [markdown]
# ## Perplexity: dense, constant, dynamic

# %%
plots.plot_perplexity_comparison(cells, best.reset_index())
# %% [markdown]
# ## Speed, memory and depth pruning
#
# These tables are written by `python -m helpers reproduce` (each model runs in its own worker
# process, repeats interleaved between models, median and interquartile range, ratios to dense;
# `scripts/bench_speed.py` runs the same benchmark at full size; depth pruning is notebook 05).

# %%
for name in ("speed_table", "depth_comparison"):
    path = FIGURES_DIR / f"{name}.md"
    display(
        Markdown(
            path.read_text() if path.exists() else f"*{path.name} not written yet: run `python -m helpers reproduce`*"
        )
    )
