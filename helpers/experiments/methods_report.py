"""Tables and generated statements of the method comparison (`compare.grid`): every method at matched size,
before and after recovery, each row paired with the others on the same questions and windows.

`comparison_table` is the long table (one row per SP, method and recovery); `summary_table` its compact
Markdown; `recovery_statements` the sentences the README and the issue note quote, every verdict read
from a paired 95% interval, never written by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from helpers.evaluation import stats
from helpers.evaluation.stability import stability
from helpers.evaluation.tasks import paper_metric
from helpers.experiments.compare import LORA, NONE, REFERENCE, REPLACEMENT, SLICING, TRAINED
from helpers.infra.storage import markdown_table

Cells = dict[tuple[str, float, str], dict]


def _correct(task: dict) -> np.ndarray:
    return np.asarray(task["correct"], dtype=int)


def paired(cell: dict, ref: dict) -> dict:
    """`cell` minus `ref`: average accuracy over the same questions, perplexity over the same windows."""
    tasks = sorted(cell["tasks"])
    acc = stats.paired_average([_correct(cell["tasks"][t]) for t in tasks], [_correct(ref["tasks"][t]) for t in tasks])
    ppl = stats.paired_perplexity(cell["eval_window_nll"], ref["eval_window_nll"], cell["eval_window_tokens"])
    return dict(
        acc_diff=acc.diff,
        acc_diff_low=acc.low,
        acc_diff_high=acc.high,
        acc_verdict=acc.verdict,
        ppl_diff=ppl.diff,
        ppl_diff_low=ppl.low,
        ppl_diff_high=ppl.high,
        ppl_verdict=ppl.verdict,
    )


def _row(cell: dict, dense: dict) -> dict:
    """Size, perplexity with its interval, per-task accuracy, the average +/- SE and stability against dense."""
    ci = stats.perplexity_interval(cell["eval_window_nll"], cell["eval_window_tokens"])
    row = dict(
        layers=cell["layers"],
        params=cell["params"],
        removed_pct=100 * (1 - cell["params"] / dense["params"]),
        perplexity=cell["ppl_eval"],
        perplexity_low=ci.low,
        perplexity_high=ci.high,
    )
    ses, stabs = [], []
    for task, result in sorted(cell["tasks"].items()):
        row[task] = result[paper_metric(task)]
        ses.append(stats.accuracy_se(_correct(result)))
        base = dense["tasks"][task]
        stabs.append(stability(base["scores"], result["scores"], base["labels"]))
    tasks = sorted(cell["tasks"])
    row.update(
        avg_acc=float(np.mean([row[t] for t in tasks])),
        avg_acc_se=float(np.sqrt(np.sum(np.square(ses))) / len(ses)),
        stability=float(np.mean(stabs)),
    )
    return row


def comparison_table(cells: Cells, dense: dict) -> pd.DataFrame:
    """One row per (SP, method, recovery), dense first: `_row`, the paired difference from dynamic slicing at
    the same SP and recovery (the trained replacement: from LoRA-recovered dynamic slicing), for a LoRA row
    the paired gain over the same model unrecovered (`gain_*`), and the training budget, time and peak memory."""
    rows = [dict(sp=0.0, method="dense", recovery=NONE, tokens=0, **_row(dense, dense))]
    for (name, sp, state), cell in cells.items():
        training = cell.get("training") or {}
        row = dict(sp=sp, method=name, recovery=state, tokens=int(training.get("tokens", 0)), **_row(cell, dense))
        row.update(paired(cell, cells[REFERENCE, sp, LORA if state == TRAINED else state]))
        if state == LORA:
            row.update({f"gain_{k}": v for k, v in paired(cell, cells[name, sp, NONE]).items()})
        row.update(
            train_seconds=training.get("seconds", np.nan),
            train_peak_mb=training.get("peak_memory_mb", np.nan),
            trainable=training.get("trainable", np.nan),
            removed=str(cell.get("info", {}).get("removed", "")),
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _diff(row: pd.Series, prefix: str = "") -> str:
    acc = f"{100 * row[prefix + 'acc_diff']:+.1f} ({100 * row[prefix + 'acc_diff_low']:+.1f}, "
    acc += f"{100 * row[prefix + 'acc_diff_high']:+.1f}) {row[prefix + 'acc_verdict']}"
    return acc


def summary_table(table: pd.DataFrame) -> str:
    """The compact Markdown of `comparison_table`: size, perplexity interval, accuracy +/- SE, the paired
    accuracy difference from dynamic slicing (points, 95% interval) and, for LoRA rows, the gain from recovery."""
    rows = []
    for _, r in table.iterrows():
        vs = "-" if r["method"] in ("dense", REFERENCE) else _diff(r)
        gain = _diff(r, "gain_") if r["recovery"] == LORA else "-"
        sp = "-" if r["method"] == "dense" else f"{r['sp']:.2f}"
        rows.append(
            [
                sp,
                r["method"],
                r["recovery"],
                f"{int(r['tokens']):,}" if r["tokens"] else "-",
                r["layers"],
                f"{int(r['params']):,}",
                f"{r['removed_pct']:.1f}%",
                f"{r['perplexity']:.1f} ({r['perplexity_low']:.1f}-{r['perplexity_high']:.1f})",
                f"{r['avg_acc']:.3f} +/- {r['avg_acc_se']:.3f}",
                vs,
                gain,
            ]
        )
    header = (
        "SP | method | recovery | training tokens | layers | parameters | removed | perplexity (95% interval) "
        f"| average accuracy | vs {REFERENCE} (points) | gain from recovery (points)"
    )
    return markdown_table(header, rows)


def replacement_vs_lora(table: pd.DataFrame) -> pd.DataFrame:
    """At each SP: LLM-Streamline's trained replacement against LLM-Streamline + LoRA at the same token budget,
    with accuracy, perplexity, stability, training time and peak memory of each and their paired difference."""
    out = []
    for sp, rows in table[table["sp"] > 0].groupby("sp"):
        by = rows.set_index(["method", "recovery"])
        if (REPLACEMENT, TRAINED) not in by.index:
            continue
        rep, lora = by.loc[(REPLACEMENT, TRAINED)], by.loc[("LLM-Streamline", LORA)]
        out.append(
            dict(
                sp=sp,
                tokens_replacement=int(rep["tokens"]),
                tokens_lora=int(lora["tokens"]),
                acc_replacement=rep["avg_acc"],
                acc_lora=lora["avg_acc"],
                ppl_replacement=rep["perplexity"],
                ppl_lora=lora["perplexity"],
                stability_replacement=rep["stability"],
                stability_lora=lora["stability"],
                seconds_replacement=rep["train_seconds"],
                seconds_lora=lora["train_seconds"],
                peak_mb_replacement=rep["train_peak_mb"],
                peak_mb_lora=lora["train_peak_mb"],
                params_replacement=int(rep["params"]),
                params_lora=int(lora["params"]),
            )
        )
    return pd.DataFrame(out)


def recovery_statements(table: pd.DataFrame, cells: Cells, model: str) -> str:
    """README sentences: recovered dynamic vs constant slicing at each SP (and before recovery), recovered slicing
    vs recovered depth pruning, the trained replacement vs LoRA, and what recovery gained per method."""
    lines = []
    sps = sorted({sp for _, sp, _ in cells})
    for sp in sps:
        for state in (NONE, LORA):
            cmp = paired(cells[REFERENCE, sp, state], cells["constant slicing", sp, state])
            lines.append(f"- SP {sp:.2f}, {_state(state, table)}: dynamic minus constant slicing " + _phrase(cmp) + ".")
    for sp in sps:
        for name in (n for n, s, st in cells if s == sp and st == LORA and n not in SLICING):
            cmp = paired(cells[REFERENCE, sp, LORA], cells[name, sp, LORA])
            lines.append(f"- SP {sp:.2f}, both recovered: dynamic slicing minus {name} " + _phrase(cmp) + ".")
    for sp in sps:
        if (REPLACEMENT, sp, TRAINED) in cells:
            cmp = paired(cells[REPLACEMENT, sp, TRAINED], cells["LLM-Streamline", sp, LORA])
            lines.append(
                f"- SP {sp:.2f}, LLM-Streamline: trained replacement minus LoRA at the same tokens "
                + _phrase(cmp)
                + "."
            )
    gains = table[table["recovery"] == LORA]
    resolved = gains.groupby("gain_acc_verdict").size().to_dict()
    ppl_resolved = gains.groupby("gain_ppl_verdict").size().to_dict()
    lines.append(
        f"- Recovery ({_tokens(table)} tokens each) changed average accuracy in {len(gains)} models: "
        + ", ".join(f"{n} {v}" for v, n in sorted(resolved.items()))
        + "; perplexity: "
        + ", ".join(f"{n} {v}" for v, n in sorted(ppl_resolved.items()))
        + f" ({model})."
    )
    return "\n".join(lines) + "\n"


def _tokens(table: pd.DataFrame) -> str:
    tokens = sorted(set(table.loc[table["recovery"] == LORA, "tokens"]))
    return ", ".join(f"{t:,}" for t in tokens)


def _state(state: str, table: pd.DataFrame) -> str:
    return "before recovery" if state == NONE else f"both recovered with LoRA ({_tokens(table)} tokens)"


def _phrase(cmp: dict) -> str:
    """'+1.2 points of average accuracy (95% paired interval ...): **better**; perplexity ...: **better**'."""
    return (
        f"{100 * cmp['acc_diff']:+.1f} points of average accuracy (95% paired interval "
        f"{100 * cmp['acc_diff_low']:+.1f} to {100 * cmp['acc_diff_high']:+.1f}): **{cmp['acc_verdict']}**; "
        f"perplexity {cmp['ppl_diff']:+.1f} ({cmp['ppl_diff_low']:+.1f} to {cmp['ppl_diff_high']:+.1f}): "
        f"**{cmp['ppl_verdict']}**"
    )
