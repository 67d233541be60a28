# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
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
# In this notebook: rotation invariance shown in a cell, the PCA spectrum per layer, constant vs
# dynamic slicing at the same mean slice, the SB sweep that picks the base slice, and where the
# parameters of a sliced small model go.
#
# **You will be able to**
#
# - explain why folding the norm scales makes a pre-norm transformer rotation invariant, and check it
#   numerically;
# - slice a model with PCA at constant or per-layer dimensions, and read a PCA spectrum;
# - pick SB the way the paper does (lowest perplexity on a selection text) and compare constant and
#   dynamic slicing on held-out text;
# - account for every parameter of a sliced model, tied or untied.
#
# **Papers.** SliceGPT (Ashkboos et al., ICLR 2024, [arXiv:2401.15024](https://arxiv.org/abs/2401.15024)),
# sections 3-4 (computational invariance, PCA slicing); Dumitru et al. 2024
# ([arXiv:2411.03513](https://arxiv.org/abs/2411.03513)), section 3 (per-layer dimensions) and the SB sweep.
# Follows `02_slice_allocation_sliders` (the dimensions); the next lesson, `04_benchmark_tables`,
# evaluates sliced models on zero-shot tasks.

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
import torch
from IPython.display import Markdown, display

from helpers.analysis.redundancy import cached_layer_redundancy
from helpers.compression.allocation import ModelShape, constant_dims
from helpers.compression.checkpoints import load_model
from helpers.compression.ledger import layout_ledger, ledger_by_layer, ledger_totals, parameter_ledger
from helpers.compression.slicing import WeightlessRMSNorm, rotate_and_slice
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.experiments.readings import read_difference
from helpers.experiments.sweeps import constant_vs_dynamic, sb_sweep
from helpers.infra.textdata import load_windows
from helpers.ui import plots

model, tokenizer = load_model(MODEL)
calib = load_windows(tokenizer, CALIB, CALIB_SEQLEN, CALIB_WINDOWS)
select = load_windows(tokenizer, SELECT, EVAL_SEQLEN, EVAL_WINDOWS)
held_out = load_windows(tokenizer, EVAL, EVAL_SEQLEN, EVAL_WINDOWS)
d = model.config.hidden_size
dense_params = ledger_totals(parameter_ledger(model))["total"]
dense_ppl = perplexity_on_ids(model, held_out, desc="dense").perplexity
print(f"{MODEL}: d = {d}, {dense_params / 1e6:.1f}M parameters; dense perplexity on {EVAL}: {dense_ppl:.2f}")

# %% [markdown]
# ## 1. Rotation invariance, shown
#
# **The argument in one line:** a weightless RMS norm divides by $\|x\|/\sqrt d$, and an orthogonal
# $Q$ keeps norms, so $\mathrm{RMSNorm}(xQ) = xQ / (\|xQ\|/\sqrt d) = \mathrm{RMSNorm}(x)\,Q$; with a
# per-dimension scale $g$ this fails ($\mathrm{diag}(g)$ does not commute with $Q$), which is why
# the scale is folded into the next linear layer first. *Predict:* how large is each gap below?

# %%
torch.manual_seed(0)
x = torch.randn(4, d, dtype=torch.float64)
q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
g = torch.rand(d, dtype=torch.float64) + 0.5
norm = WeightlessRMSNorm(d, eps=0.0)
print(f"weightless: max |RMSNorm(xQ) - RMSNorm(x)Q| = {(norm(x @ q) - norm(x) @ q).abs().max():.1e}")
print(f"with scale g: max |RMSNorm(xQ)g - (RMSNorm(x)g)Q| = {(norm(x @ q) * g - (norm(x) * g) @ q).abs().max():.2f}")

# %% [markdown]
# Now the whole model: fold, rotate every layer into its PCA basis and keep **all** $d$ directions
# (no slice). The logits should not move beyond float error.

# %%
rotated = copy.deepcopy(model)
rotate_and_slice(rotated, calib, [d] * model.config.num_hidden_layers, progress=False)
with torch.no_grad():
    before, after = model(held_out[:2]).logits, rotated(held_out[:2]).logits
print(
    f"full-dimension rotation: largest logit change {(after - before).abs().max():.1e}; "
    f"logits range over [{before.min():.1f}, {before.max():.1f}]"
)
del rotated

# %% [markdown]
# ## 2. The spectrum: how much variance do the kept directions hold?
#
# `rotate_and_slice` walks the layers in order. At every boundary (before attention and before the
# MLP of each layer) it accumulates $H = \sum_t x_t^\top x_t$ in float64 over the calibration
# tokens, on inputs produced by the *already sliced* earlier layers, adds 1% damping, and takes
# the eigenvectors. Here we slice constantly at 30% (the tied layout, see section 4) and look at
# the cumulative variance of each layer's spectrum; the dot marks the dimension we keep.

# %%
sliced = copy.deepcopy(model)
info = rotate_and_slice(sliced, calib, constant_dims(ModelShape.from_config(sliced.config), 0.3))
fig = plots.plot_spectra(info.eigenvalues, info.dims, kind="attn")
kept = pd.Series(info.kept_variance())
print(f"kept variance at 30%: min {kept.min():.4f} ({kept.idxmin()}), median {kept.median():.4f}")

# %% [markdown]
# A few huge activation dimensions of SmolLM2 dominate the spectrum, so 70% of the directions
# hold almost all the variance at most boundaries. Variance is not everything, though: the small
# directions still matter for the next-token distribution, as the perplexities below show.
#
# ## 3. Constant vs dynamic at the same parameter count
#
# Dynamic slicing needs Layer Redundancy scores (notebook 01) and a base slice SB: each layer gets
# $FS_i = SB + (SP - SB)\, n_i / \bar n$ (notebook 02). SB = SP is constant slicing, which rounds
# every layer down and so removes a little more than SP asks; every dynamic row is sliced at the SP
# that gives it constant slicing's parameter count (`size="matched"`, as `python -m helpers slice`
# and the gallery do), so the two are compared at the same size. The paper
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
comparison = constant_vs_dynamic(sweeps)
display(comparison)
fig = plots.plot_perplexity_vs_slice(comparison)
fig.axes[0].axhline(dense_ppl, color=plots.COLORS["dense"], ls="--", lw=1, label="dense")
fig.axes[0].legend()
fig.axes[0].set_title(f"{MODEL}: perplexity on {EVAL} ({EVAL_WINDOWS} x {EVAL_SEQLEN} tokens, no BOS)")

# %% [markdown]
# The reading, generated from the table (perplexity: lower is better). The interval of the
# difference will come from the evaluation's bootstrap over windows; without it a reading says so.

# %%
for sp, rows in comparison.groupby("sp"):
    ppl = rows.set_index("method")["perplexity"]
    reading = read_difference(
        "dynamic", ppl["dynamic"], "constant", ppl["constant"], higher_is_better=False, what="held-out perplexity"
    )
    display(Markdown(f"SP = {sp}: {reading}"))
# %% [markdown]
# ## 4. Why a sliced small model can be *larger* than the dense one
#
# SliceGPT unties the head from the embeddings: the final norm's scale is folded into the head and
# the input side is rotated by the first layer's basis, so the two tables differ. For SmolLM2 the
# vocabulary table is 49152 x 576 = 28.3M parameters, a fifth of the model, and it ends up stored
# twice. Each layer also gains two shortcut matrices. The **tied layout** keeps the single shipped
# table and stores a $d \times d_0$ matrix on the input side (into the first basis) and only the
# final norm's $d$-vector scale on the output side (the last basis is the identity). Both layouts
# compute the same function; `untie_sliced` converts one into the other, so one slicing shows both.

# %%
ledger_table = layout_ledger(model, calib, LEDGER_SLICES, reuse={0.3: sliced})
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
# - Folding and rotation leave the logits unchanged up to float error (section 1); all the loss comes
#   from deleting directions.
# - Constant and dynamic slicing are compared on held-out text in section 3, with the reading printed
#   under the table; with small calibration sets (fast mode) the numbers are noisy.
# - For a tied small model, keep the embeddings tied: otherwise slicing barely compresses at all.
#
# ## Questionnaire
#
# 1. Why must the RMSNorm scale be folded into the following linear layers before rotating?
# 2. Why is the covariance accumulated in float64, and what does the 1% damping protect against?
# 3. Why is each layer's PCA computed on inputs produced by the *already sliced* earlier layers?
# 4. What are the shortcut matrices $Q_i^\top Q_{i+1}$, and why are they rectangular in dynamic slicing?
# 5. Why is SB chosen on a different book than the one used for the final comparison?
# 6. Why does untying the head cost SmolLM2 so much, and how does the tied layout avoid it?
#
# ## Exercises
#
# 1. **Skip the folding.** Rotate at full dimension without folding the norm scales and watch the
#    logits diverge.
#
# <details><summary>Solution</summary>
#
# The first cell of section 1 shows the mechanism on one norm: with a scale $g$ the gap is of order
# one instead of float error. For the whole model, rotate a copy's residual stream by a random
# orthogonal $Q$ (embeddings `E @ Q`, every input projection `Q.T @ W`, every output projection
# `W @ Q`) while keeping the original norms with their weights: the largest logit change is no longer
# float error but of the order of the logits themselves.
#
# </details>
#
# 2. **Keep layer 0 whole.** Slice "constant, but layer 0 whole" at SP = 0.3 (lesson 02, exercise 3)
#    and compare its held-out perplexity with the constant and dynamic rows of section 3. How much of
#    the dynamic gain does it keep?
#
# <details><summary>Solution</summary>
#
# Build the dims with `helpers.compression.allocation.kept_dims` (layer 0 at `d`, the others at
# $0.3 \cdot 30/29$), then `rotate_and_slice(copy.deepcopy(model), calib, dims)` and
# `perplexity_on_ids(sliced, held_out)`. Read the three numbers with `read_difference`. Since the
# normalised LR is close to 1 except at layers 0, 1, 24 and 29, most of the gap between constant and
# dynamic may come from sparing layer 0: the exercise measures how much.
#
# </details>
#
# 3. **How much variance is enough?** For each layer, find the smallest dimension that keeps 99% of
#    the variance, and compare that allocation with the LR-based one.
#
# <details><summary>Solution</summary>
#
# From `info.eigenvalues`: `k = (np.cumsum(v) / v.sum() < 0.99).sum() + 1` per boundary. Section 2
# showed that a few huge activation dimensions dominate the spectrum, so 99% comes early almost
# everywhere: variance alone says little about which directions the next-token distribution needs,
# which is why perplexity, not kept variance, decides SB.
#
# </details>
