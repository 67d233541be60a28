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
# # 05 · Depth pruning next to slicing
#
# Slicing makes every layer *thinner*. Depth pruning makes the model *shorter*: it deletes
# whole decoder layers. Three published ways to pick which ones:
#
# - **ShortGPT** (Men et al.): remove the $n$ layers with the lowest Block Influence
#   $BI_l = 1 - \operatorname{mean}_t \cos(x_l[t], x_{l+1}[t])$, wherever they are.
# - **Angular distance** (Gromov et al.): remove the contiguous block $l..l+n-1$ whose input
#   $x_l$ and output $x_{l+n}$ point most alike on the *last* token,
#   $d = \arccos(\cos(x_l, x_{l+n}))/\pi$.
# - **LLM-Streamline** (Chen et al.): the contiguous block with the highest mean cosine over
#   *all* tokens, then train a small network to stand in for it.
#
# All three read the same thing: cosines between residual states $x_l$ and $x_{l+n}$. We stream
# calibration text once, collect those for every $(l, n)$, pick blocks, train a replacement, and
# finally compare everything with slicing at the same parameter count.
#
# **You will be able to**
#
# - compute the block similarities all three methods use, in one streaming pass;
# - say which layers each method removes and why the choices differ;
# - train a small replacement for a removed block and judge it against the identity map;
# - compare depth pruning with slicing at a matched parameter count, and say why one wins here.
#
# **Papers.** ShortGPT (Men et al., [arXiv:2403.03853](https://arxiv.org/abs/2403.03853)); Gromov et al.,
# *The Unreasonable Ineffectiveness of the Deeper Layers* ([arXiv:2403.17887](https://arxiv.org/abs/2403.17887));
# LLM-Streamline (Chen et al., ICLR 2025, [arXiv:2403.19135](https://arxiv.org/abs/2403.19135)); the hybrid is
# future work named by Dumitru et al. 2024 ([arXiv:2411.03513](https://arxiv.org/abs/2411.03513)). Follows
# `04_benchmark_tables`; the next lesson, `06_allocation_rules`, compares LR with other per-layer scores.

# %% tags=["parameters"]
import os

FAST = os.environ.get("HELPERS_FAST", "0") == "1"
MODEL = "smollm2-135m"
CALIB = "gutenberg"
SEQLEN = 64 if FAST else 256
WINDOWS = 4 if FAST else 32  # calibration windows for the block scores
N = 4  # layers to remove in the first part
TRAIN_WINDOWS = 4 if FAST else 32  # replacement training windows (after the calibration ones)
VAL_WINDOWS = 2 if FAST else 8  # held-out windows for early stopping
MAX_STEPS = 10 if FAST else 300
KINDS = ("ffn",) if FAST else ("ffn", "swiglu", "layer")
RUN_COMPARISON = not FAST  # the full table builds seven models; `python -m helpers compare` does the same

# %%
import json

import pandas as pd
from IPython.display import Markdown, display

from helpers.analysis.block_scores import METHODS, cached_block_scores, chosen_layers
from helpers.compression.checkpoints import load_model
from helpers.compression.depth import parameter_count
from helpers.experiments.readings import read_depth_comparison
from helpers.infra.storage import FIGURES_DIR
from helpers.models.adapters import get_adapter
from helpers.ui import plots

model, tokenizer = load_model(MODEL)
layers = model.config.num_hidden_layers
print(f"{MODEL}: {layers} layers, {parameter_count(model) / 1e6:.1f}M parameters")

# %% [markdown]
# ## Cosine between $x_l$ and $x_{l+n}$ for every block
#
# `block_scores` keeps the residual states $x_0..x_L$ of *one batch*, adds that batch's token
# cosines for all $(l, n)$ pairs to running sums, and drops the batch, so memory does not grow
# with the corpus. Row $n$ of the heatmap is "how similar is what enters a block of $n$ layers to
# what leaves it"; bright cells are blocks that change little.

# %%
scores = cached_block_scores(MODEL, CALIB, SEQLEN, WINDOWS, model=model, tokenizer=tokenizer)
fig = plots.plot_block_heatmap(scores.by_length("cos_all"), title=f"{MODEL}: mean cos(x_l, x_(l+n)), all tokens")
_ = plots.save_figure(fig, FIGURES_DIR / "depth_block_cosine.png")

# %% [markdown]
# The same on the last token only, as angular distance (Gromov et al.; dark = similar). The last
# token has seen the whole window, so it is the state that matters for the next prediction.

# %%
fig = plots.plot_block_heatmap(scores.by_length("ang_last"), title="angular distance, last token")
_ = fig.axes[-1].set_ylabel("arccos(cos) / pi")

# %% [markdown]
# ## Which layers each method removes
#
# ShortGPT's scores are the first row of the heatmap (blocks of one layer), so its choice can be
# scattered; the other two take contiguous blocks.

# %%
bi = pd.DataFrame({"layer": range(layers), "bi": scores.bi()})
plots.plot_bi_ranking(bi)
chosen = chosen_layers(scores, N)
display(chosen)
fig = plots.plot_chosen_layers({m: scores.choose(m, N) for m in METHODS}, layers)
_ = plots.save_figure(fig, FIGURES_DIR / "depth_chosen_layers.png")

# %% [markdown]
# ## LLM-Streamline's replacement
#
# Removing block $l..l+n-1$ means layer $l+n$ receives $x_l$ where it expects $x_{l+n}$. The
# replacement learns the map $x_l \mapsto x_{l+n}$ with an MSE loss. The pairs are written to
# disk one batch per shard and streamed during training; a held-out set of windows drives early
# stopping. The baseline to beat is the identity map (just skipping the block). The feed-forward
# and SwiGLU blocks are residual with a zero-initialised output, so they start exactly at the
# identity; the decoder-layer variant starts as a copy of the block's first layer and runs with
# the model's causal mask and rotary embeddings.

# %%
from helpers.compression.replacement import train_replacement
from helpers.infra.textdata import load_split

_, train_ids, val_ids = load_split(tokenizer, CALIB, SEQLEN, WINDOWS, TRAIN_WINDOWS, VAL_WINDOWS)
start = scores.choose("streamline", N)[0]
modules, histories = {}, {}
for kind in KINDS:
    modules[kind], histories[kind] = train_replacement(
        model, train_ids, val_ids, start, N, kind=kind, max_steps=MAX_STEPS, eval_every=max(MAX_STEPS // 15, 1)
    )
    plots.save_figure(plots.plot_loss_curve(histories[kind]), FIGURES_DIR / f"depth_replacement_{kind}.png")
pd.DataFrame(
    [
        dict(
            kind=k,
            identity_mse=h["identity_mse"],
            val_mse=h["best_val_mse"],
            best_step=h["best_step"],
            params=parameter_count(modules[k]),
        )
        for k, h in histories.items()
    ]
)

# %% [markdown]
# ## A smaller model that still works
#
# `streamline` puts the trained module where the block was; `remove_layers` alone deletes the
# block. Either way the result is an ordinary Hugging Face model: fewer layers in the config,
# attention modules renumbered for the KV cache. It saves to a folder with a `pruning.json` and
# reloads through `load_model`.

# %%
import copy

from helpers.compression.checkpoints import save_pruned
from helpers.compression.replacement import replacement_info, streamline
from helpers.infra.storage import DATA_DIR

kind = KINDS[0]
pruned = streamline(copy.deepcopy(model), start, N, copy.deepcopy(modules[kind]))
folder = save_pruned(
    pruned,
    tokenizer,
    DATA_DIR / "pruned" / f"{MODEL}-streamline-{N}-{kind}",
    dict(
        method="streamline",
        removed=list(range(start, start + N)),
        replacement=replacement_info(modules[kind], kind, start),
    ),
)
reloaded, _ = load_model(str(folder))
prompt = tokenizer("It is a truth universally acknowledged", return_tensors="pt", add_special_tokens=False)
for name, m in (("dense", model), (f"pruned ({len(get_adapter(reloaded).layers(reloaded))} layers)", reloaded)):
    out = m.generate(**prompt, max_new_tokens=20, do_sample=False)
    print(f"{name}: {tokenizer.decode(out[0])!r}")

# %% [markdown]
# ## Everything at the same parameter count
#
# Constant slicing at SP 0.30 sets the budget; dynamic slicing uses the same mean slice with base
# slice `BASE_SLICE`; ShortGPT and LLM-Streamline remove as many layers as that many parameters; the
# hybrid (future work in the dynamic-slicing paper) removes half of those layers by Block Influence
# and slices the rest dynamically by LR. Stability is LLM-Streamline's agreement with the dense model,
# weighted by how sure the dense model is. `compare.grid` measures every method before and after
# recovery fine-tuning (lesson 07); here we read the rows before recovery. The cells are cached, so
# rerunning resumes; in fast mode this step is skipped (`python -m helpers compare` runs it). The
# committed table in `figures/depth_comparison.md` comes from `python -m helpers reproduce`.

# %%
import dataclasses

from helpers.evaluation.allocation_rules import BASE_SLICE
from helpers.experiments.cells import Lab, cell_result
from helpers.experiments.compare import DEPTH_TABLE, grid
from helpers.experiments.methods_report import comparison_table
from helpers.experiments.presets import SIZES
from helpers.experiments.results import CellCache
from helpers.infra.storage import write_table

# the gallery's settings (the reduced preset) at one SP
lesson = dataclasses.replace(SIZES["reduced"], model=MODEL, recover_sps=(0.3,))
if RUN_COMPARISON:
    lab = Lab(lesson)
    cells = grid(lab, {0.3: BASE_SLICE})
    table = comparison_table(cells, cell_result(lab, CellCache("sweep"), 0.0, None))
    write_table(table, DEPTH_TABLE)
    display(Markdown(table[table["recovery"] == "none"].to_markdown(index=False, floatfmt=".3f")))

# %% [markdown]
# ## The committed comparison, read
#
# `python -m helpers reproduce` writes the comparison into `figures/` with the settings in its
# manifest. The reading below is generated from that table, SP by SP, before and after recovery.

# %%
committed = FIGURES_DIR / "depth_comparison.csv"
if committed.exists():
    params = json.loads((FIGURES_DIR / "manifest.json").read_text())["files"]["depth_comparison.csv"]["params"]
    print(f"committed run: SPs {params.get('sps')}, recovery {params.get('recovery', {}).get('tokens')} tokens")
    display(Markdown(read_depth_comparison(pd.read_csv(committed))))

# %% [markdown]
# Why can deleting whole layers beat slicing at the same parameter count here? Lesson 01 showed that
# most of SmolLM2's layers barely turn the residual stream (normalised LR close to 1), so deleting a
# few of them costs little; slicing instead removes a share of the directions of *every* layer. And
# on a small model with a large vocabulary, slicing has to remove more width to reach the same
# parameter count, since the tied embedding table (a fifth of the model) is not sliced and the
# shortcut matrices add parameters back (lesson 03, section 4).
#
# ## Questionnaire
#
# 1. What do ShortGPT, angular distance and LLM-Streamline each measure, and on which tokens?
# 2. Why can ShortGPT's choice be scattered while the other two remove contiguous blocks?
# 3. Why is the identity map the baseline a replacement must beat?
# 4. How is "the same parameter count" enforced between slicing and depth pruning?
# 5. What does stability measure that accuracy does not?
#
# ## Exercises
#
# 1. **Where do they cross?** Sweep the number of removed layers $n$ from 1 to 8 and plot held-out
#    perplexity of ShortGPT against constant slicing at the same parameter count. Where do they cross?
#
# <details><summary>Solution</summary>
#
# For each $n$: `helpers.compression.depth.remove_layers` on a copy with `scores.choose("shortgpt", n)`, count its
# parameters, and find the slice fraction with the same count from the parameter formulas of
# `helpers.compression.allocation` (`param_summary` for a few fractions, then interpolate); slice at it and
# measure both with `perplexity_on_ids`. Plot both against the parameters removed.
#
# </details>
#
# 2. **Bootstrap the verdict.** For ShortGPT against dynamic slicing, resample the evaluation windows
#    with replacement (the same indices for both models) and give a 95% interval for the difference
#    in perplexity. Does it exclude 0?
#
# <details><summary>Solution</summary>
#
# Keep the per-window mean NLL of both models, draw window indices 2,000 times with a fixed seed,
# compute exp(mean NLL) of each model on the same draw, and take the 2.5 and 97.5 percentiles of
# the difference. Give it to `read_difference(..., interval=(low, high))`.
#
# </details>
#
# 3. **A second replacement.** Train the `swiglu` and `layer` replacements (set `KINDS`) and compare
#    their validation MSE with their parameter cost. Is the extra capacity worth it?
#
# <details><summary>Solution</summary>
#
# Rerun the replacement cell with `KINDS = ("ffn", "swiglu", "layer")`: the table gives
# `identity_mse`, `val_mse` and `params` per kind. Divide the MSE gained over the identity by the
# parameters spent, and remember that every parameter a replacement adds must be removed elsewhere
# to keep the same budget.
#
# </details>
