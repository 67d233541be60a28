"""Depth pruning against slicing at matched parameter counts: the comparison table of notebook 05.

Every method removes about as many parameters as constant slicing at
`slice_fraction` does: n = round(parameters slicing removes / parameters of
one layer) layers for ShortGPT and LLM-Streamline, and for the hybrid (the
dynamic-slicing paper's future work) the k = n // 2 layers with the lowest
Block Influence are removed first and the remaining layers are sliced
dynamically by their recomputed LR, with the slice fraction searched so that
the total matches (`allocation.layer_allocation`, the one size matching of
every slicing row). Each variant is built from a fresh copy of the dense model,
evaluated (perplexity, zero-shot accuracy, stability against the dense model,
forward speed), and cached as one cell, so an interrupted run resumes.
Parameter counts are realised (unique tensors counted once, the ledger's total; the ledger itself
cannot read a model holding a replacement block); speed is
`helpers.evaluation.speed.prefill_throughput` on two calibration windows.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from helpers.analysis.block_scores import BlockScores, block_scores
from helpers.analysis.redundancy import layer_redundancy
from helpers.compression.allocation import Allocation, ModelShape, budget, dense_param_count, layer_allocation
from helpers.compression.checkpoints import load_model
from helpers.compression.depth import parameter_count, remove_layers
from helpers.compression.replacement import prune_model
from helpers.compression.slicing import rotate_and_slice
from helpers.evaluation import stats
from helpers.evaluation.speed import prefill_throughput
from helpers.evaluation.stability import stability
from helpers.evaluation.tasks import paper_metric
from helpers.experiments.measure import measure, per_character_scores
from helpers.experiments.results import CellCache
from helpers.infra.integrity import code_fingerprint, imported_code
from helpers.infra.progress import progress_bar
from helpers.infra.storage import DATA_DIR, markdown_table
from helpers.infra.textdata import load_split, load_windows
from helpers.models.adapters import get_adapter

DEPTH_TABLE = DATA_DIR / "runs" / "depth_comparison"  # where the CLI and notebook 05 write the table (CSV + Markdown)


@dataclass(frozen=True)
class CompareSettings:
    """Everything that determines the comparison table (also its cache key); built from the one `Settings` of the
    tables and figures by `reports.depth_settings`, so that its defaults are the presets'."""

    model: str
    calib: str  # calibration text: block scores, LR, PCA, replacement training
    seqlen: int
    calib_windows: int
    train_windows: int  # replacement training windows, after the calibration ones
    slice_fraction: float  # constant slicing's SP; everything else is matched to its parameter count
    base_slice: float  # SB of dynamic slicing (0 = fully dynamic)
    max_steps: int  # replacement training steps
    eval_text: str
    eval_seqlen: int
    eval_windows: int
    tasks: tuple[str, ...]
    task_limit: int | None
    dtype: str  # zero-shot scoring precision (building the variants stays float32)
    val_windows: int = 8  # held-out windows for early stopping
    replacement: str = "ffn"
    batch_size: int = 4


def _lr(model: nn.Module, ids: torch.Tensor, batch_size: int) -> np.ndarray:
    return layer_redundancy(model, ids, batch_size, progress=False)["lr"].to_numpy()


def _shape(model: nn.Module):
    return ModelShape.from_config(model.config)


def plan(model: nn.Module, scores: BlockScores, settings: CompareSettings) -> dict:
    """How many layers each depth method removes and the hybrid's split, every row matched to the parameter
    count of constant slicing at `slice_fraction` (slicing rows reach it through `allocation.layer_allocation`)."""
    shape = _shape(model)
    dense = dense_param_count(shape)["total"]
    target = budget(shape, settings.slice_fraction)
    per_layer = parameter_count(get_adapter(model).layers(model)[0])
    n = max(1, round((dense - target) / per_layer))
    return dict(dense_params=dense, target_params=target, layer_params=per_layer, n=n, hybrid_k=max(1, n // 2))


def _sliced(model: nn.Module, alloc: Allocation, ctx: dict, settings: CompareSettings) -> tuple[nn.Module, dict]:
    dims = [int(d) for d in alloc.kept_dim]
    rotate_and_slice(model, ctx["calib_ids"], dims, batch_size=settings.batch_size, progress=False)
    return model, dict(dims=dims, slice_fraction=alloc.sp)


def _constant_slicing(model: nn.Module, ctx: dict, settings: CompareSettings) -> tuple[nn.Module, dict]:
    sp = settings.slice_fraction
    return _sliced(model, layer_allocation(ctx["lr"], sp, sp, _shape(model)), ctx, settings)


def _dynamic_slicing(model: nn.Module, ctx: dict, settings: CompareSettings) -> tuple[nn.Module, dict]:
    alloc = layer_allocation(ctx["lr"], settings.slice_fraction, settings.base_slice, _shape(model))
    return _sliced(model, alloc, ctx, settings)


def _shortgpt(model: nn.Module, ctx: dict, settings: CompareSettings) -> tuple[nn.Module, dict]:
    model, info, _ = prune_model(model, ctx["scores"], "shortgpt", ctx["plan"]["n"])
    return model, info


def _streamline(model: nn.Module, ctx: dict, settings: CompareSettings) -> tuple[nn.Module, dict]:
    model, info, _ = prune_model(model, ctx["scores"], "streamline", ctx["plan"]["n"])
    return model, info


def _streamline_replacement(model: nn.Module, ctx: dict, settings: CompareSettings) -> tuple[nn.Module, dict]:
    model, info, history = prune_model(
        model,
        ctx["scores"],
        "streamline",
        ctx["plan"]["n"],
        settings.replacement,
        ctx["train_ids"],
        ctx["val_ids"],
        max_steps=settings.max_steps,
        batch_size=settings.batch_size,
        progress=False,
    )
    return model, {**info, "history": history}


def _hybrid(model: nn.Module, ctx: dict, settings: CompareSettings) -> tuple[nn.Module, dict]:
    """ShortGPT removes the planned layers, then dynamic slicing on the LR of the layers that remain, at the SP
    that brings the whole model to the planned count."""
    removed = ctx["scores"].choose("shortgpt", ctx["plan"]["hybrid_k"])
    remove_layers(model, removed)
    lr = _lr(model, ctx["calib_ids"], settings.batch_size)
    target = ctx["plan"]["target_params"]
    alloc = layer_allocation(lr, settings.slice_fraction, settings.base_slice, _shape(model), target=target)
    model, info = _sliced(model, alloc, ctx, settings)
    return model, dict(removed=removed, **info)


_BUILDERS = {  # the order of the table's rows
    "dense": lambda model, ctx, settings: (model, {}),
    "constant slicing": _constant_slicing,
    "dynamic slicing": _dynamic_slicing,
    "ShortGPT": _shortgpt,
    "LLM-Streamline": _streamline,
    "LLM-Streamline + replacement": _streamline_replacement,
    "hybrid: ShortGPT + dynamic slicing": _hybrid,
}


VARIANTS = tuple(_BUILDERS)


def build_variant(name: str, dense: nn.Module, ctx: dict, settings: CompareSettings) -> tuple[nn.Module, dict]:
    """A compressed copy of `dense` for variant `name` (one of VARIANTS), and what was done to it."""
    if name not in _BUILDERS:
        raise ValueError(f"Unknown variant {name!r}; use one of {', '.join(VARIANTS)}.")
    return _BUILDERS[name](copy.deepcopy(dense), ctx, settings)


def evaluate_variant(
    model: nn.Module, tokenizer, settings: CompareSettings, eval_ids: torch.Tensor, speed_ids: torch.Tensor
) -> dict:
    """`measure.measure` (perplexity, per-task accuracy with the option scores behind it), parameters and speed."""
    result = measure(model, tokenizer, eval_ids, dict.fromkeys(settings.tasks, settings.task_limit), settings.dtype)
    ppl = result.perplexity
    tasks = {
        # stability reads log-likelihood per character for every task (WinoGrande: of its shared continuation),
        # so that its softmax weights are on one scale
        task: dict(acc=r.summary[paper_metric(task)], scores=per_character_scores(r), labels=[int(v) for v in r.labels])
        for task, r in result.tasks.items()
    }
    return dict(
        perplexity=ppl.perplexity,
        window_nll=list(ppl.window_nll),
        window_tokens=list(ppl.window_tokens),
        params=parameter_count(model),
        layers=len(get_adapter(model).layers(model)),
        tokens_per_s=prefill_throughput(model, speed_ids, repeats=3)["prefill_tokens_per_s"],
        tasks=tasks,
    )


def _context(settings: CompareSettings, progress: bool) -> tuple[nn.Module, object, dict]:
    model, tokenizer = load_model(settings.model)
    sizes = settings.calib_windows, settings.train_windows, settings.val_windows
    calib, train, val = load_split(tokenizer, settings.calib, settings.seqlen, *sizes)
    scores = block_scores(model, calib, settings.batch_size, progress=progress)
    lr = scores.lr()  # the block capture already holds every layer's input/output cosine
    ctx = dict(
        eval_ids=load_windows(tokenizer, settings.eval_text, settings.eval_seqlen, settings.eval_windows),
        calib_ids=calib,
        train_ids=train,
        val_ids=val,
        scores=scores,
        lr=lr,
    )
    ctx["plan"] = plan(model, scores, settings)
    return model, tokenizer, ctx


def compare(settings: CompareSettings, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Build and evaluate every variant; return the table and the raw cells (with the training history)."""
    cache = CellCache("depth_compare")
    code = code_fingerprint(*imported_code(__name__))  # this module and all it imports build the cells
    model, tokenizer, ctx = _context(settings, progress)
    speed_ids = ctx["calib_ids"][:2]
    cells = {}
    for name in progress_bar(VARIANTS, desc="variants", disable=not progress):
        params = dict(settings=asdict(settings), variant=name, plan=ctx["plan"], code=code)

        def compute(name=name) -> dict:
            variant, info = build_variant(name, model, ctx, settings)
            result = dict(info=info, **evaluate_variant(variant, tokenizer, settings, ctx["eval_ids"], speed_ids))
            del variant
            gc.collect()
            return result

        cells[name] = cache.get_or_compute(params, compute)
    return comparison_table(cells, ctx["plan"]), dict(cells=cells, plan=ctx["plan"], scores=ctx["scores"])


def _correct(result: dict) -> np.ndarray:
    """Per question, 1 where the reported metric picks the label (scores are per character: acc_norm's argmax)."""
    return np.array([int(np.argmax(s) == y) for s, y in zip(result["scores"], result["labels"], strict=True)])


def comparison_table(cells: dict[str, dict], plan_: dict, reference: str = "dynamic slicing") -> pd.DataFrame:
    """One row per variant: parameters, perplexity (95% interval), accuracy (+/- SE), stability, speed, and the
    paired difference from `reference` on the same questions and windows with its 95% interval and verdict."""
    dense, ref = cells["dense"], cells[reference]
    rows = []
    for name, cell in cells.items():
        ci = stats.perplexity_interval(cell["window_nll"], cell["window_tokens"])
        row = dict(
            method=name,
            layers=cell["layers"],
            params=cell["params"],
            removed_pct=100 * (1 - cell["params"] / dense["params"]),
            perplexity=cell["perplexity"],
            perplexity_low=ci.low,
            perplexity_high=ci.high,
        )
        accs, stabs, ses = [], [], []
        for task, result in cell["tasks"].items():
            row[task] = result["acc"]
            accs.append(result["acc"])
            ses.append(stats.accuracy_se(_correct(result)))
            ref_dense = dense["tasks"][task]
            stabs.append(stability(ref_dense["scores"], result["scores"], ref_dense["labels"]))
        tasks = sorted(cell["tasks"])  # one order whether the cell was computed or read back from the cache
        acc = stats.paired_average(
            [_correct(cell["tasks"][t]) for t in tasks], [_correct(ref["tasks"][t]) for t in tasks]
        )
        ppl = stats.paired_perplexity(cell["window_nll"], ref["window_nll"], cell["window_tokens"])
        row.update(
            avg_acc=float(np.mean(accs)),
            avg_acc_se=float(np.sqrt(np.sum(np.square(ses))) / len(ses)),
            ppl_diff=ppl.diff,
            ppl_diff_low=ppl.low,
            ppl_diff_high=ppl.high,
            ppl_verdict=ppl.verdict,
            acc_diff=acc.diff,
            acc_diff_low=acc.low,
            acc_diff_high=acc.high,
            acc_verdict=acc.verdict,
            stability=float(np.mean(stabs)),
            tokens_per_s=cell["tokens_per_s"],
            removed=str(cell["info"].get("removed", "")),
        )
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(table: pd.DataFrame, reference: str = "dynamic slicing") -> str:
    """The README's compact Markdown of `comparison_table`: size, perplexity interval, accuracy +/- SE and the
    paired differences from `reference` with their intervals and verdicts."""
    rows = []
    for r in table.itertuples():
        if r.method == reference:
            ppl = acc = "-"
        else:
            ppl = f"{r.ppl_diff:+.1f} ({r.ppl_diff_low:+.1f}, {r.ppl_diff_high:+.1f}) {r.ppl_verdict}"
            acc = f"{r.acc_diff:+.3f} ({r.acc_diff_low:+.3f}, {r.acc_diff_high:+.3f}) {r.acc_verdict}"
        perplexity = f"{r.perplexity:.1f} ({r.perplexity_low:.1f}-{r.perplexity_high:.1f})"
        accuracy = f"{r.avg_acc:.3f} +/- {r.avg_acc_se:.3f}"
        rows.append([r.method, r.layers, f"{r.params:,}", f"{r.removed_pct:.1f}%", perplexity, accuracy, ppl, acc])
    return markdown_table(
        "method | layers | parameters | removed | perplexity (95% interval) | average accuracy "
        f"| vs {reference}: perplexity | vs {reference}: accuracy",
        rows,
    )
