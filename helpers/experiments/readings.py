"""Readings: short Markdown text generated from result numbers, so that a lesson's conclusions follow its data.

Every function takes plain numbers (and, where a comparison is read, an optional confidence
interval for the difference) and returns one paragraph. Without an interval a reading says that
it cannot separate the difference from noise; with one it gives the verdict the interval supports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

Interval = tuple[float, float]


def _layers(indices: Sequence[int]) -> str:
    """'0, 1, 24 and 29' from a list of layer indices."""
    names = [str(int(i)) for i in indices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def outlier_layers(lr_norm: Sequence[float], tolerance: float = 0.1) -> list[int]:
    """Layers whose normalised LR is further than `tolerance` from the median normalised LR."""
    values = np.asarray(lr_norm, dtype=float)
    return [int(i) for i in np.flatnonzero(np.abs(values - np.median(values)) > tolerance)]


def read_lr_profile(lr_norm: Sequence[float], tolerance: float = 0.1) -> str:
    """Say how far the normalised LR profile is from flat, and what that makes the allocation."""
    values = np.asarray(lr_norm, dtype=float)
    odd = outlier_layers(values, tolerance)
    typical = float(np.median(values))
    rest = np.delete(values, odd)
    text = (
        f"The normalised LR has median {typical:.2f}; {values.size - len(odd)} of {values.size} layers lie within "
        f"{tolerance} of it (range {rest.min():.2f} to {rest.max():.2f})"
    )
    if not odd:
        return text + ". The profile is flat: dynamic slicing would differ little from constant slicing."
    listed = ", ".join(f"layer {i}: {values[i]:.2f}" for i in odd)
    return (
        f"{text}. The exceptions are layers {_layers(odd)} ({listed}). Since each layer's slice above SB is "
        f"proportional to its normalised score, 'dynamic' is close to 'constant, except for layers {_layers(odd)}'."
    )


def read_agreement(max_difference: float, spread: float, rank_correlation: float) -> str:
    """Read two LR curves against each other: is the profile the model's or the text's?"""
    ratio = max_difference / spread if spread > 0 else float("inf")
    verdict = (
        "the curves agree: the profile belongs to the model more than to the text"
        if ratio < 0.1 and rank_correlation > 0.9
        else "the curves differ noticeably: with this little text the profile also reflects the text"
    )
    return (
        f"The largest difference between the two curves is {max_difference:.4f}, {ratio:.1%} of the spread of LR "
        f"across layers ({spread:.4f}), and the rank correlation of the layers is {rank_correlation:.3f}. "
        f"In short, {verdict}. "
        "This compares two runs, not many: it shows no interval."
    )


def read_difference(
    label_a: str,
    value_a: float,
    label_b: str,
    value_b: float,
    *,
    higher_is_better: bool,
    what: str,
    interval: Interval | None = None,
) -> str:
    """Compare two numbers of one metric; with `interval` (for a - b) give the verdict it supports."""
    better, worse = (label_a, label_b) if (value_a > value_b) == higher_is_better else (label_b, label_a)
    if value_a == value_b:
        return f"{label_a} and {label_b} have the same {what} ({value_a:.3f})."
    text = f"On {what}, {better} is ahead: {label_a} {value_a:.3f} against {label_b} {value_b:.3f}"
    if interval is None:
        return text + " (no interval given: this single run cannot separate the gap from noise)."
    low, high = interval
    if low <= 0 <= high:
        return text + f", but the interval for the difference, [{low:+.3f}, {high:+.3f}], includes 0: no verdict."
    return text + f", and the interval for the difference, [{low:+.3f}, {high:+.3f}], excludes 0: {worse} is worse."


CHANCE = {"piqa": 0.5, "winogrande": 0.5, "hellaswag": 0.25}  # one over the number of options


def read_accuracy(
    task: str, accuracy: float, dense: float, questions: int, interval: Interval | None = None, chance: float = 0.0
) -> str:
    """Read one task's accuracy against the dense model, in units of questions when no interval is given."""
    gap = accuracy - dense
    step = 1 / questions
    moved = abs(gap) / step
    text = f"{task}: {accuracy:.3f} against {dense:.3f} dense ({gap:+.3f}, about {moved:.0f} of {questions} questions)"
    if interval is not None:
        low, high = interval
        verdict = "includes 0: not a real change" if low <= 0 <= high else "excludes 0"
        return text + f"; the interval for the difference [{low:+.3f}, {high:+.3f}] {verdict}."
    near_chance = f" The dense model is within 0.05 of chance ({chance:.2f})." if abs(dense - chance) < 0.05 else ""
    if gap > 0:
        why = ": compression removes, it does not teach, so a gain is noise or a change in how the model guesses."
        return text + why + near_chance
    return text + "." + near_chance


def read_speed(ratio: float, low: float, high: float) -> str:
    """Read a sliced/dense throughput ratio with its interquartile range over interleaved rounds."""
    text = f"{ratio:.2f}x the dense speed (IQR {low:.2f}-{high:.2f})"
    if low > 1:
        return text + ": faster in most rounds."
    if high < 1:
        return text + ": slower in most rounds although smaller (shortcut matrices, smaller, less efficient products)."
    return text + ": not separated from dense by these rounds."


def read_results_table(
    table: pd.DataFrame,
    tasks: Sequence[str],
    questions: int | None,
    accuracy_intervals: Mapping[float, Interval] | None = None,
    perplexity_intervals: Mapping[float, Interval] | None = None,
    task_intervals: Mapping[tuple[str, float, str], Interval] | None = None,
) -> str:
    """Read the paper-style table (rows dense, then constant and dynamic per SP) as a Markdown list.

    `questions` is the number per task (None: whole splits), used to express gaps in questions.
    The optional intervals (paired, 95%) are keyed by SP for dynamic - constant average accuracy and
    perplexity, and by (method, SP, task) for a compressed model's accuracy - the dense model's.
    """
    accuracy_intervals, perplexity_intervals = accuracy_intervals or {}, perplexity_intervals or {}
    task_intervals = task_intervals or {}
    dense = table[table["method"] == "dense"].iloc[0]
    lines = []
    for sp, rows in table[table["method"] != "dense"].groupby("sp"):
        by_method = rows.set_index("method")
        if {"constant", "dynamic"} <= set(by_method.index):
            const, dyn = by_method.loc["constant"], by_method.loc["dynamic"]
            acc = read_difference(
                "dynamic",
                dyn["average"],
                "constant",
                const["average"],
                higher_is_better=True,
                what="average accuracy",
                interval=accuracy_intervals.get(sp),
            )
            ppl = read_difference(
                "dynamic",
                dyn["ppl_eval"],
                "constant",
                const["ppl_eval"],
                higher_is_better=False,
                what="perplexity",
                interval=perplexity_intervals.get(sp),
            )
            lines.append(f"- **SP = {sp:.2f}** (dynamic SB = {dyn['sb']:.2f}): {acc} {ppl}")
    if questions:
        for _, row in table[table["method"] != "dense"].iterrows():
            for task in tasks:
                if row[task] > dense[task]:
                    label = f"{row['method']} at SP = {row['sp']:.2f} on {task}"
                    interval = task_intervals.get((row["method"], row["sp"], task))
                    reading = read_accuracy(label, row[task], dense[task], questions, interval, CHANCE.get(task, 0.0))
                    lines.append(f"- Above dense: {reading}")
    return "\n".join(lines) if lines else "The table has no compressed rows to read."


def read_speed_table(speed: pd.DataFrame) -> str:
    """Read every sliced model's speed against dense, per dtype and workload (`speed.summarise` table)."""
    rows = speed[speed["model"] != "dense"]
    return "\n".join(
        f"- {row.model}, {row.dtype}{'' if row.mode == 'eager' else ' ' + row.mode}, {row.workload}: "
        + read_speed(row.ratio_to_dense, row.ratio_q1, row.ratio_q3)
        for row in rows.itertuples()
    )


def read_depth_comparison(table: pd.DataFrame, reference: str = "dynamic slicing") -> str:
    """Read the method comparison: per SP and recovery (a table with those columns), the sizes, the best rows
    and each row's paired verdict against `reference` (a trained replacement is read with the recovered rows).

    The verdicts come from the table's `ppl_*` / `acc_*` difference columns (paired 95% intervals on the same
    windows and questions); a table without them is read without verdicts.
    """
    if not {"sp", "recovery"} <= set(table.columns):
        return _read_methods(table, reference)
    rows = table[table["method"] != "dense"]
    state = rows["recovery"].where(rows["recovery"] == "none", "recovered")
    parts = []
    for (sp, recovered), group in rows.groupby([rows["sp"], state]):
        when = "before recovery" if recovered == "none" else "after recovery"
        parts.append(f"**SP {sp:.2f}, {when}.** " + _read_methods(group, reference))
    return "\n\n".join(parts)


def _read_methods(table: pd.DataFrame, reference: str) -> str:
    rows = table[table["method"] != "dense"]
    best_ppl = rows.loc[rows["perplexity"].idxmin()]
    best_acc = rows.loc[rows["avg_acc"].idxmax()]
    text = (
        f"At {rows['removed_pct'].min():.1f}% to {rows['removed_pct'].max():.1f}% of the parameters removed, "
        f"the lowest perplexity is {best_ppl['method']}'s ({best_ppl['perplexity']:.1f}) and the highest average "
        f"accuracy {best_acc['method']}'s ({best_acc['avg_acc']:.3f})."
    )
    if not {"ppl_verdict", "acc_verdict"} <= set(table.columns):
        return text + " This table carries no paired intervals: differences of a few questions are not findings."
    others = rows[rows["method"] != reference]
    lines = [text, f"Against {reference}, on the same windows and questions (paired 95% intervals):"]
    for _, row in others.iterrows():
        lines.append(
            f"- {row['method']}: perplexity {_verdict_phrase(row, 'ppl', 'lower', 'higher', '.1f')}; "
            f"average accuracy {_verdict_phrase(row, 'acc', 'higher', 'lower', '.3f')}."
        )
    resolved = others["ppl_verdict"].tolist()
    lines.append(
        f"On perplexity, {resolved.count('better')} of {len(resolved)} rows are resolved better than {reference}, "
        f"{resolved.count('worse')} worse and {resolved.count('not resolved')} not resolved."
    )
    return "\n".join(lines)


def _verdict_phrase(row: pd.Series, metric: str, good: str, bad: str, fmt: str) -> str:
    """'resolved lower (difference -11.8, interval -15.2 to -8.0)' from a row's `metric`_diff/_low/_high/_verdict."""
    verdict = row[f"{metric}_verdict"]
    word = {"better": f"resolved {good}", "worse": f"resolved {bad}"}.get(verdict, verdict)
    diff, low, high = (format(row[f"{metric}_diff{end}"], "+" + fmt) for end in ("", "_low", "_high"))
    return f"{word} (difference {diff}, interval {low} to {high})"


def _verdict_list(rows: pd.DataFrame, column: str, verdict: str) -> str:
    names = rows.loc[rows[column] == verdict, "rule"].tolist()
    return ", ".join(names) if names else "none"


def read_rules_table(table: pd.DataFrame) -> str:
    """Read the allocation-rules table: per SP, the best rule and which rules the paired intervals separate."""
    lines = []
    for sp, rows in table.groupby("sp"):
        rows = rows[~rows["rule"].isin(["constant"])]
        best = rows.loc[rows["perplexity"].idxmin()]
        lines.append(
            f"- **SP = {sp:.2f}**: lowest held-out perplexity {best['rule']} ({best['perplexity']:.1f}, 95% interval "
            f"{best['ppl_low']:.1f}-{best['ppl_high']:.1f}). Perplexity against constant slicing: better for "
            f"{_verdict_list(rows, 'ppl_verdict_vs_constant', 'better')}, worse for "
            f"{_verdict_list(rows, 'ppl_verdict_vs_constant', 'worse')}, not resolved for "
            f"{_verdict_list(rows, 'ppl_verdict_vs_constant', 'not resolved')}. Against LR: better for "
            f"{_verdict_list(rows, 'ppl_verdict_vs_lr', 'better')}, worse for "
            f"{_verdict_list(rows, 'ppl_verdict_vs_lr', 'worse')}. Average accuracy against LR: better for "
            f"{_verdict_list(rows, 'acc_verdict_vs_lr', 'better')}, worse for "
            f"{_verdict_list(rows, 'acc_verdict_vs_lr', 'worse')}, not resolved for "
            f"{_verdict_list(rows[rows['rule'] != 'lr'], 'acc_verdict_vs_lr', 'not resolved')}."
        )
    spare = table[table["rule"] == "spare_ends"]
    if len(spare):
        verdicts = set(spare["ppl_verdict_vs_lr"])
        answer = (
            "not resolved by these intervals"
            if verdicts == {"not resolved"}
            else "LR's shape matters beyond sparing the ends"
            if verdicts == {"worse"}
            else "sparing the ends does as well as LR or better"
            if verdicts <= {"better", "not resolved"} and "better" in verdicts
            else "mixed across SPs"
        )
        lines.append(f"- Does LR's gain come from sparing the first and last layers? Perplexity says: {answer}.")
    return "\n".join(lines)


def read_sb_selection(summary: pd.DataFrame) -> str:
    """Read the SB-selection comparison: which rule most often finds the SB best on unseen data, at what cost."""
    best_ppl = summary.loc[summary["finds_best_ppl"].idxmax()]
    best_acc = summary.loc[summary["finds_best_acc"].idxmax()]
    parts = [
        f"{r.rule} finds the best SB by held-out perplexity in {r.finds_best_ppl:.0%} and by held-out accuracy in "
        f"{r.finds_best_acc:.0%} of {r.trials} trials (mean regret {r.mean_ppl_regret:.2f} perplexity, "
        f"{100 * r.mean_acc_regret:.1f} accuracy points; it scores {r.cost_per_candidate} per candidate)"
        for r in summary.itertuples()
    ]
    tied = summary["finds_best_acc"].nunique() == 1 and summary["finds_best_ppl"].nunique() == 1
    verdict = (
        "Only one candidate SB per SP: every rule picks it, and nothing is compared."
        if summary["candidates"].max() < 2
        else "The rules do equally well here: which rule to use is not resolved by these data."
        if tied
        else f"Most often right: {best_ppl['rule']} for perplexity, {best_acc['rule']} for accuracy."
    )
    return "SB selection: " + "; ".join(parts) + ". " + verdict


def read_score_agreement(correlations: pd.DataFrame) -> str:
    """Read a square Spearman table (column `score` plus one column per score): closest and farthest pairs."""
    table = correlations.set_index("score")[list(correlations["score"])]
    pairs = [(a, b, float(table.loc[a, b])) for i, a in enumerate(table.index) for b in table.index[i + 1 :]]
    pairs = [p for p in pairs if np.isfinite(p[2])]
    high, low = max(pairs, key=lambda p: p[2]), min(pairs, key=lambda p: p[2])
    agree = sum(p[2] > 0.7 for p in pairs)
    return (
        f"Of {len(pairs)} pairs of scores, {agree} rank the layers alike (Spearman above 0.7). The closest pair is "
        f"{high[0]} and {high[1]} ({high[2]:.2f}); the farthest {low[0]} and {low[1]} ({low[2]:.2f}). "
        "Scores that rank layers alike slice alike through the SP/SB formula, whatever they measure; "
        "a rank correlation near 0 means the two would spend the budget on different layers."
    )
