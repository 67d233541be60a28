"""Command line: `python -m helpers COMMAND ...` runs the same pipeline as the notebooks."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from helpers.compression.allocation import DEFAULT_FS_MAX, DEFAULT_MULTIPLE, SIZES
from helpers.evaluation.tasks import PAPER_TASKS
from helpers.infra.textdata import CALIB_TEXT, EVAL_TEXT
from helpers.models.loading import DEFAULT_MODEL

# Each command imports what it needs inside its function: `--help`, argument errors and
# the light commands then start without loading every stage (matplotlib, lm-eval tables, ...).

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register `func` as subcommand `name`, with `add_arguments` filling its parser."""

    def wrap(func: Command) -> Command:
        COMMANDS[name] = (add_arguments, func)
        return func

    return wrap


class UsageError(ValueError):
    """A bad command line; reported in one line like every other error."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def count(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError(text)
    return value


def step_fraction(text: str) -> float:
    """argparse type: a grid step in (0, 1)."""
    value = fraction(text)
    if value == 0:
        raise ValueError(text)
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1."""
    values = [positive_int(v) for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(text)
    return values


def final_dim(text: str) -> int | str:
    """argparse type: an integer >= 1, or "last" (the last layer's kept dimension)."""
    return text if text == "last" else positive_int(text)


positive_int.__name__, count.__name__, fraction.__name__ = "positive integer", "integer >= 0", "fraction in [0, 1)"
step_fraction.__name__ = "step in (0, 1)"
final_dim.__name__ = 'positive integer or "last"'
positive_ints.__name__ = "comma-separated positive integers"


def _out_args(p: argparse.ArgumentParser, kind: str | None, help: str, required: bool = False) -> None:
    """`--out` (a file when `kind` is None, else a folder of that kind) and `--overwrite`."""
    p.add_argument("--out", default=None, required=required, help=help)  # a Path after preflight's checks
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (a folder only if lab-made)")
    p.set_defaults(out_kind=kind)


def _lr_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument("--text", default=CALIB_TEXT, help="text name (see textdata.text_sources) or a .txt file")
    p.add_argument("--seqlen", type=positive_int, default=256)
    p.add_argument("--windows", type=positive_int, default=32)
    p.add_argument("--batch-size", type=positive_int, default=8)
    _out_args(p, None, "CSV path (default data/runs/lr_MODEL.csv); the plot goes next to it")


@command("lr", _lr_args)
def run_lr(args: argparse.Namespace) -> int:
    """Compute Layer Redundancy and write the CSV plus a plot of the curve next to it."""
    from helpers.analysis.redundancy import cached_layer_redundancy
    from helpers.infra.storage import RUNS_DIR, figure_stem, slug, write_csv_atomic
    from helpers.ui import plots

    table = cached_layer_redundancy(args.model, args.text, args.seqlen, args.windows, args.batch_size)
    out = args.out or RUNS_DIR / f"lr_{slug(args.model)}.csv"
    write_csv_atomic(table, out)
    fig = plots.plot_lr_curve(table, title=f"Layer Redundancy: {args.model} on {args.text}")
    written = plots.save_figure(fig, figure_stem(out))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {out} and {', '.join(map(str, written))}")
    return 0


def _prune_args(p: argparse.ArgumentParser) -> None:
    from helpers.compression.replacement import REPLACEMENT_STEPS

    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument("--method", choices=("shortgpt", "gromov", "streamline"), default="streamline")
    p.add_argument("--n", type=positive_int, default=4, help="number of layers to remove")
    p.add_argument("--replacement", choices=("none", "ffn", "swiglu", "layer"), default="none")
    p.add_argument("--calib", default=CALIB_TEXT, help="calibration text name or .txt file")
    p.add_argument("--seqlen", type=positive_int, default=256)
    p.add_argument("--windows", type=positive_int, default=32, help="calibration windows for the block scores")
    p.add_argument("--train-windows", type=positive_int, default=32, help="windows to train the replacement on")
    p.add_argument("--val-windows", type=positive_int, default=8, help="held-out windows for early stopping")
    p.add_argument("--max-steps", type=positive_int, default=REPLACEMENT_STEPS, help="replacement training steps")
    _out_args(p, "pruned", "folder for the pruned model", required=True)


@command("prune", _prune_args)
def run_prune(args: argparse.Namespace) -> int:
    """Depth-prune a model (ShortGPT, angular distance or LLM-Streamline) and save it as a loadable folder."""
    from helpers.analysis.block_scores import cached_block_scores
    from helpers.compression.checkpoints import load_model, save_pruned
    from helpers.compression.depth import parameter_count
    from helpers.compression.replacement import prune_model
    from helpers.infra.textdata import load_split
    from helpers.ui import plots

    model, tokenizer = load_model(args.model)
    before = parameter_count(model)
    scores = cached_block_scores(args.model, args.calib, args.seqlen, args.windows, model=model, tokenizer=tokenizer)
    train = val = None
    if args.replacement != "none":  # windows after the scoring ones, so the replacement sees fresh text
        sizes = args.windows, args.train_windows, args.val_windows
        _, train, val = load_split(tokenizer, args.calib, args.seqlen, *sizes)
    model, info, history = prune_model(
        model, scores, args.method, args.n, args.replacement, train, val, max_steps=args.max_steps
    )
    info.update(source=args.model, calib=args.calib, params_before=before, params_after=parameter_count(model))
    save_pruned(model, tokenizer, args.out, info)
    if history is not None:
        plots.save_figure(plots.plot_loss_curve(history), _loss_plot(args.out))
        print(f"replacement val MSE {history['best_val_mse']:.4g} vs identity {history['identity_mse']:.4g}")
    print(f"removed layers {info['removed']}; parameters {before:,} -> {info['params_after']:,}; wrote {args.out}")
    return 0


def _loss_plot(out: Path) -> Path:
    """Where `prune` puts the replacement's loss curve (PNG and SVG) next to the pruned folder."""
    return out.parent / f"{out.name}_loss.png"


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


positive_float.__name__ = "positive number"


def _recover_args(p: argparse.ArgumentParser) -> None:
    from helpers.compression.recovery import AUTOCASTS, LOSSES, RecoverySettings

    d = RecoverySettings()
    p.add_argument("--model", required=True, help="a sliced, pruned or hybrid folder saved by the lab")
    p.add_argument("--rank", type=positive_int, default=d.rank, help="LoRA rank")
    p.add_argument("--alpha", type=positive_float, default=d.alpha, help="LoRA alpha (the update is scaled alpha/rank)")
    p.add_argument("--dropout", type=fraction, default=d.dropout, help="LoRA dropout")
    p.add_argument("--learning-rate", type=positive_float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--tokens", type=positive_int, default=d.tokens, help="training-token budget")
    p.add_argument("--steps", type=positive_int, default=None, help="optimiser steps at most (default: the budget's)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="windows per step")
    p.add_argument("--seqlen", type=positive_int, default=d.seqlen, help="tokens per window")
    p.add_argument("--val-windows", type=positive_int, default=d.val_windows, help="held-back windows to validate on")
    p.add_argument("--eval-every", type=positive_int, default=d.eval_every, help="steps between validations")
    p.add_argument("--patience", type=positive_int, default=d.patience, help="validations without gain before stop")
    p.add_argument("--warmup", type=fraction, default=d.warmup, help="fraction of the steps spent warming up")
    p.add_argument("--targets", default=",".join(d.targets), help="comma-separated linear layer names to adapt")
    p.add_argument("--shortcuts", action="store_true", help="also adapt a sliced model's shortcut matrices")
    p.add_argument("--autocast", choices=AUTOCASTS, default=d.autocast, help="training precision")
    p.add_argument("--loss", choices=LOSSES, default=d.loss, help="lm: next-token loss; distill: match --teacher")
    p.add_argument("--teacher", default=None, help="the dense model (name or folder) that --loss distill learns from")
    p.add_argument("--text", default=d.text, help="training text; must share no text with the evaluation books")
    p.add_argument("--seed", type=count, default=d.seed)
    _out_args(p, "sliced", "folder for the recovered model (same kind as --model)", required=True)


@command("recover", _recover_args)
def run_recover(args: argparse.Namespace) -> int:
    """Recovery fine-tuning: LoRA on a compressed folder, merged back into its weights, saved as a lab folder."""
    import math

    from helpers.compression.recovery import recover_folder

    report = recover_folder(args.model, args.out, args.settings, teacher=args.teacher)
    before, after = report.val_loss_before, report.val_loss_after
    print(f"validation perplexity {math.exp(before):.3f} -> {math.exp(after):.3f} (best at step {report.best_step})")
    stop = "stopped early" if report.stopped_early else "budget spent"
    print(f"{report.steps} steps, {report.tokens:,} training tokens ({stop}); {report.adapted} layers adapted")
    print(f"{report.seconds:.0f} s, peak memory {report.peak_memory_mb:.0f} MiB; wrote {args.out}")
    return 0


def _preflight_recover(args: argparse.Namespace) -> None:
    """`recover`: the folder is a compressed lab folder and the recipe fits it, read from headers only."""
    from helpers.compression.recovery import NotCompressedError, RecoverySettings, check_recovery_folder
    from helpers.models.loading import KNOWN_MODELS

    if args.model in KNOWN_MODELS:
        raise NotCompressedError(
            f"--model {args.model} is a dense model; recovery needs a sliced, pruned or hybrid folder."
        )
    if not Path(args.model).expanduser().is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such folder; give a folder saved by `slice` or `prune`.")
    if args.loss == "distill" and not args.teacher:
        raise UsageError("--loss distill needs --teacher, the dense model the folder was compressed from.")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    args.settings = RecoverySettings(
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        lr=args.learning_rate,
        tokens=args.tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        seqlen=args.seqlen,
        val_windows=args.val_windows,
        eval_every=args.eval_every,
        patience=args.patience,
        warmup=args.warmup,
        targets=targets,
        shortcuts=args.shortcuts,
        autocast=args.autocast,
        loss=args.loss,
        text=args.text,
        seed=args.seed,
    )
    args.out_kind = check_recovery_folder(Path(args.model).expanduser(), args.settings)


def _compare_args(p: argparse.ArgumentParser) -> None:
    from helpers.evaluation.allocation_rules import BASE_SLICE
    from helpers.experiments.presets import SIZES

    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument(
        "--size", choices=sorted(SIZES), default="reduced", help="the reproduce preset the others default to"
    )
    p.add_argument("--sps", type=fraction, nargs="+", default=None, help="SPs to match sizes to (default: the size's)")
    p.add_argument("--sb", type=fraction, default=BASE_SLICE, help="dynamic slicing's base slice")
    p.add_argument("--windows", type=positive_int, default=None, help="calibration windows")
    p.add_argument("--task-limit", type=positive_int, default=None, help="questions per zero-shot task")
    p.add_argument("--eval-windows", type=positive_int, default=None, help="perplexity windows per held-out book")
    p.add_argument("--recovery-tokens", type=positive_int, default=None, help="LoRA's and the replacement's budget")


@command("compare", _compare_args)
def run_compare(args: argparse.Namespace) -> int:
    """Every method at matched parameter counts, before and after recovery; writes data/runs/depth_comparison."""
    import dataclasses

    from helpers.experiments.cells import Lab, cell_result
    from helpers.experiments.compare import DEPTH_TABLE, grid
    from helpers.experiments.methods_report import comparison_table, summary_table
    from helpers.experiments.presets import SIZES
    from helpers.experiments.results import CellCache
    from helpers.infra.storage import write_table

    preset = SIZES[args.size]
    chosen = {
        "model": args.model,
        "recover_sps": tuple(args.sps) if args.sps else None,
        "calib_windows": args.windows,
        "limit": args.task_limit,
        "eval_windows": args.eval_windows,
        "recovery_tokens": args.recovery_tokens,
    }
    settings = dataclasses.replace(preset, **{k: v for k, v in chosen.items() if v is not None})
    lab = Lab(settings)
    cells = grid(lab, dict.fromkeys(settings.recover_sps, args.sb))
    table = comparison_table(cells, cell_result(lab, CellCache("sweep"), 0.0, None))
    written = write_table(table, DEPTH_TABLE)
    print(summary_table(table))
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def _allocate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lr", type=Path, required=True, help="LR CSV written by `helpers lr` (column lr)")
    p.add_argument("--sp", type=fraction, required=True, help="target mean slice fraction, e.g. 0.3")
    p.add_argument("--sb", type=fraction, required=True, help="base slice every layer gets, 0 <= SB <= SP")
    p.add_argument("--fs-max", type=fraction, default=DEFAULT_FS_MAX, help="largest slice any layer may get")
    p.add_argument("--multiple", type=positive_int, default=DEFAULT_MULTIPLE, help="kept dims' multiple (1: none)")
    p.add_argument(
        "--size",
        choices=SIZES,
        default=SIZES[0],
        help="matched: at the SP that holds constant slicing's parameter count (as `slice` and the gallery); "
        "nominal: at SP itself",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="model whose config gives d and the parameter count")
    _out_args(p, None, "CSV path (default data/runs/alloc_SP_SB.csv)")
    p.add_argument("--plot", nargs="?", const=True, default=None, help="also write Figure 1 (PNG+SVG); optional path")


@command("allocate", _allocate_args)
def run_allocate(args: argparse.Namespace) -> int:
    """Per-layer slice fractions and kept dimensions from LR scores for a mean slice SP and base slice SB."""
    from helpers.compression.allocation import (
        ModelShape,
        allocation_table,
        layer_allocation,
        param_summary,
        read_lr_csv,
    )
    from helpers.infra.storage import RUNS_DIR, figure_stem, write_csv_atomic
    from helpers.ui import plots

    shape = ModelShape.from_pretrained(args.model)
    lr = read_lr_csv(args.lr)
    if lr.size != shape.n_layers:
        raise ValueError(f"{args.lr} has {lr.size} layers but {args.model} has {shape.n_layers}; pass --model.")
    alloc = layer_allocation(lr, args.sp, args.sb, shape, args.size, fs_max=args.fs_max, multiple=args.multiple)
    out = args.out or RUNS_DIR / f"alloc_sp{args.sp:g}_sb{args.sb:g}.csv"
    write_csv_atomic(allocation_table(alloc), out)
    counts = param_summary(shape, alloc.kept_dim)
    print(f"requested mean slice SP={args.sp:g} (SB={args.sb:g}); realised mean slice {alloc.realised_mean:.5f}")
    if alloc.sp != args.sp:
        print(f"sliced at SP={alloc.sp:.5f}: constant slicing's parameter count at SP={args.sp:g} (--size matched)")
    print(f"kept dims (d={shape.hidden_size}): {alloc.kept_dim.tolist()}")
    print(
        f"parameters: dense {counts['dense']:,} -> sliced {counts['sliced']:,} "
        f"({counts['removed_fraction']:.2%} removed; without embeddings and head "
        f"{counts['dense_body']:,} -> {counts['sliced_body']:,}, {counts['removed_fraction_body']:.2%} removed)"
    )
    print(f"wrote {out}")
    if args.plot:
        target = figure_stem(out) if args.plot is True else Path(args.plot)
        title = f"{args.model}: SP={args.sp:g}, SB={args.sb:g}, realised {alloc.realised_mean:.4f}"
        written = plots.save_figure(plots.plot_allocation(alloc, title=title), target)
        print(f"wrote {', '.join(map(str, written))}")
    return 0


def _zeroshot_args(p: argparse.ArgumentParser) -> None:
    from helpers.evaluation.zeroshot import SCORING_DTYPE

    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder (sliced models too) or Hugging Face id")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma-separated")
    p.add_argument("--limit", type=positive_int, default=None, help="score the first N questions of each task")
    p.add_argument("--batch-size", type=positive_int, default=8, help="(context, option) rows per forward pass")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=SCORING_DTYPE, help="scoring precision")
    _out_args(p, None, "JSON path (default data/runs/zeroshot_MODEL.json)")


@command("zeroshot", _zeroshot_args)
def run_zeroshot(args: argparse.Namespace) -> int:
    """Zero-shot multiple-choice accuracy (acc, acc_norm, n per task) in the lm-evaluation-harness convention."""
    import torch

    from helpers.compression.checkpoints import load_model
    from helpers.evaluation.tasks import load_task
    from helpers.evaluation.zeroshot import evaluate_task, in_dtype
    from helpers.infra.storage import RUNS_DIR, slug, write_json_atomic

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty; give a comma-separated list such as piqa,hellaswag")
    for task in tasks:  # fail on a bad task name or limit before loading the model
        load_task(task, 1 if args.limit is None else args.limit)
    model, tokenizer = load_model(args.model)
    model = in_dtype(model, getattr(torch, args.dtype))
    summary = {task: evaluate_task(model, tokenizer, task, args.limit, args.batch_size).summary for task in tasks}
    out = args.out or RUNS_DIR / f"zeroshot_{slug(args.model)}.json"
    record = {"model": args.model, "limit": args.limit, "split": "validation", "dtype": args.dtype, "tasks": summary}
    write_json_atomic(out, record)
    print(f"{'task':<15}{'acc':>8}{'acc_norm':>10}{'n':>7}")
    for task, s in summary.items():
        norm = "-" if s["acc_norm"] is None else f"{s['acc_norm']:.4f}"
        print(f"{task:<15}{s['acc']:>8.4f}{norm:>10}{s['n']:>7}")
    print(f"wrote {out}")
    return 0


def _slice_args(p: argparse.ArgumentParser) -> None:
    from helpers.evaluation.allocation_rules import BASE_SLICE, RULES

    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument("--sp", type=fraction, required=True, help="mean slice fraction, e.g. 0.3")
    p.add_argument("--sb", type=fraction, default=None, help="base slice of a scored rule (without --rule: SP)")
    p.add_argument(
        "--rule",
        choices=list(RULES),
        default=None,
        help="allocation rule (helpers/evaluation/allocation_rules.py); default: constant, or lr when --sb < SP. "
        f"A scored rule's SB defaults to {BASE_SLICE:g}",
    )
    p.add_argument(
        "--size",
        choices=SIZES,
        default=SIZES[0],
        help="matched: a scored rule holds constant slicing's parameter count at SP (the gallery's rows); "
        "nominal: its mean slice is SP",
    )
    p.add_argument("--calib", default=CALIB_TEXT, help="text name or .txt file for calibration")
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--calib-windows", type=positive_int, default=64)
    p.add_argument(
        "--allow-few-tokens", action="store_true", help="slice even with fewer calibration tokens than the hidden size"
    )
    p.add_argument("--lr-text", default=None, help="text the rule's scores are measured on (default: --calib)")
    p.add_argument("--layout", choices=["auto", "tied", "untied"], default="auto", help="embedding layout")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default=None, help="device for the current layer (default: CUDA if present)")
    p.add_argument("--offload-dir", type=Path, default=None, help="keep calibration activations on disk here")
    p.add_argument(
        "--stream",
        choices=["auto", "yes", "no"],
        nargs="?",
        const="yes",
        default="auto",
        help="read, slice and write one layer at a time (docs/streaming.md); auto: when the model held in memory "
        "(about 4x its float32 size) would not fit",
    )
    p.add_argument(
        "--max-memory", type=float, default=None, help="GiB a streamed run may use (default: the memory available)"
    )
    p.add_argument(
        "--final-dim",
        type=final_dim,
        default=None,
        help='also slice the last residual to this width ("last": the last layer\'s): the head reads its top '
        "principal directions, and generation gets faster (docs/speed.md)",
    )
    _out_args(p, "sliced", "folder to write the sliced model to", required=True)


@command("slice", _slice_args)
def run_slice(args: argparse.Namespace) -> int:
    """Slice a model by an allocation rule (constant, or LR's SP/SB formula when SB < SP, by default) and save it."""
    from helpers.compression.checkpoints import load_model
    from helpers.compression.ledger import ledger_totals, parameter_ledger
    from helpers.compression.sliced_io import save_sliced
    from helpers.compression.slicing import rotate_and_slice
    from helpers.evaluation.allocation_rules import RuleInputs, rule_dims
    from helpers.infra.textdata import load_windows

    rule = args.rule or ("constant" if args.sb is None or args.sb == args.sp else "lr")
    if _streams(args):
        return _slice_streamed(args, rule)
    model, tokenizer = load_model(args.model, device="cpu")
    dense = ledger_totals(parameter_ledger(model))["total"]
    text = args.lr_text or args.calib
    inputs = RuleInputs(
        args.model, text, args.calib_seqlen, args.calib_windows, loaded=(model, tokenizer), progress=True
    )
    sb = None if args.rule is None and rule == "constant" else args.sb  # SB = SP without a rule: constant
    dims = [int(d) for d in rule_dims(rule, inputs, args.sp, sb, args.size)]
    calib = load_windows(tokenizer, args.calib, args.calib_seqlen, args.calib_windows)
    tied = {"auto": None, "tied": True, "untied": False}[args.layout]
    info = rotate_and_slice(
        model,
        calib,
        dims,
        tied=tied,
        batch_size=args.batch_size,
        device=args.device,
        offload_dir=args.offload_dir,
        final_dim=int(dims[-1]) if args.final_dim == "last" else args.final_dim,
    )
    save_sliced(model, tokenizer, args.out)
    params = ledger_totals(parameter_ledger(model))["total"]
    mean_slice = 1 - sum(dims) / (len(dims) * model.config.hidden_size)
    print(f"rule {rule}; dims per layer: {dims}")
    layout = "tied" if info.tied else "untied"
    print(f"realised mean slice {mean_slice:.4f}; layout {layout}; the head reads {info.final_dim} dimensions")
    print(f"parameters {params:,} (dense {dense:,}; {1 - params / dense:+.2%} removed)")
    print(f"wrote {args.out}")
    return 0


IN_MEMORY_FACTOR = 4  # slicing in memory peaks at about 4x the float32 model (SmolLM2-135M: 2.1 GiB for 0.54 GB)


def _streams(args: argparse.Namespace) -> bool:
    """Whether `slice` streams: asked for, or (auto) the in-memory run would not fit the available memory."""
    if args.stream != "auto":
        return args.stream == "yes"
    import psutil

    from helpers.infra.shards import CheckpointReader
    from helpers.models.loading import resolve_model

    source = Path(resolve_model(args.model))
    if not source.is_dir():
        return False
    reader = CheckpointReader(source)
    float32_bytes = reader.numel() * 4
    if IN_MEMORY_FACTOR * float32_bytes <= psutil.virtual_memory().available:
        return False
    print(f"the model is {float32_bytes / 2**30:.1f} GiB in float32: slicing streams it one layer at a time")
    return True


def _slice_streamed(args: argparse.Namespace, rule: str) -> int:
    """`slice --stream`: constant slicing of a checkpoint folder, one layer in memory at a time."""
    from transformers import AutoConfig, AutoTokenizer

    from helpers.compression.allocation import ModelShape, constant_dims
    from helpers.compression.streaming import check_fits, stream_memory, stream_slice
    from helpers.infra.shards import CheckpointReader
    from helpers.infra.textdata import load_windows
    from helpers.models.loading import pick_device, resolve_model, with_bos

    if rule != "constant":
        raise ValueError(
            "--stream slices at a constant SP: another rule (--sb, --rule) needs scores of the whole model."
        )
    source = Path(resolve_model(args.model))
    if not source.is_dir():
        raise ValueError(f"--stream reads safetensors from a local folder; {args.model!r} is not one.")
    config = AutoConfig.from_pretrained(source)
    dims = [int(d) for d in constant_dims(ModelShape.from_config(config), args.sp)]
    memory = stream_memory(
        config, args.calib_windows, args.calib_seqlen, args.batch_size, on_disk=bool(args.offload_dir)
    )
    device = pick_device(args.device)
    print(f"predicted peak memory of the streamed run (docs/streaming.md):\n{memory.describe(device.type == 'cuda')}")
    limit = None if args.max_memory is None else int(args.max_memory * 2**30)
    check_fits(memory, device, limit)
    tokenizer = with_bos(config, AutoTokenizer.from_pretrained(source))
    calib = load_windows(tokenizer, args.calib, args.calib_seqlen, args.calib_windows)
    info = stream_slice(
        source,
        args.out,
        calib,
        dims,
        tokenizer=tokenizer,
        tied={"auto": None, "tied": True, "untied": False}[args.layout],
        batch_size=args.batch_size,
        device=device,
        offload_dir=args.offload_dir,
        final_dim=int(dims[-1]) if args.final_dim == "last" else args.final_dim,
        memory_limit=limit,
    )
    params, dense = CheckpointReader(args.out).numel(), CheckpointReader(source).numel()  # stored tensors, ties once
    print(f"dims per layer: {dims}")
    print(f"layout {'tied' if info.tied else 'untied'}; the head reads {info.final_dim} dimensions (streamed)")
    print(f"parameters {params:,} (dense {dense:,}; {1 - params / dense:+.2%} removed)")
    print(f"wrote {args.out}")
    return 0


def _ppl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder (dense or sliced) or Hugging Face id")
    p.add_argument("--text", default=EVAL_TEXT, help="text name or .txt file")
    p.add_argument("--seqlen", type=positive_int, default=512)
    p.add_argument("--windows", type=count, default=32, help="number of windows (0: every full window)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--stream", action="store_true", help="one layer in memory at a time (a model bigger than memory)")
    _out_args(p, None, "JSON file for perplexity, tokens, params")


@command("ppl", _ppl_args)
def run_ppl(args: argparse.Namespace) -> int:
    """Perplexity (non-overlapping windows, BOS as the family wants) and the realised parameter count."""
    from helpers.compression.checkpoints import load_model
    from helpers.compression.ledger import ledger_totals, parameter_ledger
    from helpers.evaluation.perplexity import perplexity
    from helpers.infra.storage import write_json_atomic

    if args.stream:
        result, params = _ppl_streamed(args)
    else:
        model, tokenizer = load_model(args.model)
        result = perplexity(model, tokenizer, args.text, args.seqlen, args.windows or None, args.batch_size)
        params = ledger_totals(parameter_ledger(model))["total"]
    bos = "BOS first" if result.bos else "no BOS"
    print(f"perplexity {result.perplexity:.3f} on {args.text} ({result.windows} x {result.seqlen} tokens, {bos})")
    print(f"parameters {params:,}")
    if args.out:
        write_json_atomic(args.out, {**result.as_dict(), "params": params, "model": args.model, "text": args.text})
        print(f"wrote {args.out}")
    return 0


def _ppl_streamed(args: argparse.Namespace):
    """`ppl --stream`: perplexity of a checkpoint folder, one decoder layer in memory at a time, and its parameters."""
    from transformers import AutoConfig, AutoTokenizer

    from helpers.evaluation.streamed import streamed_perplexity
    from helpers.infra.shards import CheckpointReader
    from helpers.infra.textdata import load_windows
    from helpers.models.loading import resolve_model, with_bos

    source = Path(resolve_model(args.model))
    if not source.is_dir():
        raise ValueError(f"--stream reads safetensors from a local folder; {args.model!r} is not one.")
    tokenizer = with_bos(AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source))
    ids = load_windows(tokenizer, args.text, args.seqlen, args.windows or None)
    return streamed_perplexity(source, ids, args.batch_size), CheckpointReader(source).numel()


def _speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder (sliced/pruned too) or Hugging Face id")
    p.add_argument("--text", default=EVAL_TEXT, help="text the prompts are cut from")
    p.add_argument("--prompt", type=positive_int, default=128, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--batch-sizes", type=positive_ints, default=[1, 16], help="comma-separated generation batch sizes")
    p.add_argument("--json", action="store_true", help="print one JSON line (for scripts)")


@command("speed", _speed_args)
def run_speed(args: argparse.Namespace) -> int:
    """Prefill throughput, generation tokens/s per batch size and peak memory of one model, in this process."""
    import json

    from helpers.compression.checkpoints import load_model
    from helpers.compression.ledger import ledger_totals, parameter_ledger
    from helpers.evaluation.speed import device_name, generation_speed, prefill_throughput
    from helpers.infra.textdata import load_windows

    batch_sizes = args.batch_sizes
    model, tokenizer = load_model(args.model)
    prompts = load_windows(tokenizer, args.text, args.prompt, max(batch_sizes))
    row = {"device": device_name(model.device), "params": ledger_totals(parameter_ledger(model))["total"]}
    row.update(prefill_throughput(model, prompts[:1], repeats=3))
    for batch in batch_sizes:
        result = generation_speed(model, prompts, args.new_tokens, batch)
        row[f"tokens_per_s_b{batch}"] = result["generation_tokens_per_s"]
        row[f"ms_per_token_b{batch}"] = result["latency_per_token_ms"]
        row[f"peak_mb_b{batch}"] = result["peak_memory_mb"]  # resident memory while generating
    print(json.dumps(row) if args.json else "\n".join(f"{k:>22}: {v}" for k, v in row.items()))
    return 0


def _reproduce_args(p: argparse.ArgumentParser) -> None:
    from helpers.experiments.executors import EXECUTORS
    from helpers.experiments.presets import SIZES

    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument("--size", choices=sorted(SIZES), default="reduced", help="reduced: < 30 min on 2 CPU cores")
    p.add_argument("--out", type=Path, default=None, help="output folder: new, empty or an earlier reproduce output")
    p.add_argument("--no-depth", action="store_true", help="skip the depth-pruning comparison")
    p.add_argument("--rules", action="store_true", help="also compare allocation and SB selection rules")
    p.add_argument("--check", action="store_true", help="recompute a sample of the committed cells, report the gap")
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="inprocess",
        help="where sweep cells run: this process, local jobs, a SLURM job array (submitit), Ray tasks",
    )


@command("reproduce", _reproduce_args)
def run_reproduce(args: argparse.Namespace) -> int:
    """Regenerate every figure and table (with a manifest) into figures/; resumable."""
    import dataclasses

    from helpers.experiments.presets import SIZES
    from helpers.experiments.reproduce import check, reproduce
    from helpers.infra.storage import FIGURES_DIR

    settings = dataclasses.replace(SIZES[args.size], model=args.model)
    if args.no_depth:
        settings = dataclasses.replace(settings, depth=False)
    if args.rules:
        settings = dataclasses.replace(settings, rules=True)
    if args.check:
        from helpers.infra.integrity import machine_name

        gaps = check(settings, args.out or FIGURES_DIR)
        print(f"against the committed cells, on {machine_name()}:")
        print(f"  parameters and perplexity: largest relative difference {gaps['relative']:.2e}")
        points = gaps["accuracy_points"]
        print(f"  accuracy: largest difference {points:.1f} points (bfloat16 scoring: another CPU flips near ties)")
        return 0
    reproduce(settings, args.out or FIGURES_DIR, executor=args.executor)
    if settings.rules:  # the rules step builds on reproduce's cells (cached), in the same folder and manifest
        from helpers.experiments.rules_report import run_rules as rules_step

        rules_step(settings, args.out or FIGURES_DIR)
    return 0


def _rules_args(p: argparse.ArgumentParser) -> None:
    from helpers.experiments.presets import SIZES

    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument("--size", choices=sorted(SIZES), default="reduced", help="the reproduce sizes to run at")
    p.add_argument("--sps", type=fraction, nargs="+", default=None, help="SPs to compare (default: the size's)")
    p.add_argument("--sb-step", type=step_fraction, default=None, help="SB grid step (default: the size's)")
    p.add_argument("--sb-only", action="store_true", help="compare only the SB selection rules (no allocation rules)")
    p.add_argument("--out", type=Path, required=True, help="output folder (e.g. data/rules_run); tables and figure")


@command("rules", _rules_args)
def run_rules(args: argparse.Namespace) -> int:
    """Compare allocation rules at matched size and SB selection rules on unseen data; resumable."""
    import dataclasses

    from helpers.experiments.presets import SIZES
    from helpers.experiments.rules_report import run_rules as run

    settings = dataclasses.replace(SIZES[args.size], model=args.model)
    sps = tuple(args.sps or settings.rules_sps)
    step = args.sb_step or settings.sb_step
    run(dataclasses.replace(settings, sps=sps, rules_sps=sps, sb_step=step), args.out, allocation=not args.sb_only)
    print(f"{'SB selection' if args.sb_only else 'allocation and SB selection'} rules written to {args.out}")
    return 0


def _outputs(args: argparse.Namespace) -> list[tuple[Path, str | None]]:
    """Every path the command will write that the user named, with its kind (None: a file)."""
    from helpers.infra.storage import FIGURE_SUFFIXES, figure_stem

    out = getattr(args, "out", None)
    if out is None or args.command in ("reproduce", "rules"):
        return []
    paths = [(out, args.out_kind)]
    if args.command == "lr" or (args.command == "allocate" and args.plot is True):
        paths += [(figure_stem(out).with_suffix(s), None) for s in FIGURE_SUFFIXES]
    if args.command == "allocate" and isinstance(args.plot, str):
        paths += [(Path(args.plot).with_suffix(s), None) for s in FIGURE_SUFFIXES]
    if args.command == "prune" and args.replacement != "none":
        paths += [(_loss_plot(out).with_suffix(s), None) for s in FIGURE_SUFFIXES]
    return paths


def _check_text(name: str | None, flag: str) -> None:
    """A text argument must be a known name or an existing file (not a folder) that decodes (UTF-8 or --encoding)."""
    from helpers.infra.textdata import read_text_file, text_sources

    if name is None or name in text_sources():
        return
    path = Path(name).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {name} is a folder; give a .txt file or one of {', '.join(text_sources())}.")
    if not path.is_file():
        raise ValueError(f"Unknown text {name!r} for {flag}: use a .txt file or one of {', '.join(text_sources())}.")
    read_text_file(path)  # undecodable bytes are named now, not after the model loads


# Commands that build on an uncompressed model, and why; the others (ppl, zeroshot, speed) take any kind.
NEEDS_DENSE = {
    "lr": "Layer Redundancy is measured on the uncompressed model",
    "slice": "slicing starts from the uncompressed model",
    "prune": "depth pruning starts from the uncompressed model",
    "allocate": "the allocation needs the uncompressed model's shape and parameter count",
    "compare": "the comparison compresses the model itself",
    "reproduce": "the experiments compress the model themselves",
    "rules": "the experiments compress the model themselves",
}
TEXT_COMMANDS = ("lr", "prune", "slice", "ppl", "speed")  # commands that read a text (get --encoding)


def _check_out(args: argparse.Namespace) -> None:
    """`--out` becomes a Path; a file output may not be spelled as a folder, a results folder must be writable."""
    from helpers.infra.storage import FIGURES_DIR, probe_folder

    out = getattr(args, "out", None)
    if isinstance(out, str):
        if out.endswith(("/", os.sep)) and args.out_kind is None:
            raise ValueError(f"--out {out} names a folder, but {args.command} writes a file; give a file path.")
        args.out = out = Path(out)
    if args.command not in ("reproduce", "rules"):
        return
    target = out or FIGURES_DIR
    foreign = target.exists() and not (target / "manifest.json").is_file()
    if foreign and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"--out {target} is not empty and not an earlier reproduce output (no manifest.json).")
    if getattr(args, "check", False) and not (target / "sweep_cells.csv").is_file():
        raise ValueError(f"--out {target} holds no sweep_cells.csv to check; give a folder reproduce wrote.")
    probe_folder(target, f"Cannot write --out {target}")


def _check_model_kind(args: argparse.Namespace, source: str) -> None:
    """A command that builds on an uncompressed model refuses a sliced or pruned one, in one line, before any work."""
    from helpers.models.loading import model_kind

    kind = model_kind(source)
    if kind != "dense" and args.command in NEEDS_DENSE:
        raise ValueError(
            f"--model {args.model} is a {kind} model; {args.command} needs a dense one "
            f"({NEEDS_DENSE[args.command]}): give the model it was made from."
        )


def preflight(args: argparse.Namespace) -> None:
    """Check every argument, input, output path and the device before any model loads or computing starts."""
    import codecs

    from transformers import AutoConfig

    from helpers.infra.integrity import check_calibration_tokens, check_device, check_final_dim
    from helpers.infra.storage import check_not_input, check_output, probe_folder
    from helpers.models.loading import KNOWN_MODELS, MODELS_DIR, UnknownModelError, resolve_model

    if os.environ.get("HELPERS_DEVICE"):
        check_device(os.environ["HELPERS_DEVICE"], "HELPERS_DEVICE")
    if getattr(args, "device", None):
        check_device(args.device, "--device")
    if getattr(args, "encoding", None):
        try:
            codecs.lookup(args.encoding)
        except LookupError:
            raise ValueError(
                f"--encoding {args.encoding!r} is not a text encoding Python knows (e.g. latin-1)."
            ) from None
    for flag in ("text", "calib", "lr_text"):
        _check_text(getattr(args, flag, None), "--" + flag.replace("_", "-"))
    lr_file = getattr(args, "lr", None)
    if lr_file is not None and not lr_file.is_file():
        raise ValueError(f"--lr {lr_file} is {'a folder' if lr_file.is_dir() else 'missing'}; give an LR CSV file.")
    if args.command == "recover":
        _preflight_recover(args)
    _check_out(args)
    offload = getattr(args, "offload_dir", None)
    if offload is not None:
        if offload.exists() and not offload.is_dir():
            raise ValueError(f"--offload-dir {offload} is a file; give a folder for the calibration activations.")
        probe_folder(offload, f"Cannot use --offload-dir {offload}")
    inputs = [getattr(args, k, None) for k in ("model", "text", "calib", "lr_text", "lr")]
    if getattr(args, "model", None) in KNOWN_MODELS:
        inputs.append(MODELS_DIR / args.model)  # the cached weights folder is an input too
    for path, kind in _outputs(args):
        check_output(path, args.overwrite, kind)
        check_not_input(path, *inputs)
    if getattr(args, "model", None) is not None:
        source = resolve_model(args.model)
        if Path(source).exists() and not (Path(source) / "config.json").is_file():
            raise ValueError(f"--model {args.model} is a folder without config.json, not a saved model.")
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise UnknownModelError(f"Could not read a config for --model {args.model!r}: {err}") from err
        _check_model_kind(args, source)
        if args.command == "slice":
            tokens = args.calib_seqlen * args.calib_windows
            check_calibration_tokens(tokens, config.hidden_size, args.allow_few_tokens)
            if isinstance(args.final_dim, int) and args.final_dim > config.hidden_size:
                raise ValueError(f"--final-dim {args.final_dim} exceeds the hidden size {config.hidden_size}.")
            if isinstance(args.final_dim, int):
                check_final_dim(args.final_dim, config.hidden_size)


def _book_args(p: argparse.ArgumentParser) -> None:
    from helpers.ui.book import DEFAULT_OUT, MODES

    p.add_argument("--mode", choices=sorted(MODES), default="reduced", help="fast: HELPERS_FAST=1, as CI runs it")
    _out_args(p, "book", f"build folder (default {DEFAULT_OUT}; the site lands in OUT/_build/html)")


@command("book", _book_args)
def run_book(args: argparse.Namespace) -> int:
    """Execute every lesson once and build the static site (Jupyter Book) with the gallery and tables."""
    from helpers.ui.book import DEFAULT_OUT, build

    report = build(args.mode, args.out or DEFAULT_OUT)
    for name, seconds in report.seconds.items():
        print(f"{name}: {seconds:.0f} s" + "".join(f"\n  {e}" for e in report.errors.get(name, [])))
    print(f"site: {report.html / 'index.html'}")
    return 1 if any(report.errors.values()) else 0


def _lab_args(p: argparse.ArgumentParser) -> None:
    from helpers.ui.lab import DEFAULT_PORT

    p.add_argument("--port", type=positive_int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "jupyter_args",
        nargs=argparse.REMAINDER,
        help="JupyterLab options after `--`, e.g. -- --no-browser --IdentityProvider.token=''",
    )


@command("lab", _lab_args)
def run_lab(args: argparse.Namespace) -> int:
    """Start JupyterLab on the lessons (127.0.0.1 only, JupyterLab's token kept); it prints the URL to open."""
    from helpers.ui.lab import lab_command, lab_env

    extra = args.jupyter_args[1:] if args.jupyter_args[:1] == ["--"] else args.jupyter_args
    command = lab_command(args.port, extra)
    print(f"JupyterLab on http://127.0.0.1:{args.port}/lab (the URL with its token follows); Ctrl-C stops it.")
    sys.stdout.flush()
    os.execve(command[0], command, lab_env())  # JupyterLab replaces this process: Ctrl-C goes straight to it


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: every command is listed, only the one `argv` names gets its arguments.

    Some commands' argument lists import their stage (choices such as reproduce's
    sizes); building only the named one keeps `slice`, `--help` and argument errors
    from importing the book builder and matplotlib.
    """
    named = next((a for a in argv if not a.startswith("-")), None)
    parser = Parser(prog="python -m helpers", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details; show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, func) in COMMANDS.items():
        p = sub.add_parser(name, help=(func.__doc__ or "").split("\n")[0])
        if name == named:
            add_arguments(p)
            if name in TEXT_COMMANDS:
                p.add_argument(
                    "--encoding", default=None, help="decode .txt files with this codec (default: strict UTF-8)"
                )
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; any error is one line on stderr and exit code 2 (a traceback only with -v)."""
    verbose = False
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(argv).parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        from helpers.infra.storage import output_claims
        from helpers.infra.textdata import text_encoding

        with output_claims(), text_encoding(getattr(args, "encoding", None)):
            preflight(args)
            return args.func(args)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except KeyboardInterrupt:
        print("error: interrupted; any output being written was discarded, earlier outputs are intact", file=sys.stderr)
        return 130
    except Exception as err:
        if verbose:
            raise
        label = "" if isinstance(err, (ValueError, FileNotFoundError)) else f"{type(err).__name__}: "
        print(f"error: {label}{' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 2
