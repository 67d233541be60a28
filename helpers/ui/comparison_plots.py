"""Figures of the method comparison: what each method keeps against what it removes, and against what it buys.

Both read `methods_report.comparison_table` (one row per SP, method and recovery); hollow markers and dashed
lines are models before recovery, filled markers and solid lines after, a star the trained replacement.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from helpers.ui.plots import COLORS, use_style

METHOD_COLORS = {
    "constant slicing": COLORS["constant"],
    "dynamic slicing": COLORS["dynamic"],
    "ShortGPT": "#8c564b",
    "LLM-Streamline": "#2ca02c",
    "hybrid: ShortGPT + dynamic slicing": "#9467bd",
    "LLM-Streamline + replacement": "#2ca02c",
}
CHANCE_AVERAGE = {"piqa": 0.5, "hellaswag": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "winogrande": 0.5}


def _style(recovery: str) -> dict:
    if recovery == "none":
        return dict(ls="--", mfc="white", marker="o")
    if recovery == "replacement":
        return dict(ls="none", marker="*", ms=11)
    return dict(ls="-", marker="o")


def _chance(table: pd.DataFrame) -> float | None:
    tasks = [t for t in CHANCE_AVERAGE if t in table.columns]
    return float(np.mean([CHANCE_AVERAGE[t] for t in tasks])) if tasks else None


def plot_methods_vs_removed(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Average accuracy (+/- SE) and held-out perplexity (95% interval) against the share of parameters removed,
    one colour per method, before (dashed, hollow) and after recovery (solid, filled); dense and chance as lines."""
    use_style()
    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(12, 4.4))
    dense = table[table["method"] == "dense"].iloc[0]
    for (method, recovery), rows in table[table["method"] != "dense"].groupby(["method", "recovery"], sort=False):
        rows = rows.sort_values("removed_pct")
        style = {"color": METHOD_COLORS.get(method, "#7f7f7f"), "capsize": 2, "ms": 6, **_style(recovery)}
        label = f"{method} ({'no recovery' if recovery == 'none' else recovery})"
        acc.errorbar(rows["removed_pct"], rows["avg_acc"], yerr=rows["avg_acc_se"], label=label, **style)
        err = np.abs(
            np.stack([rows["perplexity"] - rows["perplexity_low"], rows["perplexity_high"] - rows["perplexity"]])
        )
        ppl.errorbar(rows["removed_pct"], rows["perplexity"], yerr=err, **style)
    acc.axhline(dense["avg_acc"], color=COLORS["dense"], lw=1, ls=":", label=f"dense ({dense['avg_acc']:.3f})")
    chance = _chance(table)
    if chance is not None:
        acc.axhline(chance, color="#7f7f7f", lw=1, ls="-.", label=f"chance ({chance:.3f})")
    ppl.axhline(dense["perplexity"], color=COLORS["dense"], lw=1, ls=":")
    ppl.set_yscale("log")
    acc.set_xlabel("parameters removed (%)")
    ppl.set_xlabel("parameters removed (%)")
    acc.set_ylabel("average accuracy (five tasks)")
    ppl.set_ylabel("perplexity, held-out books (log scale)")
    acc.set_title("Accuracy against size")
    ppl.set_title("Perplexity against size")
    fig.legend(*acc.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_speed(table: pd.DataFrame, speed: pd.DataFrame, title: str = "") -> plt.Figure:
    """Average accuracy against the measured speed-up over dense (median ratio with its interquartile range), one
    panel per workload of the speed step; each architecture sits at one speed, before and after recovery."""
    use_style()
    workloads = list(dict.fromkeys(speed["workload"]))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.4), squeeze=False)
    dense = table[table["method"] == "dense"].iloc[0]
    for ax, workload in zip(axes[0], workloads, strict=True):
        ratios = speed[speed["workload"] == workload].set_index("model")
        for _, row in table[table["method"] != "dense"].iterrows():
            label = f"{row['method']} SP={row['sp']:g}"
            if label not in ratios.index:
                continue
            r = ratios.loc[label]
            r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
            style = _style(row["recovery"])
            ax.errorbar(
                r["ratio_to_dense"],
                row["avg_acc"],
                xerr=[[r["ratio_to_dense"] - r["ratio_q1"]], [r["ratio_q3"] - r["ratio_to_dense"]]],
                yerr=row["avg_acc_se"],
                color=METHOD_COLORS.get(row["method"], "#7f7f7f"),
                marker=style["marker"],
                mfc=style.get("mfc"),
                ms=style.get("ms", 6),
                capsize=2,
                ls="none",
            )
            ax.annotate(
                f"{row['sp']:.2f}",
                (r["ratio_to_dense"], row["avg_acc"]),
                fontsize=7,
                alpha=0.7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.axhline(dense["avg_acc"], color=COLORS["dense"], lw=1, ls=":")
        ax.axvline(1.0, color=COLORS["dense"], lw=1, ls=":")
        ax.set_xlabel(f"speed-up over dense, {workload} (median, IQR)")
        ax.set_ylabel("average accuracy (five tasks)")
        ax.set_title(workload)
    handles = [
        plt.Line2D([], [], color=c, marker="o", ls="none", label=m)
        for m, c in METHOD_COLORS.items()
        if m != "LLM-Streamline + replacement"
    ]
    handles += [
        plt.Line2D([], [], color="#555555", marker="o", mfc="white", ls="none", label="before recovery"),
        plt.Line2D([], [], color="#555555", marker="o", ls="none", label="after LoRA recovery"),
        plt.Line2D([], [], color="#2ca02c", marker="*", ms=11, ls="none", label="LLM-Streamline + trained replacement"),
    ]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(f"{title}; labels: SP the size is matched to", fontsize=10)
    fig.tight_layout()
    return fig


def plot_recovery_curve(history: dict, ax: plt.Axes | None = None) -> plt.Figure:
    """Recovery fine-tuning: the training loss per step and the validation loss at each check (as perplexity for
    the language-model loss, as KL from the dense model for distillation); the restored step circled."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    distill = history.get("loss") == "distill"
    scale = (lambda v: np.asarray(v)) if distill else np.exp
    ax.plot(history["step"], scale(history["train_loss"]), color=COLORS["lr"], alpha=0.5, label="training batch")
    ax.plot(
        history["val_step"],
        scale(history["val_loss"]),
        marker="o",
        ms=4,
        color=COLORS["dynamic"],
        label="validation windows",
    )
    best = int(np.argmin(history["val_loss"]))
    ax.scatter(
        [history["val_step"][best]],
        [scale([history["val_loss"][best]])[0]],
        s=80,
        facecolors="none",
        edgecolors=COLORS["mean"],
        label="restored",
        zorder=3,
    )
    ax.set_xlabel("optimiser step (step 0: before recovery)")
    ax.set_ylabel("KL from the dense model (nats per token)" if distill else "perplexity")
    ax.set_title(f"Recovery fine-tuning: LoRA, {'distillation' if distill else 'language-model'} loss")
    ax.legend(loc="upper right")
    return ax.figure
