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
# # 07 · Recovery: do the methods still differ once each is healed?
#
# Every compressed model so far was measured straight after compression. The papers do not stop
# there: SliceGPT follows slicing with *recovery fine-tuning* (RFT), a short training run that
# lets the remaining weights make up for what was removed, and depth-pruning papers do the same
# (Shortened LLaMA with LoRA, LLM-Streamline with its trained replacement block). A comparison of
# methods that skips recovery compares models nobody would deploy.
#
# Recovery here is **LoRA**: every adapted linear layer $W$ ($n_\text{out} \times n_\text{in}$) gets a
# low-rank update,
#
# $$ W' = W + \frac{\alpha}{r} B A, \qquad A: r \times n_\text{in}, \quad B: n_\text{out} \times r, $$
#
# with $B = 0$ at the start (so training starts from the compressed model itself). Only $A$ and $B$
# train, on a text that shares nothing with the evaluation books, with one of two losses: the
# language-model loss (SliceGPT's: predict the text) or *distillation* (predict what the dense model
# predicts, KL divergence per token), which the gallery uses. At the end $BA$ is added into $W$
# ("merged"): the recovered model has the same layout and parameter count as before, so every size
# comparison of the earlier lessons still holds.
#
# **You will be able to**
#
# - write down the LoRA update, count its trainable parameters and say why merging keeps the size;
# - recover a sliced model and read its validation curve (and why the best step is restored);
# - explain what an *equal recovery budget* means when methods are compared, and why it is counted in tokens;
# - read the gallery's before/after figures: which method keeps the most at a given size, and at a given speed;
# - say what recovery can and cannot fix on a small model, using the paired verdicts.
#
# **Papers.** SliceGPT (Ashkboos et al., [arXiv:2401.15024](https://arxiv.org/abs/2401.15024)), section 4 (RFT);
# LoRA (Hu et al., [arXiv:2106.09685](https://arxiv.org/abs/2106.09685)); Shortened LLaMA (Kim et al.,
# [arXiv:2402.02834](https://arxiv.org/abs/2402.02834)); LLM-Streamline (Chen et al.,
# [arXiv:2403.19135](https://arxiv.org/abs/2403.19135)). Follows `06_allocation_rules`; the recipe and its
# defaults are in the book's method page (section 9).

# %% tags=["parameters"]
import os

FAST = os.environ.get("HELPERS_FAST", "0") == "1"
SIZE = "smoke" if FAST else "reduced"  # the reproduce preset whose windows, LR and recipe this lesson uses
SP = 0.3  # the slice fraction of the model we recover here
TOKENS = 512 if FAST else 8192  # recovery budget in training tokens (the gallery's, in reduced mode)

# %%
import dataclasses

import pandas as pd
from IPython.display import Image, Markdown, display

from helpers.compression.depth import parameter_count
from helpers.compression.recovery import add_adapters, recover, recovery_data
from helpers.experiments.cells import Lab
from helpers.experiments.presets import SIZES
from helpers.experiments.readings import read_depth_comparison
from helpers.infra.storage import FIGURES_DIR
from helpers.ui.comparison_plots import plot_recovery_curve

settings = dataclasses.replace(SIZES[SIZE], recovery_tokens=TOKENS)
lab = Lab(settings, progress=False)  # the dense model, its calibration windows and LR
recipe = settings.recovery()
print(f"{settings.model}: recovery recipe {recipe}")

# %% [markdown]
# ## 1. What LoRA adds, and what merging leaves
#
# `add_adapters` wraps the model with `peft`: each targeted linear layer gets $A$ and $B$ of rank
# $r$. Look at how few parameters train compared with the model, and at which layers are adapted
# (attention's four projections and the MLP's three, in every remaining layer).

# %%
sliced = lab.sliced(SP, SP)  # constant slicing at SP
before = parameter_count(sliced)
wrapped = add_adapters(sliced, recipe)
trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
print(f"sliced model: {before:,} parameters; rank-{recipe.rank} LoRA trains {trainable:,} ({trainable / before:.2%})")
merged = wrapped.merge_and_unload()
print(f"after merging the (still zero) updates: {parameter_count(merged):,} parameters")

# %% [markdown]
# ## 2. Recover, and read the validation curve
#
# `recovery_data` cuts the recovery text into windows, keeps its last windows for validation and
# refuses a text that shares any 32-token run with an evaluation book. `recover` trains with AdamW
# (warm-up, then linear decay), validates every few steps and restores the adapters of the best
# validation step before merging: with early stopping, a run that starts to overfit gives back its
# best point, not its last. With distillation the validation loss is the KL divergence from the dense
# model (0 would be the dense model itself). **Look for** how far it falls from step 0, and whether the
# curve has flattened by the end of the budget (if not, more tokens would help).

# %%
train_ids, val_ids = recovery_data(lab.tokenizer, recipe)
budget_windows = recipe.planned_steps * recipe.batch_size
model, report = recover(
    lab.sliced(SP, SP), lab.tokenizer, recipe, train_ids[:budget_windows], val_ids, teacher=lab.model
)
_ = plot_recovery_curve(report.history)
pd.Series(
    {
        "training tokens": report.tokens,
        "steps": report.steps,
        "loss": recipe.loss,
        "validation loss before": round(report.val_loss_before, 4),
        "validation loss after": round(report.val_loss_after, 4),
        "seconds": round(report.seconds, 1),
        "peak memory (MiB)": round(report.peak_memory_mb),
        "parameters after merging": parameter_count(model),
    }
)

# %% [markdown]
# ## 3. Every method, recovered at the same budget
#
# `python -m helpers reproduce` builds every method at the parameter count of constant slicing at
# SP 0.10, 0.20 and 0.30 (lesson 05's matching), measures it, recovers it with the same recipe, the
# same text and the same number of tokens, and measures it again on the same questions and windows.
# LLM-Streamline's own trained replacement gets that budget too. The committed figures:
#
# - **accuracy and perplexity against parameters removed**: dashed lines are before recovery, solid
#   after. Look for where the curves cross, and whether recovery changes their order.
# - **accuracy against measured speed-up**: each architecture has one speed (recovery does not change
#   it). Depth pruning removes whole layers, attention included, so it buys speed in generation,
#   where slicing (which keeps every layer and adds shortcut matrices) buys little.

# %%
for name in ("accuracy_vs_removed", "accuracy_vs_speed"):
    path = FIGURES_DIR / f"{name}.png"
    if path.exists():
        display(Image(filename=str(path)))
    else:
        print(f"{path.name} not written yet: run `python -m helpers reproduce`")

# %% [markdown]
# The readings below are generated from the committed table (`figures/depth_comparison.csv`): every
# verdict comes from a paired 95% interval on the same questions and windows.

# %%
committed = FIGURES_DIR / "depth_comparison.csv"
if committed.exists():
    table = pd.read_csv(committed)
    display(Markdown(read_depth_comparison(table)))
summary = FIGURES_DIR / "depth_summary.md"
if summary.exists():
    statements = [line for line in summary.read_text().splitlines() if line.startswith("- SP") or "Recovery (" in line]
    display(Markdown("\n".join(statements)))

# %% [markdown]
# ## What to take away
#
# Recovery is a budget, not a switch: the same recipe with more tokens (the `standard` preset spends
# four times as many) recovers more, and the perplexity of the recovery text falls long before the
# accuracy of unrelated tasks moves. A comparison of methods after recovery is only fair when each
# gets the same tokens, data and rank, which is why every table states its budget in tokens.
#
# ## Questionnaire
#
# 1. Why is $B$ initialised to zero, and what would go wrong with a random $B$?
# 2. How many trainable parameters does rank-8 LoRA add to a linear layer of shape 576 x 1536?
# 3. Why does merging the adapters keep the parameter count, and why does that matter for this lab?
# 4. Why must the recovery text share no window with the evaluation books? What would the overlap inflate?
# 5. What is restored at the end of `recover`, and why not simply the last step?
# 6. LLM-Streamline trains a replacement block instead of LoRA. What does "the same budget" mean for the two?
# 7. Why can depth pruning be faster than slicing at the same parameter count when generating one token at a time?
# 8. Why might distilling from the dense model recover held-out perplexity where the language-model loss on one
#    novel does not?
#
# ## Exercises
#
# 1. **Budget curve.** Recover the same sliced model at 2,048, 8,192 and 32,768 tokens and plot the
#    held-out perplexity and average accuracy against the budget. Where does each stop improving?
#
# <details><summary>Solution</summary>
#
# Loop over `dataclasses.replace(recipe, tokens=t)`, recover a fresh `lab.sliced(SP, SP)` each time,
# and measure it with `lab.measure(model)` (perplexity per window and answers per question). Plot
# `ppl_eval` and the mean of the tasks' accuracies against `t` on a log axis; pair each with the
# unrecovered model through `helpers.evaluation.stats.paired_average` to see which gains are resolved.
#
# </details>
#
# 2. **Which layers to adapt.** Recover with `targets=("q_proj", "v_proj")` only (the original LoRA
#    paper's choice) and with the MLP only, at the same tokens. Which recovers more per trainable parameter?
#
# <details><summary>Solution</summary>
#
# `dataclasses.replace(recipe, targets=("q_proj", "v_proj"))` and `targets=("gate_proj", "up_proj", "down_proj")`;
# the report's `trainable` gives the parameters trained. Divide the fall in validation loss by them.
#
# </details>
#
# 3. **Shortcuts.** A sliced layer carries two shortcut matrices that rotate the residual stream.
#    Set `shortcuts=True` and compare the recovered perplexity with the default.
#
# <details><summary>Solution</summary>
#
# `dataclasses.replace(recipe, shortcuts=True)` adds `attn_shortcut` and `mlp_shortcut` to the targets;
# compare `report.val_loss_after` for both runs on the same windows, and the held-out perplexity through
# `lab.measure`.
#
# </details>
