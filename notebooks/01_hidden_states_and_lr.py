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
# # 01 · Hidden states and Layer Redundancy
#
# A decoder-only transformer is a stack of layers that each *add* something to a residual
# stream: layer $i$ reads $x_i$ and writes $x_{i+1} = x_i + \text{attn}(x_i) + \text{mlp}(\cdot)$.
# When a layer barely changes the direction of that stream, it is *redundant*. The dynamic
# slicing paper measures this with the **Layer Redundancy** score
#
# $$LR_i = \operatorname{mean}_t \cos(x_i[t],\, x_{i+1}[t])$$
#
# over every token $t$ of some calibration text. ShortGPT's Block Influence is $BI_i = 1 - LR_i$.
# In this notebook we look at the hidden states themselves, then compute LR by streaming
# text through forward hooks, and ask whether the curve belongs to the model or to the text.
#
# **You will be able to**
#
# - capture the residual stream of every layer with forward hooks, and say why the last layer must
#   be hooked rather than read from `output_hidden_states`;
# - compute Layer Redundancy and its min-max normalisation, streaming text in constant memory;
# - read an LR curve: which layers rewrite the stream, which barely touch it, and how flat the
#   profile is;
# - test whether the curve is a property of the model or of the calibration text.
#
# **Papers.** Dumitru et al., *Change Is the Only Constant: Dynamic LLM Slicing based on Layer
# Redundancy*, Findings of EMNLP 2024 ([arXiv:2411.03513](https://arxiv.org/abs/2411.03513)), section 3
# (the LR score); Men et al., *ShortGPT* ([arXiv:2403.03853](https://arxiv.org/abs/2403.03853)) for
# Block Influence. This is the first lesson; the next one, `02_slice_allocation_sliders`, turns the
# scores into a slice per layer.

# %% tags=["parameters"]
import os

FAST = os.environ.get("HELPERS_FAST", "0") == "1"
MODEL = "smollm2-135m"
TEXT = "gutenberg"  # all four Gutenberg novels; or a book name, or a path to a .txt file
SEQLEN = 64 if FAST else 256
WINDOWS = 4 if FAST else 32
BOOKS = ("pride-and-prejudice", "war-of-the-worlds")

# %%
from IPython.display import Markdown, display

from helpers.analysis.capture import collect_hidden_states
from helpers.analysis.redundancy import cached_layer_redundancy, state_norms, token_cosine_map
from helpers.compression.checkpoints import load_model
from helpers.experiments.readings import read_agreement, read_lr_profile
from helpers.infra.textdata import load_windows
from helpers.ui import plots

model, tokenizer = load_model(MODEL)
print(
    f"{MODEL}: {model.config.num_hidden_layers} layers, hidden size {model.config.hidden_size}, "
    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, on {model.device}"
)

# %% [markdown]
# ## What a hidden state is
#
# `collect_hidden_states` hooks every decoder layer and returns the raw residual stream
# $x_0$ (the embeddings) through $x_L$ (the last layer's output *before* the final norm; the
# `output_hidden_states[-1]` of Hugging Face has that norm applied, which would distort the last
# LR value). Each state has shape (batch, tokens, hidden size).

# %%
window = load_windows(tokenizer, BOOKS[0], SEQLEN, 1)
states = collect_hidden_states(model, window)
print(f"{len(states)} states of shape {tuple(states[0].shape)}")
print(repr(tokenizer.decode(window[0][:40])) + " ...")

# %% [markdown]
# Token norms grow through the stack, and a few middle layers carry huge activations
# (norms in the thousands): something to keep in mind when a method works in float32.

# %%
plots.plot_state_norms(state_norms(states))
# %% [markdown]
# ## Token cosines for one window
#
# Each cell is $\cos(x_i[t], x_{i+1}[t])$ for layer $i$ (rows) and token $t$ (columns). The first
# layer rewrites the embeddings almost completely (cosine near 0); most middle layers leave the
# direction nearly unchanged. LR is the mean of such rows over many windows.

# %%
plots.plot_heatmap(
    token_cosine_map(states),
    "cos(layer input, layer output) per token",
    "token",
    "layer",
    cbar_label="cosine",
    vmin=0,
    vmax=1,
)
# %% [markdown]
# ## Layer Redundancy on Gutenberg text
#
# `cached_layer_redundancy` streams the windows through the model in batches; hooks add each
# layer's token cosines to running sums, so memory does not grow with the amount of text. The
# table is cached under `data/cache/lr/`, keyed by model, text, window length and count.

# %%
lr = cached_layer_redundancy(MODEL, TEXT, SEQLEN, WINDOWS, loaded=(model, tokenizer))
lr.round(4).head(8)

# %% [markdown]
# The paper's Figure 1 (left panel): the LR score and its min-max normalisation
# $n_i = (LR_i - \min LR) / (\max LR - \min LR)$. Layer 0 has the lowest LR and so anchors
# the normalisation.

# %%
plots.plot_lr_curve(lr, title=f"{MODEL} on {TEXT} ({WINDOWS} x {SEQLEN} tokens)")

# %% [markdown]
# *Predict before you run the next cell:* if most layers have LR above 0.9, where does min-max
# normalisation put them? The reading below is computed from the table above, not written by hand.

# %%
display(Markdown(read_lr_profile(lr["lr_norm"])))

# %% [markdown]
# ShortGPT removes the layers with the smallest Block Influence first. Ranked:

# %%
plots.plot_bi_ranking(lr)
print("least influential layers:", lr.sort_values("bi")["layer"].head(6).tolist())

# %% [markdown]
# ## Property of the model or of the text?
#
# Compute LR on two different novels. If the curves coincide, the redundancy profile is mostly a
# property of the model, and a small calibration set suffices.

# %%
by_book = {book: cached_layer_redundancy(MODEL, book, SEQLEN, WINDOWS, loaded=(model, tokenizer)) for book in BOOKS}
plots.plot_lr_comparison(by_book)
a, b = (t["lr"] for t in by_book.values())
display(Markdown(read_agreement(float(abs(a - b).max()), float(a.max() - a.min()), float(a.rank().corr(b.rank())))))

# %% [markdown]
# What the next notebook uses is the *normalised* score $n_i$ itself, not only the order of the
# layers: each layer's slice is proportional to $n_i / \bar n$. So the allocation is unchanged by any
# $a \cdot LR + b$ with $a > 0$ (min-max normalisation removes both), but not by other monotone
# changes: squaring LR keeps the ranking and still moves every slice. Short runs (`FAST`) use few
# tokens and show more noise than the full setting.
#
# ## Questionnaire
#
# 1. Why is the last layer's output captured by a hook instead of read from `output_hidden_states[-1]`?
# 2. What is the cost of the row-wise cosine per window, and of the `X_in @ X_out.T` diagonal it replaces?
# 3. Which layer has the lowest LR here, and what does that say about what it does to the embeddings?
# 4. How is Block Influence related to LR, and which layers would ShortGPT remove first?
# 5. Which transformations of LR leave the normalised score unchanged?
# 6. What would make you trust an LR curve computed on only four short windows?
#
# ## Exercises
#
# 1. **Model or text?** Shuffle the tokens of every window (keep the same tokens, destroy the order)
#    and compute LR again. Does the curve survive?
#
# <details><summary>Solution</summary>
#
# Take `ids = load_windows(tokenizer, TEXT, SEQLEN, WINDOWS)`, permute each row with
# `ids[i, torch.randperm(SEQLEN)]`, and pass the windows to `helpers.analysis.redundancy.layer_redundancy`.
# Read it with `read_agreement` as above. Layers whose LR survives the shuffle owe their redundancy
# to the model (a per-token computation); layers whose LR moves owed it to word order, which is
# a property of text. Expect the first layer, which rewrites each token's embedding, to stay low.
#
# </details>
#
# 2. **Invariance.** Show that $n_i$ does not change when LR is replaced by $a\,LR + b$ with $a > 0$,
#    and find a monotone transformation that changes it.
#
# <details><summary>Solution</summary>
#
# $(a LR_i + b - \min(a LR + b)) / (\max(a LR + b) - \min(a LR + b)) = a(LR_i - \min LR) / (a(\max LR -
# \min LR)) = n_i$. With $LR^2$ the order is kept but the gaps change:
# `lr["lr"] ** 2` gives different normalised values wherever LR is not evenly spaced, and so
# different slices.
#
# </details>
#
# 3. **How much text?** Compute LR with 2, 4, 8 and 16 windows and plot the largest difference from
#    the 16-window curve against the number of windows.
#
# <details><summary>Solution</summary>
#
# Loop over the counts with `cached_layer_redundancy(MODEL, TEXT, SEQLEN, n, loaded=(model, tokenizer))`
# and take `abs(table["lr"] - reference["lr"]).max()`. If windows were independent, the difference
# would shrink like $1/\sqrt{n}$; check whether it does, and from how many windows the ranking of
# the layers (rank correlation with the reference) stops changing.
#
# </details>
