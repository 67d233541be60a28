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
# # 06 · Which score to slice by, and how to choose SB
#
# Dynamic slicing gives each layer a slice proportional to its Layer Redundancy (LR). The paper
# leaves two questions open. **First**: is LR the right score? Spectral analysis (how much PCA
# energy a layer's residual stream keeps), a layer's gradient sensitivity, or its measured
# perplexity damage could rank the layers differently. **Second**: the paper picks the base slice
# SB with the lowest perplexity on one calibration text; is that the rule that finds the SB best
# on data it never saw?
#
# This lesson puts every candidate behind one interface: *per-layer scores in, per-layer kept
# dimensions out, at exactly the parameter count of constant slicing*. Then rules differ only in
# where they spend the budget, and a paired comparison can say which spends it better.
#
# **You will be able to**
#
# - explain why rules must be compared at the same realised parameter count, and how the lab matches it;
# - compute six per-layer scores (LR, Block Influence, angular distance, PCA energy, gradient and
#   measured sensitivity) and read how alike they rank the layers;
# - explain how the spectral rule spends a budget greedily, and what it assumes about later layers;
# - separate "LR's shape helps" from "sparing layer 0 helps" with the `spare_ends` ablation;
# - judge an SB selection rule by how often it picks the SB that is best on unseen data.
#
# **Papers.** Dumitru et al. 2024 ([arXiv:2411.03513](https://arxiv.org/abs/2411.03513)), sections 3 and 6
# (the SP/SB formula, future work); SliceGPT (Ashkboos et al., [arXiv:2401.15024](https://arxiv.org/abs/2401.15024)),
# whose authors found per-layer spectral slicing unreliable; ShortGPT (Men et al.,
# [arXiv:2403.03853](https://arxiv.org/abs/2403.03853)) for Block Influence; Gromov et al.
# ([arXiv:2403.17887](https://arxiv.org/abs/2403.17887)) for angular distance; Molchanov et al.
# ([arXiv:1906.10771](https://arxiv.org/abs/1906.10771)) for first-order Taylor importance. Follows
# `05_depth_pruning_vs_slicing`; the next lesson, `07_recovery`, heals the compressed models.

# %% tags=["parameters"]
import os

FAST = os.environ.get("HELPERS_FAST", "0") == "1"
MODEL = "smollm2-135m"
CALIB = "pride-and-prejudice"
SEQLEN = 64 if FAST else 256
WINDOWS = 4 if FAST else 16  # calibration windows (PCA, LR, gradients)
HELD_OUT = 2 if FAST else 8  # windows after the calibration ones (measured sensitivity, perplexity)
SP = 0.3
MEASURE_RULES = not FAST  # slice one model per rule (about a minute each on a laptop CPU)

# %%
import pandas as pd
from IPython.display import Markdown, display

from helpers.compression import rules
from helpers.compression.allocation import ModelShape, budget, constant_dims, params, rounding_step
from helpers.compression.checkpoints import load_model
from helpers.evaluation.allocation_rules import RULES, RuleInputs, rule_dims, score_table
from helpers.experiments.readings import read_rules_table, read_sb_selection, read_score_agreement
from helpers.infra.storage import FIGURES_DIR
from helpers.infra.textdata import load_windows
from helpers.ui import plots

model, tokenizer = load_model(MODEL)
shape = ModelShape.from_config(model.config)
ids = load_windows(tokenizer, CALIB, SEQLEN, WINDOWS + HELD_OUT)
calib, held_out = ids[:WINDOWS], ids[WINDOWS:]
inputs = RuleInputs(MODEL, CALIB, SEQLEN, WINDOWS, HELD_OUT, loaded=(model, tokenizer))  # what every rule measures
inputs.known.update(calib=calib, held_out=held_out)
print(f"{MODEL}: {shape.n_layers} layers, d = {shape.hidden_size}; {WINDOWS} + {HELD_OUT} windows of {SEQLEN}")

# %% [markdown]
# ## 1. One budget for every rule
#
# Constant slicing at SP keeps $\lfloor (1-SP)\,d / 8 \rfloor \cdot 8$ dimensions in every layer
# (SliceGPT rounds down), so it removes a little *more* than SP asks. Its realised parameter count
# is the budget. A rule may not beat constant slicing by being bigger: each rule's kept dimensions
# are chosen so that its count lands within one rounding step (one layer moved by 8 dimensions)
# of the budget.

# %%
target = budget(shape, SP)
step = rounding_step(shape, constant_dims(shape, SP))
print(f"budget at SP {SP}: {target:,} parameters; one rounding step: {step:,}")

# %% [markdown]
# ## 2. Six per-layer scores
#
# All are oriented the same way, **higher = more redundant = slice more**:
#
# - `lr`: mean cosine between a layer's input and output (lesson 01);
# - `block_influence`: ShortGPT's $BI = 1 - LR$, negated. After the min-max normalisation of the
#   SP/SB formula it allocates exactly like LR: the lab keeps it to show that;
# - `angular`: one minus Gromov's angular distance $\arccos(\cos)/\pi$ on the last token of each window;
# - `spectral`: the share of a layer's PCA energy that constant slicing's $k$ directions keep;
# - `gradient`: minus the first-order Taylor estimate $\sum_t |g_t \cdot \Delta x_t|$ of the loss change
#   when layer $i$'s input loses its trailing $d-k$ principal directions;
# - `measured`: minus the perplexity increase when exactly that projection is applied (layer $i$
#   alone), on windows the PCA never saw.

# %%
spectra = inputs.spectra  # one rotation pass at full width: the spectral rule's input
scores = score_table(inputs, SP)  # one column per registered rule that has a score
plots.plot_rule_scores(scores, f"{MODEL}: per-layer scores at SP {SP}")
correlations = rules.rank_correlations(scores)
display(Markdown(correlations.to_markdown(index=False, floatfmt=".2f")))
display(Markdown(read_score_agreement(correlations)))

# %% [markdown]
# ## 3. From scores to kept dimensions
#
# Score rules go through the paper's formula $FS_i = SB + c\,n_i$ (with $n$ the min-max normalised
# score) at the SP whose count matches the budget, with SB = 0. `spare_ends` keeps the first and
# last layers whole and slices the others alike: the ablation that asks whether LR's gain is only
# "do not slice layer 0". `spectral` starts at full width and removes 8 directions at a time where
# they cost the least PCA energy per parameter saved. The spectra come from one rotation pass that
# keeps every dimension; once earlier layers are sliced the later spectra change, and the greedy
# ignores that (a first-order choice, stated rather than hidden).
#
# Every rule is registered in `helpers/evaluation/allocation_rules.py` (`RULES`), so `python -m
# helpers slice --rule angular --sp 0.3`, the sliders' rule selector and the rules report offer it;
# a new rule is one decorated function there plus its test.

# %%
allocations = {rule: rule_dims(rule, inputs, SP) for rule in RULES}  # every registered rule
summary = pd.DataFrame(
    {
        "rule": list(allocations),
        "params": [params(shape, dims) for dims in allocations.values()],
        "gap_to_budget": [params(shape, dims) - target for dims in allocations.values()],
        "pca_energy_kept": [rules.kept_energy(spectra, dims) for dims in allocations.values()],
        "min_dim": [int(dims.min()) for dims in allocations.values()],
        "max_dim": [int(dims.max()) for dims in allocations.values()],
    }
)
display(Markdown(summary.to_markdown(index=False)))
ax = pd.DataFrame(allocations).plot(marker="o", ms=3, xlabel="layer", ylabel="kept dimension", title="Kept dimensions")

# %% [markdown]
# By construction the spectral rule keeps the most PCA energy at the budget. Whether energy is
# what matters is an empirical question: perplexity and accuracy answer it, not the energy column.
#
# ## 4. Which rule spends the budget best?
#
# Outside fast mode, slice one model per rule and measure held-out perplexity on the windows after
# the calibration ones (rules that allocate alike are measured once).

# %%
if MEASURE_RULES:
    import copy

    from helpers.compression.slicing import rotate_and_slice
    from helpers.evaluation.perplexity import perplexity_on_ids

    measured = {}
    for dims in allocations.values():
        key = tuple(int(d) for d in dims)
        if key not in measured:
            sliced = copy.deepcopy(model)
            rotate_and_slice(sliced, calib, list(key), progress=False)
            measured[key] = perplexity_on_ids(sliced, held_out, progress=False).perplexity
    summary["perplexity"] = [measured[tuple(int(d) for d in dims)] for dims in allocations.values()]
    display(Markdown(summary[["rule", "params", "perplexity"]].to_markdown(index=False, floatfmt=".2f")))

# %% [markdown]
# One perplexity per rule has no interval. `python -m helpers rules` (or `reproduce --rules`)
# measures each rule on three held-out books and the zero-shot tasks and compares every rule with
# constant slicing and with LR by a paired bootstrap. The reading below is generated from that table
# when it has been written into `figures/`; after it, the same table on a second architecture,
# Gemma-3-270m, once `python -m helpers reproduce --model gemma3-270m --rules --no-depth --out
# figures/gemma3-270m` has written its gallery. Gemma normalises each branch's output before the
# residual add, so a sliced Gemma carries two extra maps per layer (lesson 03) and its budget buys
# less. Look at whether the rules come in the same order on both models, and which verdicts change.

# %%
for folder in (FIGURES_DIR, FIGURES_DIR / "gemma3-270m"):
    committed = folder / "allocation_rules.csv"
    if not committed.exists():
        print(f"{committed} not written yet: run `python -m helpers reproduce --rules` (command above for Gemma)")
        continue
    table = pd.read_csv(committed)
    display(Markdown(f"**{committed.relative_to(FIGURES_DIR.parent)}**"))
    display(Markdown(table[["rule", "sp", "params", "perplexity", "ppl_low", "ppl_high", "average"]].to_markdown()))
    display(Markdown(read_rules_table(table)))

# %% [markdown]
# ## 5. Choosing SB on data the choice never sees
#
# The SB sweep (lesson 04) measures every candidate SB on a selection book, three held-out books
# and the zero-shot questions. A selection rule sees part of those data and picks an SB; it is then
# judged on the rest. One trial holds out one book and a random half of every task's questions:
#
# - `select_book` (the paper's rule): lowest perplexity on the selection book;
# - `question_half`: fewest errors on the other half of the questions;
# - `books_agree`: best mean rank over the selection book and the two other held-out books.
#
# A rule is good when it often picks the SB that is best on the held-out data, and loses little
# (regret) when it does not; cost is what it has to score for each candidate.

# %%
committed = FIGURES_DIR / "sb_selection.csv"
if committed.exists():
    selection = pd.read_csv(committed)
    display(Markdown(selection.to_markdown(index=False, floatfmt=".3f")))
    display(Markdown(read_sb_selection(selection)))
else:
    print("figures/sb_selection.csv not written yet: run `python -m helpers reproduce --rules`")

# %% [markdown]
# ## Questionnaire
#
# 1. Why would a rule that keeps a few more parameters than constant slicing win unfairly, and how
#    does the lab stop it?
# 2. Why does Block Influence allocate exactly like LR through the SP/SB formula?
# 3. What does the `spare_ends` rule isolate, and what would it mean if it matched LR?
# 4. What does the spectral rule assume about layers after the one it is deciding for?
# 5. The gradient and measured scores perturb the same thing; what is the difference between them?
# 6. Why must an SB selection rule be judged on data it never used?
#
# ## Exercises
#
# 1. **Spectral at a second SP.** Set `SP = 0.4`, rerun sections 1-3, and compare the PCA energy
#    kept by the spectral rule and by LR. Does the gap grow with SP?
#
# <details><summary>Solution</summary>
#
# Rerun the cells from the parameters cell down with `SP = 0.4`; read the `pca_energy_kept`
# column of the summary at both SPs. The energy any rule can keep falls as SP grows; the gap between
# spectral and LR is the part of the budget LR spends on directions with little variance.
#
# </details>
#
# 2. **More candidates.** At `reduced` sizes the SB grid has a step of 0.2, so each SP offers
#    only two candidates below SP. Run
#    `python -m helpers rules --sb-only --sb-step 0.05 --sps 0.3 0.4 --out data/runs/sb_fine` and read
#    `data/runs/sb_fine/sb_selection_summary.md`. Does the paper's rule still find the best SB as often?
#    With six to eight candidates a rule can miss by a little or by a lot: compare the regret columns
#    with the two-candidate table above (docs/findings.md quotes both runs).
#
# 3. **Fisher instead of Taylor.** Replace the absolute first-order term by the Fisher estimate
#    $\tfrac12 \sum_t (g_t \cdot \Delta x_t)^2$ and compare its layer ranking with the gradient
#    score by Spearman correlation.
#
# <details><summary>Solution</summary>
#
# Copy `sensitivity.gradient_sensitivity`, changing the line that adds
# `(x.grad * dx).sum(-1).abs().sum()` to `0.5 * ((x.grad * dx).sum(-1) ** 2).sum()`; put both
# vectors in a DataFrame and call `rules.rank_correlations` on it.
#
# </details>
#
# 4. **A fourth SB selection rule.** Add "lowest perplexity on the calibration windows themselves"
#    to the comparison. Predict first: better or worse than the selection book?
#
# <details><summary>Solution</summary>
#
# The calibration windows are the ones the PCA was fitted on, so every SB looks better there than
# on new text, and by different amounts. Measure `perplexity_on_ids(sliced, calib)` for each
# candidate in the sweep, add the column to the cells, and add a pick to
# `sb_selection.selection_trials`; the trial table then tells how often it finds the held-out best.
#
# </details>
