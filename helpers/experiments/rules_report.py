"""The allocation-rules step of the reproduce command: `python -m helpers rules` or `reproduce --rules`.

For every SP: the per-layer scores of every rule (cached), each rule's kept dimensions at constant
slicing's parameter count, one measured cell per distinct allocation (cached by its dimensions, so a
rule that allocates exactly like constant or LR reuses that sweep cell), and a table with held-out
perplexity and average accuracy, their intervals, and paired verdicts against constant and LR.
Then the SB selection rules on the sweep cells (`helpers.experiments.sb_selection`).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.compression import rules
from helpers.compression.allocation import ModelShape
from helpers.compression.slicing import rotate_and_slice
from helpers.evaluation import allocation_rules, sensitivity, stats
from helpers.evaluation.allocation_rules import RuleInputs
from helpers.experiments import sb_selection
from helpers.experiments.cells import Lab, cell_params, cell_result, flatten, sweep
from helpers.experiments.presets import Settings
from helpers.experiments.readings import read_rules_table, read_sb_selection
from helpers.experiments.reports import write_table
from helpers.experiments.results import CellCache, Manifest
from helpers.infra.integrity import code_fingerprint
from helpers.infra.progress import progress_bar
from helpers.infra.storage import markdown_table, write_text_atomic
from helpers.models.loading import model_label
from helpers.ui import plots


def _params(settings: Settings, **coordinates) -> dict:
    """Cache key of scores and spectra: the sweep settings plus the code of the rules and their measurements."""
    return cell_params(settings, scores_code=code_fingerprint(sensitivity, allocation_rules), **coordinates)


def rule_inputs(lab: Lab, cache: CellCache) -> RuleInputs:
    """The rules' inputs on the lab's model and windows (held out: the selection windows), spectra cached."""
    s = lab.settings
    inputs = RuleInputs(
        s.model, s.calib_text, s.seqlen, s.calib_windows, s.select_windows, s.seed, (lab.model, lab.tokenizer)
    )
    inputs.known.update(shape=ModelShape.from_config(lab.model.config), lr=lab.lr["lr"].to_numpy())
    inputs.known.update(dense=(lab.model, lab.tokenizer), calib=lab.calib, held_out=lab.select)
    entry = cache.get_or_compute(_params(s, kind="spectra"), lambda: {k: v.tolist() for k, v in inputs.spectra.items()})
    inputs.known["spectra"] = {k: np.asarray(v) for k, v in entry.items()}
    return inputs


def layer_scores(lab: Lab, inputs: RuleInputs, sp: float, cache: CellCache) -> pd.DataFrame:
    """Per layer, every scored rule's score at `sp` (`allocation_rules.score_table`), cached per SP."""

    def compute() -> dict:
        return {k: [float(x) for x in v] for k, v in allocation_rules.score_table(inputs, sp).items()}

    cached = cache.get_or_compute(_params(lab.settings, kind="scores", sp=sp), compute)
    for name, values in cached.items():  # later rules read the cached scores instead of measuring again
        inputs.known[("score", name, sp)] = np.asarray(values, dtype=np.float64)
    return pd.DataFrame(cached)[allocation_rules.score_names()]  # the cache stores keys sorted


def rule_cell(lab: Lab, dims: np.ndarray, sp: float, cache: CellCache) -> dict:
    """Measurements of the model sliced to `dims`: the sweep's cell when constant or LR allocate alike."""
    for sb in (sp, allocation_rules.BASE_SLICE):  # constant, then LR at the base slice: cells the sweep already has
        if np.array_equal(dims, lab.allocation(sp, sb).kept_dim):
            return cell_result(lab, CellCache("sweep"), sp, sb)

    def compute() -> dict:
        model = copy.deepcopy(lab.model)
        rotate_and_slice(model, lab.calib, [int(d) for d in dims], progress=False)
        return lab.measure(model)

    return cache.get_or_compute(cell_params(lab.settings, kind="dims", dims=[int(d) for d in dims]), compute)


def rules_cells(lab: Lab, sps: tuple[float, ...], cache: CellCache | None = None) -> tuple[pd.DataFrame, dict]:
    """One flat row per (rule, SP) with its dims and measurements; and the score tables by SP."""
    cache = cache or CellCache("rules")
    inputs = rule_inputs(lab, cache)
    rows, scores = [], {}
    for sp in sps:
        if lab.progress:
            print(f"allocation rules at SP {sp:g}: per-layer scores (gradient and measured sensitivity take longest)")
        scores[sp] = layer_scores(lab, inputs, sp, cache)
        for rule in progress_bar(
            allocation_rules.RULES, desc=f"rules at SP {sp:g}", unit="rule", disable=not lab.progress
        ):
            dims = allocation_rules.rule_dims(rule, inputs, sp)
            row = {"rule": rule, "sp": sp, "dims": " ".join(str(int(d)) for d in dims)}
            row["energy"] = rules.kept_energy(inputs.spectra, dims)
            rows.append({**row, **rule_cell(lab, dims, sp, cache)})
    return flatten(rows, lab.settings.tasks), scores


def _verdicts(row, base, tasks: tuple[str, ...], name: str) -> dict:
    """Paired perplexity and average-accuracy comparisons of `row` against `base` (columns suffixed by name)."""
    a, b = row["raw"], base["raw"]
    ppl = stats.paired_perplexity(a["eval_window_nll"], b["eval_window_nll"], a["eval_window_tokens"])
    acc = stats.paired_average([a["tasks"][t]["correct"] for t in tasks], [b["tasks"][t]["correct"] for t in tasks])
    out = {}
    for metric, cmp in (("ppl", ppl), ("acc", acc)):
        out.update(
            {
                f"{metric}_diff_vs_{name}": cmp.diff,
                f"{metric}_low_vs_{name}": cmp.low,
                f"{metric}_high_vs_{name}": cmp.high,
                f"{metric}_verdict_vs_{name}": cmp.verdict,
            }
        )
    return out


def rules_table(cells: pd.DataFrame, tasks: tuple[str, ...]) -> pd.DataFrame:
    """rule, sp, params, perplexity (95% interval), average accuracy (SE), paired verdicts vs constant and LR."""
    rows = []
    for sp, group in cells.groupby("sp", sort=True):
        by_rule = group.set_index("rule")
        for rule, row in by_rule.iterrows():
            se = float(np.sqrt(sum(row[f"{t}_se"] ** 2 for t in tasks)) / len(tasks))
            out = {
                "rule": rule,
                "sp": sp,
                "params": int(row["params"]),
                "perplexity": row["ppl_eval"],
                "ppl_low": row["ppl_eval_low"],
                "ppl_high": row["ppl_eval_high"],
                "average": row["average"],
                "average_se": se,
                "energy": row["energy"],
            }
            for name in ("constant", "lr"):
                out.update(_verdicts(row, by_rule.loc[name], tasks, name))
                if row["dims"] == by_rule.loc[name, "dims"]:  # the same model: nothing to compare
                    out[f"ppl_verdict_vs_{name}"] = out[f"acc_verdict_vs_{name}"] = "same allocation"
            rows.append(out)
    return pd.DataFrame(rows)


def readme_table(table: pd.DataFrame, model: str) -> str:
    """The README's compact rules table for `model` (named exactly): perplexity with its interval, accuracy +/- SE,
    the four verdicts."""
    rows = [
        [
            r.rule,
            f"{r.sp:.2f}",
            f"{r.params:,}",
            f"{r.perplexity:.1f} ({r.ppl_low:.1f}-{r.ppl_high:.1f})",
            f"{r.average:.3f} +/- {r.average_se:.3f}",
            r.ppl_verdict_vs_constant,
            r.ppl_verdict_vs_lr,
            r.acc_verdict_vs_constant,
            r.acc_verdict_vs_lr,
        ]
        for r in table.itertuples()
    ]
    header = (
        "rule | SP | parameters | perplexity (95% interval) | average accuracy | ppl vs constant | ppl vs LR "
        "| accuracy vs constant | accuracy vs LR"
    )
    return f"{model}; paired 95% bootstrap verdicts (perplexity: lower is better).\n\n" + markdown_table(header, rows)


def correlations(scores: dict[float, pd.DataFrame]) -> pd.DataFrame:
    """Spearman correlations between the per-layer scores, one square block per SP."""
    return pd.concat([rules.rank_correlations(table).assign(sp=sp) for sp, table in scores.items()])


def sb_selection_table(cells: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """The SB selection rules compared on the sweep cells (helpers.experiments.sb_selection)."""
    n_books = len(settings.eval_texts)
    trials = sb_selection.selection_trials(cells, settings.tasks, n_books, settings.eval_windows)
    questions = int(sum(len(cells["raw"].iloc[0]["tasks"][t]["correct"]) for t in settings.tasks))
    costs = sb_selection.selection_costs(
        settings.select_windows, settings.eval_windows, n_books, settings.seqlen, questions
    )
    return sb_selection.selection_summary(trials, costs)


def write_rules(lab: Lab, sweep_cells: pd.DataFrame, out: Path, manifest: Manifest) -> dict[str, pd.DataFrame]:
    """Write allocation_rules, rule_correlations, sb_selection (.csv + .md) and the score figure into `out`."""
    s = lab.settings
    params = {**_params(s), "rules_code": code_fingerprint(rules, sys.modules[__name__]), "sps": list(s.rules_sps)}
    cells, scores = rules_cells(lab, s.rules_sps)
    tables = {
        "rules": rules_table(cells, s.tasks),
        "correlations": correlations(scores),
        "sb_selection": sb_selection_table(sweep_cells, s),
    }
    both = ("rules", "sweep")  # the rules' own cells, and the sweep's where a rule allocates as constant or LR
    write_table(tables["rules"], out / "allocation_rules", manifest, "allocation_rules", cells=both, **params)
    write_table(
        tables["correlations"], out / "rule_correlations", manifest, "rule_correlations", cells=("rules",), **params
    )
    write_table(tables["sb_selection"], out / "sb_selection", manifest, "sb_selection", **params)
    title = f"{model_label(s.model)}\nper-layer scores at SP {s.rules_sps[0]}"
    fig = plots.plot_rule_scores(scores[s.rules_sps[0]], title)
    manifest.record(plots.save_figure(fig, out / "allocation_rules_scores"), "rule_scores", cells=("rules",), **params)
    text = "\n\n".join(
        [
            readme_table(tables["rules"], model_label(s.model)),
            read_rules_table(tables["rules"]),
            read_sb_selection(tables["sb_selection"]),
        ]
    )
    summary = write_text_atomic(out / "allocation_rules_summary.md", text + "\n")
    manifest.record(summary, "rules_summary", cells=both, **params)
    return tables


def write_sb_selection(lab: Lab, sweep_cells: pd.DataFrame, out: Path, manifest: Manifest) -> pd.DataFrame:
    """Only the SB selection rules: `sb_selection` (.csv + .md) and its reading `sb_selection_summary.md`."""
    s = lab.settings
    params = {**_params(s), "rules_code": code_fingerprint(sys.modules[__name__]), "sb_step": s.sb_step}
    table = sb_selection_table(sweep_cells, s)
    write_table(table, out / "sb_selection", manifest, "sb_selection", **params)
    head = f"{model_label(s.model)}; candidate SBs from SP down to 0 in steps of {s.sb_step:g}, SPs "
    text = head + ", ".join(f"{sp:g}" for sp in s.sps) + ".\n\n" + read_sb_selection(table) + "\n"
    summary = write_text_atomic(out / "sb_selection_summary.md", text)
    manifest.record(summary, "sb_selection_summary", cells=("sweep",), **params)
    return table


def run_rules(settings: Settings, out: Path, progress: bool = True, allocation: bool = True) -> dict[str, pd.DataFrame]:
    """`python -m helpers rules`: the sweep at `settings` (cached) and the rules step, written into `out`.

    `allocation=False` compares only the SB selection rules (no allocation-rules cells: a finer SB grid is cheap).
    """
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out, model=settings.model, seed=settings.seed, settings=dataclasses.asdict(settings))
    lab = Lab(settings, progress)
    if not allocation:
        return {"sb_selection": write_sb_selection(lab, sweep(lab), out, manifest)}
    return write_rules(lab, sweep(lab), out, manifest)
