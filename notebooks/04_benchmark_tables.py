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
# # 04 · Benchmark tables and the paper's figures
#
# The dynamic-slicing paper compares constant slicing (SliceGPT: every layer keeps the same
# dimension) with dynamic slicing (each layer keeps a dimension set by its Layer Redundancy) at
# the same mean slice SP, sweeping the base slice SB from SP (constant) down to 0 (fully
# dynamic). This notebook renders that comparison: zero-shot accuracy against SB (the paper's
# Figures 2-4), perplexity, and a table of method x SP.
#
# Every number comes from `helpers.experiments.reproduce`, which caches one result per (SP, SB) cell under
# `data/cache/sweep/`: after `python -m helpers reproduce` has run, this notebook only reads.
# Change SP, tasks or the question limit below and it computes the missing cells (slicing
# SmolLM2-135M plus evaluation takes a minute or two per cell on a laptop CPU).
#
# **You will be able to**
#
# - explain how a language model answers a multiple-choice question with no training (zero-shot
#   scoring), and the difference between acc and acc_norm;
# - read the paper-style table: which differences are larger than one question's worth of noise;
# - place this small model's numbers next to the papers' own;
# - say what a timing on a shared CPU does and does not show.
#
# **Papers.** Dumitru et al. 2024 ([arXiv:2411.03513](https://arxiv.org/abs/2411.03513)), section 4
# (experiments, Figures 2-5); SliceGPT (Ashkboos et al., [arXiv:2401.15024](https://arxiv.org/abs/2401.15024))
# for the evaluation protocol. Follows `03_pca_slicing`; the next lesson,
# `05_depth_pruning_vs_slicing`, compares slicing with deleting whole layers.
#
# ## How a model answers without training: zero-shot scoring
#
# Each question has a context and a few candidate continuations (PIQA: two solutions to a goal;
# HellaSwag: four endings; ARC: three to five answers; WinoGrande: two fillers of a blank). The
# model scores each option by the sum of the log-probabilities of its continuation tokens given the
# context, and its answer is the option with the highest score: **acc** counts how often that is
# right. Longer options collect more negative log-probabilities, so the sum favours short answers;
# **acc_norm** divides each option's score by its length in characters first. SliceGPT (and so this
# lab) reports acc_norm for PIQA, HellaSwag and ARC, and acc for WinoGrande, where the model
# scores the shared sentence ending after each of the two filled-in beginnings
# (lm-evaluation-harness's convention).
#
# **The papers' own numbers, for scale.** The dynamic-slicing paper works with Llama3-8B and
# Mistral-7B and reports improvements of up to 5% in accuracy over constant slicing (SliceGPT) and
# perplexity lower by up to 7% (its abstract). SliceGPT reports WikiText-2 perplexity on Llama-2 7B
# of 5.47 dense against 6.64, 7.24 and 8.12 at 20%, 25% and 30% slicing. Models with a hundred
# times more parameters have far more redundant width; expect larger losses on a 135M model, and
# accuracies on 40 questions per task that move by 2.5 points per question.

# %% tags=["parameters"]
import os

FAST = os.environ.get("HELPERS_FAST", "0") == "1"
SIZE = "smoke" if FAST else "reduced"  # see helpers.experiments.presets.SIZES
MODEL = "smollm2-135m"
SPS = None  # e.g. (0.30, 0.35, 0.40); None keeps the size's own
TASKS = None  # e.g. ("piqa", "arc_easy"); None keeps the size's own
LIMIT = None  # questions per task; None keeps the size's own

# %%
import dataclasses

from IPython.display import Markdown, display

from helpers.experiments.cells import Lab, best_dynamic, sweep
from helpers.experiments.presets import SIZES
from helpers.experiments.readings import read_results_table
from helpers.experiments.reports import comparisons_table, reading_intervals, results_table
from helpers.infra.storage import FIGURES_DIR
from helpers.ui import plots

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
# The reading of this table, generated from its numbers (`helpers.experiments.readings`) and their paired 95%
# intervals (dynamic against constant on the same questions and windows; a compressed row against the
# dense model on the same questions). Each question is worth 1/limit of a task's accuracy, so a gap of
# one or two questions is "not resolved" unless the interval says otherwise.

# %%
display(Markdown(read_results_table(table, tasks, settings.limit, **reading_intervals(cells, settings.tasks))))

# %% [markdown]
# ## Figure 1: how LR becomes a slice per layer
#
# At the first SP, with the SB the sweep picked.

# %%
best = best_dynamic(cells).set_index("sp")
sp0 = settings.figure_sps[0]
sb0 = float(best.loc[sp0, "sb"])
fig = plots.plot_allocation(lab.allocation(sp0, sb0), title=f"SP = {sp0}, SB = {sb0}")
# %% [markdown]
# ## Accuracy against SB: the paper's Figures 2-4 (SP 0.30 to 0.40), and SP 0.10 and 0.20
#
# The red line is constant slicing (SB = SP) with its standard-error band; the dashed line is the
# dense model; error bars are one standard error. Every dynamic point is sliced at the parameter
# count of constant slicing, and every figure shares its y-limits with the others.

# %%
limits = plots.accuracy_limits(cells, tasks)
dense = cells[cells["method"] == "dense"].iloc[0]
for sp in settings.sps:
    plots.plot_accuracy_vs_sb(cells[cells["sp"] == sp], tasks, sp, dense, limits)

# %% [markdown]
# ## Dynamic vs constant, paired
#
# Both models answer the same questions and see the same windows, so their difference has a much
# narrower interval than their two separate intervals suggest (paired bootstrap, fixed seed). The
# verdict is read from the 95% interval; McNemar's exact test is the closed-form check, with a Holm
# correction for the number of comparisons in the table.

# %%
comparisons_table(cells, settings.tasks).round(4)

# %% [markdown]
# ## Perplexity: dense, constant, dynamic

# %%
plots.plot_perplexity_comparison(cells, best.reset_index())
# %% [markdown]
# ## Speed, memory and depth pruning
#
# These tables are written by `python -m helpers reproduce` (each model runs in its own worker
# process, repeats interleaved between models, median and interquartile range, ratios to dense,
# and under the speed table one generated reading per sliced model and workload;
# `scripts/bench_speed.py` runs the same benchmark at full size; depth pruning is notebook 05).

# %%
for name in ("speed_table", "depth_comparison"):
    path = FIGURES_DIR / f"{name}.md"
    display(
        Markdown(
            path.read_text() if path.exists() else f"*{path.name} not written yet: run `python -m helpers reproduce`*"
        )
    )

# %% [markdown]
# ## What slicing can buy: count before you time
#
# A sliced layer multiplies narrower matrices, but it keeps every attention head, the MLP's inner
# width and the V x d head, and it adds two shortcut matrices. `flop_table` counts the FLOPs of a
# 1 x 512 prefill and of one token's forward (the products a decoding step runs per sequence), and
# divides dense's count by each model's: the speed-up you would see if every FLOP ran at the same rate
# (docs/method.md section 7). It is a ceiling, not a prediction. Look for how far below 1 / (1 - SP)
# the ceilings sit, which of the two is lower, and how close the measured ratios above come to them.

# %%
from helpers.evaluation.speed import flop_table

flop_models = {"dense": lab.model, f"constant SP={sp0}": lab.sliced(sp0, sp0)}
flop_models[f"dynamic SP={sp0} SB={sb0}"] = lab.sliced(sp0, sb0)
flop_table(flop_models, 512).round(3)

# %% [markdown]
# ## Counted FLOPs against the rate they run at
#
# A ceiling assumes every FLOP runs at the same rate. `product_rates` checks that assumption on
# the part slicing shrinks: it times each model's decoder-layer products alone (its own weights,
# random inputs, interleaved rounds after a warm-up) and `product_summary` sets their time ratio
# beside their FLOP ratio. Look for the time ratio falling short of the FLOP ratio: narrower
# matrices often run fewer FLOPs per second, and a prefill gains less than its products do. (At
# full size on the CPU that docs/speed.md names, float32 products of the 30%-sliced layers
# ran 5-13% slower per FLOP than dense's, and the float32 prefill reached 1.25x in only one run of
# seven; at SP 0.35 and 0.40, whose products are 368 and 344 wide, they ran within 1-4% of dense's
# rate and the prefill passed 1.25x.) In generation the V x d head, which slicing leaves whole, is the largest single
# product; slicing it too (`final_dim`, docs/method.md section 3) is what carries batch-16
# generation past the ceiling above.

# %%
from helpers.evaluation.speed import product_markdown, product_rates, product_summary

rows = 64 if FAST else 512  # as many rows as a prefill's tokens
display(Markdown(product_markdown(product_summary(product_rates(flop_models, rows, repeats=3 if FAST else 7)))))

# %% [markdown]
# ## Questionnaire
#
# 1. How does a causal language model choose among the options of a multiple-choice question?
# 2. What does acc_norm correct, and why is WinoGrande scored with acc?
# 3. On 40 questions, how many points of accuracy is one question worth?
# 4. How is the dynamic row of each SP chosen, and why does that rule never look at the tasks?
# 5. Why can a smaller model be slower, and what would you need to trust a 10% speed difference?
# 6. Slicing keeps 70% of the residual dimensions at SP = 0.3. Why is the FLOP ceiling of prefill
#    well below 1 / 0.7, and why is the one for generation lower still?
# 7. The layer products of a sliced model do 1.27x fewer FLOPs than dense's yet may run only 1.2x
#    faster. What does that say about the FLOP ceiling, and which of the two would you quote?
# 8. On one CPU the products of 400-wide layers (SP 0.30) ran 5-13% slower per FLOP than dense's,
#    while 368- and 344-wide ones (SP 0.35 and 0.40) ran within 1-4%. Before choosing an SP for the
#    speed it gives, what would you measure, on which machine, and what would you weigh it against?
#
# ## Exercises
#
# 1. **Bootstrap the differences.** For the constant and the dynamic model at SP = 0.3, compute a 95%
#    interval for the difference in average accuracy by resampling questions.
#
# <details><summary>Solution</summary>
#
# The per-question correctness of both models is needed (the sweep cells keep only the summaries, so
# rerun `helpers.evaluation.zeroshot.evaluate` on the two models). Draw question indices with replacement
# (2,000 times, fixed seed), apply the *same* indices to both models, and take the 2.5 and 97.5
# percentiles of the mean difference. Pass the interval to `read_difference(..., interval=(low, high))`:
# expect it to include 0 unless the gap is several questions wide.
#
# </details>
#
# 2. **acc against acc_norm.** Recompute PIQA and ARC-Easy with acc instead of acc_norm for the dense
#    model. Which metric moves more, and why?
#
# <details><summary>Solution</summary>
#
# `helpers.evaluation.zeroshot.evaluate` returns both metrics per task; compare them. Expect the tasks whose
# options differ most in length to move most, because the unnormalised sum penalises long options;
# check whether that is what you see.
#
# </details>
#
# 3. **A fair timing.** Time the dense and the SP = 0.3 dynamic model in one script, interleaving five
#    repeats of each, and report the median ratio with its spread.
#
# <details><summary>Solution</summary>
#
# Load both models once; alternate `helpers.evaluation.speed.generation_speed` calls dense, sliced, dense, ...;
# divide each sliced timing by the dense timing next to it and report the median and range of the
# ratios. Interleaving cancels the slow drifts of a shared machine that a single timing per model
# (as in the table above) cannot.
#
# </details>
