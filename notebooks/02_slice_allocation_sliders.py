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
# # 02 · How much to slice each layer: SP, SB and the Layer Redundancy allocation
#
# Dynamic slicing removes a different share of the hidden dimension in every layer: layers whose
# output is almost their input (high **Layer Redundancy**, notebook 01) lose more, the others less.
# Two numbers steer it:
#
# * **SP**, the mean slice fraction over all layers (0.30 removes 30% of the hidden dimension on average);
# * **SB**, the base slice every layer gets whatever its score (0 ≤ SB ≤ SP).
#
# With the normalised score n_i (1 = most redundant layer):
#
#     SLR_i = (SP - SB) * n_i / mean(n)        FS_i = SB + SLR_i        mean(FS) = SP
#
# SB = SP is constant slicing (SliceGPT); SB = 0 lets the scores decide everything. This notebook
# computes the allocation, shows why the paper's formula needs bounds and integer dimensions, and
# ends with sliders that redraw the paper's Figure 1 as you move them.
#
# **You will be able to**
#
# - compute the per-layer slice fractions for any (SP, SB) and explain each term of the formula;
# - say why the formula needs bounds and integer (multiple-of-8) dimensions, and report the realised
#   mean slice instead of the request;
# - predict from the normalised LR curve which layers keep most of their width;
# - count what a slicing really saves once the shortcut matrices and the embeddings are included.
#
# **Papers.** Dumitru et al. 2024 ([arXiv:2411.03513](https://arxiv.org/abs/2411.03513)), section 3 and
# Figure 1; SliceGPT (Ashkboos et al., ICLR 2024, [arXiv:2401.15024](https://arxiv.org/abs/2401.15024))
# for constant slicing. Follows `01_hidden_states_and_lr` (the LR scores); the next lesson,
# `03_pca_slicing`, slices a model with these dimensions.

# %% tags=["parameters"]
import os

FAST = os.environ.get("HELPERS_FAST", "0") == "1"
MODEL = "smollm2-135m"
TEXT = "gutenberg"
SEQLEN = 64 if FAST else 256
WINDOWS = 4 if FAST else 16
SP = 0.3
SB = 0.1

# %%
# %matplotlib inline
import numpy as np
import pandas as pd
from IPython.display import display

from helpers.analysis.redundancy import cached_layer_redundancy, lr_cache_path
from helpers.compression.allocation import ModelShape, allocate, allocation_table, dense_param_count, savings_table
from helpers.ui.plots import plot_allocation
from helpers.ui.widgets import find_lr_files, slider_app

# %% [markdown]
# ## 1. The scores
#
# The allocation needs only the LR score of each layer. It is computed once and cached under
# `data/cache/lr/` (in fast mode on a few short windows, which already ranks the layers alike).
# The model's shape comes from its `config.json` alone: no weights are loaded for the allocation.

# %%
lr = cached_layer_redundancy(MODEL, TEXT, SEQLEN, WINDOWS)
lr_path = lr_cache_path(MODEL, TEXT, SEQLEN, WINDOWS)
shape = ModelShape.from_pretrained(MODEL)
print(f"{MODEL}: {shape.n_layers} layers, hidden size d = {shape.hidden_size}; LR from {lr_path.name}")
lr.head()

# %% [markdown]
# ## 2. One allocation
#
# `allocate` normalises the scores, applies the formula and then rounds each layer's kept dimension
# (1 - FS_i)·d to a multiple of 8, choosing per layer between the multiple below and above so that
# the **realised** mean slice is as close to SP as multiples of 8 allow. Report that one, not SP.

# %%
alloc = allocate(lr["lr"].to_numpy(), SP, SB, shape.hidden_size)
print(f"requested SP = {SP}, mean FS before rounding = {alloc.fs.mean():.12f}, realised = {alloc.realised_mean:.5f}")
allocation_table(alloc).round(4).T

# %% [markdown]
# Figure 1 of the paper for this (SP, SB): the normalised score (top) decides how the slice above
# SB (orange, SLR) is spread; the final slice (purple) averages exactly to SP (red line). The thin
# step line is the slice each layer really gets after rounding. The first layer, the least
# redundant one here, keeps almost all of its width: it only gets SB.

# %%
plot_allocation(alloc, title=f"{MODEL}: SP={SP}, SB={SB}")

# %% [markdown]
# ## 3. Why bounds matter
#
# The reference code does not clip. When the mean normalised score is small (one layer far more
# redundant than the rest), a layer can be asked for more than everything. Take a toy model of six
# layers with SP = 0.5 and SB = 0: the formula asks layer 3 for a slice above 1 (a negative width).
# `allocate` holds such layers at FS_max = 0.95 and spreads the rest over the others, keeping the
# mean and the order by score. An impossible request raises an error that says what to change.

# %%
toy_lr = np.array([0.50, 0.52, 0.51, 0.99, 0.50, 0.53])
toy_n = (toy_lr - toy_lr.min()) / (toy_lr.max() - toy_lr.min())
toy = allocate(toy_lr, 0.5, 0.0, hidden_size=64)
pd.DataFrame({"normalised score": toy_n, "FS unclipped": 0.5 * toy_n / toy_n.mean(), "FS allocate": toy.fs}).round(3)

# %%
print(f"means: unclipped {(0.5 * toy_n / toy_n.mean()).mean():.3f}, allocate {toy.fs.mean():.3f}")
try:
    allocate(toy_lr, 0.9, 0.1, hidden_size=64)
except ValueError as err:
    print("error:", err)

# %% [markdown]
# ## 4. What it saves: the parameter count
#
# Slicing shrinks every projection that reads or writes the residual stream, but adds a small
# matrix on each residual connection (consecutive layers live in different bases), and the embedding
# table and head are counted apart because they dominate small models such as this one.
# At a small SP those shortcut matrices cost more than the slicing saves: the model grows.

# %%
print(f"dense model: {dense_param_count(shape)['total']:,} parameters")
savings_table(lr["lr"].to_numpy(), [0.1, 0.2, 0.3, 0.4, 0.5], SB, shape)

# %% [markdown]
# ## 5. Figure 1 for a few settings
#
# The same figure at SP = 0.3 for SB = 0.3 (constant), 0.1 and 0 (fully dynamic), and at SP = 0.5,
# SB = 0.1. *Predict first:* with the normalised LR close to 1 almost everywhere, how different can
# the SB = 0 allocation be from the constant one, and where?

# %%
for sp, sb in ((0.3, 0.3), (0.3, 0.1), (0.3, 0.0), (0.5, 0.1)):
    display(
        plot_allocation(allocate(lr["lr"].to_numpy(), sp, sb, shape.hidden_size), title=f"{MODEL}: SP={sp}, SB={sb}")
    )

# %% [markdown]
# ## 6. Sliders (live with a kernel, or served by Voila)
#
# Move **SP** and **SB** (SB can never exceed SP: it follows SP down), or pick another cached LR
# file. Each move re-allocates and redraws the figure; the readout gives the realised mean slice,
# the kept dimensions and the parameter count. Sliders need a running kernel: in this rendered page
# they are inert (the figures above are the static version). To use them, open the notebook in
# Jupyter, or serve it as a small web app with
# `voila notebooks/02_slice_allocation_sliders.ipynb` (Voila runs the notebook and shows only its
# outputs). `scripts/bench_slider_callback.py` measures how fast a slider move redraws.

# %%
paths = [lr_path] + [p for p in find_lr_files() if p != lr_path]
app = slider_app(paths, sp=SP, sb=SB)
app.box

# %% [markdown]
# ## Questionnaire
#
# 1. What are SP and SB, and which values of SB give SliceGPT's constant slicing and a fully dynamic slicing?
# 2. Why is the mean of FS exactly SP before rounding, and why is it not exactly SP after rounding?
# 3. What does `allocate` do when the formula asks a layer for more than FS_max?
# 4. Why can a sliced small model have *more* parameters than the dense one at small SP?
# 5. Which layer keeps most of its width here, and why?
#
# ## Exercises
#
# 1. **The mean.** Prove that $\operatorname{mean}_i FS_i = SP$ for any scores, and find every
#    transformation of LR that leaves the allocation unchanged.
#
# <details><summary>Solution</summary>
#
# $\operatorname{mean}(FS) = SB + (SP - SB)\,\operatorname{mean}(n)/\bar n = SB + SP - SB = SP$. The
# allocation depends on LR only through $n$; $n$ is unchanged exactly by the maps $LR \mapsto a\,LR + b$
# with $a > 0$ (min-max normalisation removes shift and scale). Check it:
# `np.allclose(allocate(2 * x + 1, 0.3, 0.1, 576).fs, allocate(x, 0.3, 0.1, 576).fs)` is true, and
# with `x ** 2` it is false.
#
# </details>
#
# 2. **Invert the allocation.** Slice the *least* redundant layers most (use $1 - n_i$ in place of
#    $n_i$) at SP = 0.3, SB = 0 and compare the kept dimensions with the paper's rule. Which layer
#    loses most?
#
# <details><summary>Solution</summary>
#
# `allocate(-lr["lr"].to_numpy(), 0.3, 0.0, shape.hidden_size)`: negating LR turns $n$ into $1 - n$
# (min-max again). The layers the paper's rule spares (0, 1, 24 and 29 for SmolLM2) now hit FS_max
# = 0.95 and keep 32 dimensions; for the others $1 - n_i$ is a tiny number, so small differences
# in LR decide their slices, which scatter between 0 and about 0.45 (our run on 4 x 64 tokens of
# Gutenberg). Slicing it as in lesson 03 measures what that costs in perplexity.
#
# </details>
#
# 3. **Spare layer 0 only.** Build "constant, but layer 0 whole": every other layer gets the same
#    slice, chosen so that the mean is still 0.3. How close are its kept dimensions to the SB = 0
#    allocation?
#
# <details><summary>Solution</summary>
#
# The others get $0.3 \cdot L / (L - 1)$; with $L = 30$ that is 0.310. Compare
# `allocate(lr["lr"].to_numpy(), 0.3, 0.0, shape.hidden_size).kept_dim` with 576 for layer 0 and
# `helpers.compression.allocation.kept_dims` of that vector: in our run (LR from 4 x 64 tokens of Gutenberg) they
# differ by at most one multiple of 8 except at layers 1, 24 and 29 (424, 416 and 448 dynamic against
# 400 and 392). Slice both in lesson 03 to see how much of the dynamic gain this keeps.
#
# </details>
