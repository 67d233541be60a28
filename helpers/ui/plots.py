"""One look for every figure: seaborn theme, fixed colours, PNG (150 dpi) + SVG output."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from helpers.infra.storage import atomic_path

if TYPE_CHECKING:
    from helpers.compression.allocation import Allocation

COLORS = {
    "lr": "#1f77b4",  # LR score
    "lr_norm": "#2ca02c",  # normalised score
    "slr": "#ff7f0e",  # slice per layer redundancy
    "fs": "#9467bd",  # final slice
    "sb": "#7f7f7f",  # base slice line
    "mean": "#d62728",  # mean / constant-slicing baseline (red, as in the paper)
    "dense": "#000000",
    "constant": "#d62728",
    "dynamic": "#1f77b4",
    "pruned": "#8c564b",
}
DPI = 150


def use_style() -> None:
    """Apply the lab's seaborn theme."""
    sns.set_theme(context="notebook", style="whitegrid", palette="deep")


def save_figure(fig: plt.Figure, path: str | Path) -> list[Path]:
    """Save `fig` as PNG (150 dpi) and SVG next to each other; `path` may have any suffix."""
    stem = Path(path).with_suffix("")
    written = []
    for suffix in (".png", ".svg"):
        target = stem.with_suffix(suffix)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=suffix[1:])
        written.append(target)
    return written


def plot_lr_curve(table: pd.DataFrame, title: str = "", ax: plt.Axes | None = None) -> plt.Figure:
    """LR score (bars) and normalised score (line) per layer (the left panel of the paper's Figure 1).

    Bars and a line, because the two are an affine map of each other and would lie on top of each other as lines.
    """
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(table["layer"], table["lr"], color=COLORS["lr"], alpha=0.35, label="LR score")
    ax.plot(table["layer"], table["lr_norm"], marker="o", ms=4, color=COLORS["lr_norm"], label="normalised LR")
    ax.set_xlabel("layer")
    ax.set_ylabel("score")
    ax.set_title(title or "Layer Redundancy")
    ax.legend(loc="lower right")
    return ax.figure


def plot_bi_ranking(table: pd.DataFrame, ax: plt.Axes | None = None) -> plt.Figure:
    """Layers sorted by Block Influence (1 - LR): the ones ShortGPT would remove first are on the left."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    ranked = table.sort_values("bi")
    ax.bar(np.arange(len(ranked)), ranked["bi"], color=COLORS["pruned"])
    ax.set_xticks(np.arange(len(ranked)), ranked["layer"].astype(int), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("layer (sorted by Block Influence, least important first)")
    ax.set_ylabel("BI = 1 - LR")
    ax.set_title("Block Influence per layer, ranked")
    return ax.figure


def plot_heatmap(
    matrix: np.ndarray, title: str, xlabel: str, ylabel: str, cbar_label: str, ax: plt.Axes | None = None, **kw
) -> plt.Figure:
    """A labelled heatmap (token cosines, layer-to-layer similarity, ...), its colour bar labelled too."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4.5))
    sns.heatmap(matrix, ax=ax, cmap=kw.pop("cmap", "viridis"), cbar_kws={"label": cbar_label}, **kw)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax.figure


def plot_block_heatmap(by_length: np.ndarray, title: str = "", ax: plt.Axes | None = None) -> plt.Figure:
    """Cosine between x_l and x_{l+n}: block length n down, start layer l across (the layer-pruning picture)."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 6))
    size = by_length.shape[1]
    sns.heatmap(by_length, ax=ax, cmap="viridis", mask=np.isnan(by_length), cbar_kws={"label": "mean cosine"})
    ax.set_xticks(np.arange(size) + 0.5, np.arange(size), fontsize=7)
    ax.set_yticks(np.arange(size) + 0.5, np.arange(1, size + 1), fontsize=7)
    ax.set_xlabel("first layer of the block, l")
    ax.set_ylabel("block length n")
    ax.set_title(title or "cos(x_l, x_{l+n})")
    ax.grid(False)
    return ax.figure


def plot_chosen_layers(chosen: dict[str, list[int]], n_layers: int, ax: plt.Axes | None = None) -> plt.Figure:
    """One row per method, a filled cell for every layer it removes."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(chosen)))
    grid = np.zeros((len(chosen), n_layers))
    for row, layers in enumerate(chosen.values()):
        grid[row, list(layers)] = 1
    ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1.4)
    ax.set_yticks(np.arange(len(chosen)), list(chosen))
    ax.set_xticks(np.arange(n_layers), np.arange(n_layers), fontsize=7)
    ax.set_xlabel("layer (dark = removed)")
    ax.set_title("Layers each method removes")
    ax.grid(False)
    return ax.figure


def plot_loss_curve(history: dict, ax: plt.Axes | None = None) -> plt.Figure:
    """Replacement training: train and validation MSE per step, with the identity map's MSE for reference."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(history["step"], history["train_loss"], color=COLORS["lr"], alpha=0.5, label="train MSE")
    ax.plot(history["val_step"], history["val_loss"], marker="o", ms=3, color=COLORS["dynamic"], label="validation MSE")
    ax.axhline(history["identity_mse"], color=COLORS["mean"], ls="--", label="identity (skip block)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_title(
        f"{history.get('kind', '')} replacement for layers {history['start']}..{history['start'] + history['n'] - 1}"
    )
    ax.legend(loc="upper right")
    return ax.figure


def plot_state_norms(norms: pd.DataFrame, ax: plt.Axes | None = None) -> plt.Figure:
    """Median and max token norm of each residual state x_0..x_L, log scale."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    ax.semilogy(norms["state"], norms["median"], marker="o", ms=3, label="median token norm")
    ax.semilogy(norms["state"], norms["max"], marker="^", ms=3, label="max token norm")
    ax.set_xlabel("residual state x_i (0 = embeddings, L = last layer output, raw)")
    ax.set_ylabel("L2 norm")
    ax.set_title("Token norms through the stack")
    ax.legend()
    return ax.figure


def plot_lr_comparison(tables: dict[str, pd.DataFrame], column: str = "lr", ax: plt.Axes | None = None) -> plt.Figure:
    """Overlay one LR column for several runs (e.g. two books) to see what the curve depends on."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    for name, table in tables.items():
        ax.plot(table["layer"], table[column], marker="o", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(column)
    ax.set_title(f"{column} per layer, one line per run")
    ax.legend()
    return ax.figure


class AllocationFigure:
    """The paper's Figure 1 for one allocation, built once and updated in place (fast for sliders).

    Top: LR score (bars) and normalised score (line) per layer. Bottom: SLR (dashed, on top of FS, which
    it equals when SB = 0), final slice FS and the slice
    realised after rounding the kept dimensions, with the SB line and the mean (SP) line.
    `png()` re-renders only what SP and SB move (blitting over a cached background, one per
    y range); a new LR vector redraws everything once. `warm()` caches both y ranges up front.
    """

    def __init__(self, alloc: Allocation, title: str = "", figsize: tuple[float, float] = (9, 5.2)) -> None:
        use_style()
        self.fig = Figure(figsize=figsize, dpi=80)  # outside pyplot: no inline display, no global state
        self.canvas = FigureCanvasAgg(self.fig)
        self.top, self.bottom = self.fig.subplots(2, 1, sharex=True)
        kw = dict(marker="o", ms=3)
        self.lr_bars = self.top.bar([], [], color=COLORS["lr"], alpha=0.35, label="LR score")
        self.static = {"lr_norm": self.top.plot([], [], color=COLORS["lr_norm"], label="normalised LR", **kw)[0]}
        self.moving = {
            "fs": self.bottom.plot([], [], color=COLORS["fs"], label="final slice FS", lw=2.5, **kw)[0],
            "slr": self.bottom.plot([], [], color=COLORS["slr"], ls="--", label="SLR (slice from redundancy)", **kw)[0],
            "realised": self.bottom.plot([], [], drawstyle="steps-mid", color=COLORS["dense"], lw=0.8, alpha=0.6)[0],
            "sb": self.bottom.axhline(0, color=COLORS["sb"], ls="--", label="SB (base slice)"),
            "mean": self.bottom.axhline(0, color=COLORS["mean"], lw=1.2, label="mean = SP"),
        }
        self.moving["realised"].set_label("realised (kept dims)")
        self.top.set_ylabel("score")
        self.top.set_ylim(-0.05, 1.05)
        self.top.set_title(title or "Slice allocation by Layer Redundancy")
        self.bottom.set_xlabel("layer")
        self.bottom.set_ylabel("slice fraction")
        self._backgrounds: dict[tuple[float, float], object] = {}  # cached static pixels per y range
        self._lr: np.ndarray | None = None
        self.update(alloc)
        for ax in (self.top, self.bottom):
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
        self.fig.tight_layout()

    def update(self, alloc: Allocation) -> None:
        """Move every artist to `alloc` (no new artists, no re-layout)."""
        layers = np.arange(alloc.fs.size)
        if self._lr is None or self._lr.shape != alloc.lr.shape or not np.array_equal(self._lr, alloc.lr):
            self._lr = alloc.lr
            self.lr_bars.remove()
            self.lr_bars = self.top.bar(layers, alloc.lr, color=COLORS["lr"], alpha=0.35, label="LR score")
            self.static["lr_norm"].set_data(layers, alloc.lr_norm)
            self.bottom.set_xlim(-0.5, alloc.fs.size - 0.5)
            self._backgrounds.clear()
        for key, values in (("slr", alloc.slr), ("fs", alloc.fs), ("realised", alloc.realised_fs)):
            self.moving[key].set_data(layers, values)
        self.moving["sb"].set_ydata([alloc.sb, alloc.sb])
        self.moving["mean"].set_ydata([alloc.sp, alloc.sp])
        self.bottom.set_ylim(-0.03, 0.5 if alloc.fs.max() < 0.45 else 1.0)  # below 0: an SB = 0 line stays visible

    def warm(self) -> None:
        """Render the static background for both y ranges now, so that no slider move pays for it."""
        current = self.bottom.get_ylim()
        for top in (0.5, 1.0):
            self.bottom.set_ylim(-0.03, top)
            self.png()
        self.bottom.set_ylim(*current)

    def png(self) -> bytes:
        """Render the current state as PNG bytes (for an image widget), redrawing only the moving artists."""
        ylim = self.bottom.get_ylim()
        if ylim not in self._backgrounds:
            for artist in self.moving.values():
                artist.set_animated(True)
            self.canvas.draw()
            self._backgrounds[ylim] = self.canvas.copy_from_bbox(self.fig.bbox)
        else:
            self.canvas.restore_region(self._backgrounds[ylim])
        for artist in self.moving.values():
            self.bottom.draw_artist(artist)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(self.canvas.buffer_rgba())).save(buf, format="png", compress_level=1)
        return buf.getvalue()


def plot_allocation(alloc: Allocation, title: str = "") -> plt.Figure:
    """The paper's Figure 1 for one (SP, SB) allocation, as a static figure."""
    return AllocationFigure(alloc, title=title).fig


def _se(frame: pd.DataFrame, panel: str, tasks: list[str]) -> np.ndarray | None:
    """Standard error of a panel's accuracy; the average's combines the tasks' as independent."""
    if panel != "average":
        return frame[f"{panel}_se"].to_numpy() if f"{panel}_se" in frame else None
    if not all(f"{t}_se" in frame for t in tasks):
        return None
    return np.sqrt(sum(frame[f"{t}_se"].to_numpy() ** 2 for t in tasks)) / len(tasks)


def accuracy_limits(cells: pd.DataFrame, tasks: list[str]) -> dict[str, tuple[float, float]]:
    """One y-range per panel over every SP (and dense), so that Figures 2-4 share their axes."""
    limits = {}
    for panel in [*tasks, "average"]:
        se = _se(cells, panel, tasks)
        se = 0 if se is None else se
        low, high = float(np.min(cells[panel] - se)), float(np.max(cells[panel] + se))
        pad = 0.05 * max(high - low, 0.02)
        limits[panel] = (low - pad, high + pad)
    return limits


def plot_accuracy_vs_sb(
    cells: pd.DataFrame,
    tasks: list[str],
    sp: float,
    dense: pd.Series | None = None,
    limits: dict[str, tuple[float, float]] | None = None,
) -> plt.Figure:
    """The paper's Figures 2-5 for one SP: each task's accuracy (+/- one standard error) and the average against SB.

    The red horizontal line is constant slicing (SB = SP), the SliceGPT baseline, with its standard-error band;
    the dashed line is the dense model. `limits` (see `accuracy_limits`) fixes each panel's y-range.
    """
    use_style()
    panels = [*tasks, "average"]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, sharex=True)
    ordered = cells.sort_values("sb")
    constant = ordered[np.isclose(ordered["sb"], sp)]
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.errorbar(
            ordered["sb"],
            ordered[panel],
            yerr=_se(ordered, panel, tasks),
            marker="o",
            ms=4,
            capsize=2,
            color=COLORS["dynamic"],
            label="dynamic (SB), +/- 1 SE",
        )
        if len(constant):
            level = constant[panel].iloc[0]
            ax.axhline(level, color=COLORS["constant"], lw=1.5, label="constant (SB = SP)")
            se = _se(constant, panel, tasks)
            if se is not None:
                ax.axhspan(level - se[0], level + se[0], color=COLORS["constant"], alpha=0.12, lw=0)
        if dense is not None:
            ax.axhline(dense[panel], color=COLORS["dense"], ls="--", lw=1, label="dense")
        if limits:
            ax.set_ylim(*limits[panel])
        ax.set_title(panel)
        ax.set_xlabel("SB (base slice)")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    axes.flat[0].set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=7)
    questions = int(cells["questions"].iloc[0]) if "questions" in cells else 0
    fig.suptitle(f"Accuracy against SB at SP = {sp:.2f} ({questions} questions per model)")
    fig.tight_layout()
    return fig


def plot_perplexity_comparison(cells: pd.DataFrame, best: pd.DataFrame) -> plt.Figure:
    """Left: held-out perplexity against SB for every SP. Right: dense vs constant vs best dynamic per SP.

    Error bars are the 95% bootstrap intervals over windows where the cells carry them.
    """
    use_style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    sliced = cells[cells["method"] != "dense"]
    intervals = "ppl_eval_low" in cells

    def yerr(frame: pd.DataFrame) -> np.ndarray | None:
        if not intervals:
            return None
        return np.abs(np.stack([frame["ppl_eval"] - frame["ppl_eval_low"], frame["ppl_eval_high"] - frame["ppl_eval"]]))

    for sp, group in sliced.groupby("sp"):
        group = group.sort_values("sb")
        left.errorbar(
            group["sb"], group["ppl_eval"], yerr=yerr(group), marker="o", ms=4, capsize=2, label=f"SP = {sp:.2f}"
        )
    left.set_xlabel("SB (base slice; SB = SP is constant slicing)")
    left.set_ylabel("perplexity (held-out books)")
    left.set_title("Perplexity against SB")
    dense = float(cells.loc[cells["method"] == "dense", "ppl_eval"].iloc[0])
    left.axhline(dense, color=COLORS["dense"], ls="--", lw=1, label="dense")
    left.legend(fontsize=8)
    constant = sliced[sliced["method"] == "constant"].set_index("sp")
    dynamic = best.set_index("sp").reindex(constant.index)
    x = np.arange(len(constant))
    right.bar(x - 0.2, constant["ppl_eval"], 0.4, yerr=yerr(constant), color=COLORS["constant"], label="constant")
    right.bar(x + 0.2, dynamic["ppl_eval"], 0.4, yerr=yerr(dynamic), color=COLORS["dynamic"], label="dynamic (best SB)")
    right.axhline(dense, color=COLORS["dense"], ls="--", lw=1, label=f"dense ({dense:.1f})")
    right.set_xticks(x, [f"{sp:.2f}" for sp in constant.index])
    right.set_xlabel("SP (mean slice; both bars at the same parameter count)")
    right.set_ylabel("perplexity (held-out books)")
    right.set_title("Dense, constant and best dynamic")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


LEDGER_COLORS = {
    "embeddings": "#8c564b",
    "head": "#e377c2",
    "attention": "#1f77b4",
    "mlp": "#2ca02c",
    "shortcuts": "#ff7f0e",
    "norms": "#7f7f7f",
    "other": "#bcbd22",
}


def plot_ledger(wide: pd.DataFrame, title: str = "", ax: plt.Axes | None = None) -> plt.Figure:
    """Stacked bars of parameters per block and part (input: `ledger.ledger_by_layer` or totals per model)."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.5))
    bottom = np.zeros(len(wide))
    for part in wide.columns:
        values = wide[part].to_numpy(dtype=float) / 1e6
        ax.bar(np.arange(len(wide)), values, bottom=bottom, color=LEDGER_COLORS.get(part), label=part)
        bottom += values
    ax.set_xticks(np.arange(len(wide)), [str(i) for i in wide.index], rotation=90, fontsize=7)
    ax.set_ylabel("parameters (millions)")
    ax.set_title(title or "Parameter ledger")
    ax.legend(fontsize=7, ncols=3)
    return ax.figure


def plot_perplexity_vs_slice(table: pd.DataFrame, ax: plt.Axes | None = None) -> plt.Figure:
    """Perplexity against mean slice, one line per method (columns: mean_slice, perplexity, method)."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for method, rows in table.groupby("method"):
        rows = rows.sort_values("mean_slice")
        ax.plot(rows["mean_slice"], rows["perplexity"], marker="o", color=COLORS.get(method), label=method)
    ax.set_xlabel("mean slice (fraction of d removed)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("Perplexity against mean slice")
    ax.legend()
    return ax.figure


def plot_spectra(eigenvalues: dict[str, np.ndarray], dims: list[int], kind: str = "attn", ax=None) -> plt.Figure:
    """Cumulative variance of each layer's PCA basis (`kind` "attn" or "mlp" boundaries), dot at the kept dim."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    names = [name for name in eigenvalues if name.startswith(kind)]
    cmap = plt.get_cmap("viridis", max(len(names), 2))
    for k, name in enumerate(names):
        layer = int(name.split("_")[-1])
        values = np.asarray(eigenvalues[name], dtype=float)
        cumulative = np.cumsum(values) / values.sum()
        ax.plot(np.arange(1, len(values) + 1), cumulative, color=cmap(k), lw=1)
        ax.plot(dims[layer], cumulative[dims[layer] - 1], "o", ms=3, color=cmap(k))
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(len(names) - 1, 1)))
    ax.figure.colorbar(sm, ax=ax, label="layer")
    ax.set_xlabel("number of principal directions kept")
    ax.set_ylabel("fraction of variance")
    ax.set_title(f"PCA spectrum at each layer's {'attention' if kind == 'attn' else 'MLP'} input (dot: kept)")
    return ax.figure


def plot_rule_scores(scores: pd.DataFrame, title: str = "", ax: plt.Axes | None = None) -> plt.Figure:
    """Every rule's per-layer score over depth, each min-max scaled to [0, 1] (1 = most redundant)."""
    use_style()
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    for k, column in enumerate(scores.columns):  # dashed every other line: equal scores stay visible
        values = scores[column].to_numpy(dtype=float)
        spread = values.max() - values.min()
        scaled = (values - values.min()) / spread if spread > 0 else np.zeros_like(values)
        ax.plot(np.arange(values.size), scaled, marker="o", ms=3, lw=1.2, ls="-" if k % 2 == 0 else "--", label=column)
    ax.set_xlabel("layer")
    ax.set_ylabel("min-max scaled score\n(1 = most redundant)")
    ax.set_title(title or "Per-layer scores of the allocation rules", fontsize=10)
    ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return ax.figure
