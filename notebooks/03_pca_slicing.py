# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · PCA slicing: constant (SliceGPT) and dynamic (by Layer Redundancy)
#
# SliceGPT removes rows and columns of every weight matrix without retraining. It works because
# a pre-norm transformer with RMS norms can be made **rotation invariant**: fold each norm's scale
# into the linear layers that read from it, and the residual stream can be expressed in any
# orthogonal basis $Q$ without changing the outputs. Choose $Q$ by PCA of the residual stream on
# calibration text, and the last directions carry little variance: delete them.
#
# Dynamic slicing keeps a different number of directions $d_i$ in each layer, more where the layer
# does a lot of work (low Layer Redundancy), fewer where it barely changes the stream. Consecutive
# layers are joined by small (rectangular) shortcut matrices $Q_i^\top Q_{i+1}$.
#
# In this notebook: the PCA spectrum per layer, constant vs dynamic slicing at the same mean slice,
# the SB sweep that picks the base slice, and where the parameters of a sliced small model go.

# %% tags=["parameters"]
import os

FAST = os.environ.get("HELPERS_FAST", "0") == "1"
MODEL = "smollm2-135m"
CALIB = "pride-and-prejudice"  # calibration text for PCA and LR
SELECT = "war-of-the-worlds"  # picks SB (paper's rule: lowest perplexity on a calibration set)
EVAL = "great-expectations"  # held-out book for the final comparison
CALIB_SEQLEN, CALIB_WINDOWS = (64, 2) if FAST else (512, 32)
EVAL_SEQLEN, EVAL_WINDOWS = (64, 2) if FAST else (512, 16)
SPS = [0.3] if FAST else [0.1, 0.2, 0.3]  # mean slice fractions to compare
SB_STEP = 0.3 if FAST else 0.05  # SB sweep from SP down to 0
LEDGER_SLICES = [0.3] if FAST else [0.2, 0.25, 0.3]

# %%
import copy

import pandas as pd
from IPython.display import display

from helpers import plots
from helpers.evaluation import perplexity_on_ids
from helpers.ledger import compression, ledger_by_layer, ledger_totals, parameter_ledger
from helpers.models import load_model
from helpers.redundancy import cached_layer_redundancy
from helpers.slicing import constant_dims, rotate_and_slice, sb_sweep, untie_sliced
from helpers.textdata import load_windows

model, tokenizer = load_model(MODEL)
calib = load_windows(tokenizer, CALIB, CALIB_SEQLEN, CALIB_WINDOWS)
select = load_windows(tokenizer, SELECT, EVAL_SEQLEN, EVAL_WINDOWS)
held_out = load_windows(tokenizer, EVAL, EVAL_SEQLEN, EVAL_WINDOWS)
d = model.config.hidden_size
dense_params = ledger_totals(parameter_ledger(model))["total"]
dense_ppl = perplexity_on_ids(model, held_out, desc="dense").perplexity
print(f"{MODEL}: d = {d}, {dense_params / 1e6:.1f}M parameters; dense perplexity on {EVAL}: {dense_ppl:.2f}")

# %% [markdown]
# ## 1. The spectrum: how much variance do the kept directions hold?
#
# `rotate_and_slice` walks the layers in order. At every boundary (before attention and before the
# MLP of each layer) it accumulates $H = \sum_t x_t^\top x_t$ in float64 over the calibration
# tokens, on inputs produced by the *already sliced* earlier layers, adds 1% damping, and takes
# the eigenvectors. Here we slice constantly at 30% (the tied layout, see section 4) and look at
# the cumulative variance of each layer's spectrum; the dot marks the dimension we keep.

# %%
sliced = copy.deepcopy(model)
info = rotate_and_slice(sliced, calib, constant_dims(sliced, 0.3))
fig = plots.plot_spectra(info.eigenvalues, info.dims, kind="attn")
kept = pd.Series(info.kept_variance())
print(f"kept variance at 30%: min {kept.min():.4f} ({kept.idxmin()}), median {kept.median():.4f}")

# %% [markdown]
# A few huge activation dimensions of SmolLM2 dominate the spectrum, so 70% of the directions
# hold almost all the variance at most boundaries. Variance is not everything, though: the small
# directions still matter for the next-token distribution, as the perplexities below show.
#
# ## 2. Constant vs dynamic at the same mean slice
#
# Dynamic slicing needs Layer Redundancy scores (notebook 01) and a base slice SB: each layer gets
# $FS_i = SB + (SP - SB)\, n_i / \bar n$ (notebook 02). SB = SP is constant slicing. The paper
# sweeps SB from SP to 0 and keeps the SB with the lowest perplexity on a calibration set; we use
# a different book (`SELECT`) for that choice than for the final comparison (`EVAL`).

# %%
lr = cached_layer_redundancy(MODEL, CALIB, CALIB_SEQLEN, CALIB_WINDOWS)["lr"].to_numpy()
sweeps = {}
for sp in SPS:
    sweeps[sp] = sb_sweep(model, lr, sp, calib, select, step=SB_STEP, eval_ids=held_out)
    display(sweeps[sp])

# %% [markdown]
# From every sweep: the constant row (SB = SP) and the selected dynamic row (lowest perplexity on
# `SELECT`), both evaluated on the held-out book.

# %%
rows = []
for sp, table in sweeps.items():
    constant = table[table["sb"] == sp].iloc[0]
    best = table[table["best"]].iloc[0]
    rows.append({"method": "constant", "sp": sp, **constant[["sb", "mean_slice", "params", "eval_perplexity"]]})
    rows.append({"method": "dynamic", "sp": sp, **best[["sb", "mean_slice", "params", "eval_perplexity"]]})
comparison = pd.DataFrame(rows).rename(columns={"eval_perplexity": "perplexity"})
display(comparison)
fig = plots.plot_perplexity_vs_slice(comparison)
fig.axes[0].axhline(dense_ppl, color=plots.COLORS["dense"], ls="--", lw=1, label="dense")
fig.axes[0].legend()
fig.axes[0].set_title(f"{MODEL}: perplexity on {EVAL} ({EVAL_WINDOWS} x {EVAL_SEQLEN} tokens, no BOS)")
# %% [markdown]
# ## 3. Why a sliced small model can be *larger* than the dense one
#
# SliceGPT unties the head from the embeddings: the final norm's scale is folded into the head and
# the input side is rotated by the first layer's basis, so the two tables differ. For SmolLM2 the
# vocabulary table is 49152 x 576 = 28.3M parameters, a fifth of the model, and it ends up stored
# twice. Each layer also gains two shortcut matrices. The **tied layout** keeps the single shipped
# table and stores a $d \times d_0$ matrix on the input side (into the first basis) and only the
# final norm's $d$-vector scale on the output side (the last basis is the identity). Both layouts
# compute the same function; `untie_sliced` converts one into the other, so one slicing shows both.

# %%
ledger_rows = []
for fraction in LEDGER_SLICES:
    tied = sliced if fraction == 0.3 else copy.deepcopy(model)
    if fraction != 0.3:
        rotate_and_slice(tied, calib, constant_dims(tied, fraction))
    tied_totals = ledger_totals(parameter_ledger(tied))
    untied = untie_sliced(copy.deepcopy(tied))
    untied_totals = ledger_totals(parameter_ledger(untied))
    for layout, totals in (("untied", untied_totals), ("tied", tied_totals)):
        ledger_rows.append({"slice": fraction, "layout": layout, **totals})
ledger_table = pd.DataFrame([{"slice": 0.0, "layout": "dense", **ledger_totals(parameter_ledger(model))}, *ledger_rows])
ledger_table["removed"] = [f"{compression(n, dense_params):+.1%}" for n in ledger_table["total"]]
display(ledger_table.drop(columns="other"))

# %%
wide = ledger_table.assign(name=lambda t: t["layout"] + " " + t["slice"].map("{:.0%}".format)).set_index("name")
fig = plots.plot_ledger(wide[["embeddings", "head", "attention", "mlp", "shortcuts"]], title="Where the parameters are")

# %% [markdown]
# Per layer, for the tied 30% model: the MLP dominates, the shortcut matrices are the price of
# rotating between bases.

# %%
fig = plots.plot_ledger(ledger_by_layer(parameter_ledger(sliced)).drop(index=["embeddings", "head"]), title="tied, 30%")

# %% [markdown]
# ## Take-aways
#
# - Folding and rotation leave the logits unchanged up to float error; all the loss comes from
#   deleting directions.
# - At the same mean slice, the dynamic allocation chosen by the SB sweep can be compared with the
#   constant one on held-out text in the table above; with small calibration sets (fast mode) the
#   numbers are noisy.
# - For a tied small model, keep the embeddings tied: otherwise slicing barely compresses at all.
