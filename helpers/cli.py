"""Command line: `python -m helpers COMMAND ...` runs the same pipeline as the notebooks."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from helpers.models import DEFAULT_MODEL

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register `func` as subcommand `name`, with `add_arguments` filling its parser."""

    def wrap(func: Command) -> Command:
        COMMANDS[name] = (add_arguments, func)
        return func

    return wrap


def _lr_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument("--text", default="gutenberg", help="text name (see textdata.text_sources) or a .txt file")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="CSV path (default figures/lr_MODEL.csv)")


@command("lr", _lr_args)
def run_lr(args: argparse.Namespace) -> int:
    """Compute Layer Redundancy and write the CSV plus a plot of the curve next to it."""
    from helpers import plots
    from helpers.redundancy import cached_layer_redundancy
    from helpers.storage import FIGURES_DIR, slug, write_csv_atomic

    table = cached_layer_redundancy(args.model, args.text, args.seqlen, args.windows, args.batch_size)
    out = args.out or FIGURES_DIR / f"lr_{slug(args.model)}.csv"
    write_csv_atomic(table, out)
    fig = plots.plot_lr_curve(table, title=f"Layer Redundancy: {args.model} on {args.text}")
    written = plots.save_figure(fig, out)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {out} and {', '.join(map(str, written))}")
    return 0


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument("--method", choices=("shortgpt", "gromov", "streamline"), default="streamline")
    p.add_argument("--n", type=int, default=4, help="number of layers to remove")
    p.add_argument("--replacement", choices=("none", "ffn", "swiglu", "layer"), default="none")
    p.add_argument("--calib", default="gutenberg", help="calibration text name or .txt file")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=32, help="calibration windows for the block scores")
    p.add_argument("--train-windows", type=int, default=32, help="windows to train the replacement on")
    p.add_argument("--val-windows", type=int, default=8, help="held-out windows for early stopping")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--out", type=Path, required=True, help="folder for the pruned model")


@command("prune", _prune_args)
def run_prune(args: argparse.Namespace) -> int:
    """Depth-prune a model (ShortGPT, angular distance or LLM-Streamline) and save it as a loadable folder."""
    from helpers import plots
    from helpers.depth import cached_block_scores, parameter_count, save_pruned
    from helpers.models import load_model
    from helpers.replacement import prune_model
    from helpers.textdata import load_windows

    model, tokenizer = load_model(args.model)
    before = parameter_count(model)
    scores = cached_block_scores(args.model, args.calib, args.seqlen, args.windows, model=model, tokenizer=tokenizer)
    train = val = None
    if args.replacement != "none":  # windows after the scoring ones, so the replacement sees fresh text
        ids = load_windows(tokenizer, args.calib, args.seqlen, args.windows + args.train_windows + args.val_windows)
        train, val = ids[args.windows : args.windows + args.train_windows], ids[args.windows + args.train_windows :]
    model, info, history = prune_model(
        model, scores, args.method, args.n, args.replacement, train, val, max_steps=args.max_steps
    )
    info.update(source=args.model, calib=args.calib, params_before=before, params_after=parameter_count(model))
    save_pruned(model, tokenizer, args.out, info)
    if history is not None:
        plots.save_figure(plots.plot_loss_curve(history), args.out.parent / f"{args.out.name}_loss.png")
        print(f"replacement val MSE {history['best_val_mse']:.4g} vs identity {history['identity_mse']:.4g}")
    print(f"removed layers {info['removed']}; parameters {before:,} -> {info['params_after']:,}; wrote {args.out}")
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument("--slice-fraction", type=float, default=0.25, help="constant slicing's SP; sets the budget")
    p.add_argument("--windows", type=int, default=32, help="calibration windows")
    p.add_argument("--task-limit", type=int, default=50, help="questions per zero-shot task")
    p.add_argument("--eval-windows", type=int, default=16, help="perplexity windows")
    p.add_argument("--max-steps", type=int, default=300, help="replacement training steps")


@command("compare", _compare_args)
def run_compare(args: argparse.Namespace) -> int:
    """Depth pruning vs slicing at matched parameter counts; writes figures/depth_comparison.{csv,md}."""
    from helpers.compare import CompareSettings, compare, write_table

    settings = CompareSettings(
        model=args.model,
        slice_fraction=args.slice_fraction,
        calib_windows=args.windows,
        task_limit=args.task_limit,
        eval_windows=args.eval_windows,
        max_steps=args.max_steps,
    )
    table, _ = compare(settings)
    written = write_table(table)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {', '.join(map(str, written))}")


def _allocate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lr", type=Path, required=True, help="LR CSV written by `helpers lr` (column lr)")
    p.add_argument("--sp", type=float, required=True, help="target mean slice fraction, e.g. 0.3")
    p.add_argument("--sb", type=float, required=True, help="base slice every layer gets, 0 <= SB <= SP")
    p.add_argument("--fs-max", type=float, default=0.95, help="largest slice any layer may get")
    p.add_argument("--multiple", type=int, default=8, help="kept dimensions are multiples of this (1: none)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model whose config gives d and the parameter count")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default figures/alloc_SP_SB.csv)")
    p.add_argument("--plot", nargs="?", const=True, default=None, help="also write Figure 1 (PNG+SVG); optional path")


@command("allocate", _allocate_args)
def run_allocate(args: argparse.Namespace) -> int:
    """Per-layer slice fractions and kept dimensions from LR scores for a mean slice SP and base slice SB."""
    from helpers import plots
    from helpers.allocation import ModelShape, allocate, allocation_table, param_summary, read_lr_csv
    from helpers.storage import FIGURES_DIR, write_csv_atomic

    shape = ModelShape.from_pretrained(args.model)
    lr = read_lr_csv(args.lr)
    if lr.size != shape.n_layers:
        raise ValueError(f"{args.lr} has {lr.size} layers but {args.model} has {shape.n_layers}; pass --model.")
    alloc = allocate(lr, args.sp, args.sb, shape.hidden_size, args.fs_max, args.multiple)
    out = args.out or FIGURES_DIR / f"alloc_sp{args.sp:g}_sb{args.sb:g}.csv"
    write_csv_atomic(allocation_table(alloc), out)
    counts = param_summary(shape, alloc.kept_dim)
    print(f"requested mean slice SP={args.sp:g} (SB={args.sb:g}); realised mean slice {alloc.realised_mean:.5f}")
    print(f"kept dims (d={shape.hidden_size}): {alloc.kept_dim.tolist()}")
    print(
        f"parameters: dense {counts['dense']:,} -> sliced {counts['sliced']:,} "
        f"({counts['removed_fraction']:.2%} removed; without embeddings and head "
        f"{counts['dense_body']:,} -> {counts['sliced_body']:,}, {counts['removed_fraction_body']:.2%} removed)"
    )
    print(f"wrote {out}")
    if args.plot:
        target = out if args.plot is True else Path(args.plot)
        title = f"{args.model}: SP={args.sp:g}, SB={args.sb:g}, realised {alloc.realised_mean:.4f}"
        written = plots.save_figure(plots.plot_allocation(alloc, title=title), target)
        print(f"wrote {', '.join(map(str, written))}")
    return 0


def _zeroshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder (sliced models too) or Hugging Face id")
    p.add_argument("--tasks", default="piqa,hellaswag,arc_easy,arc_challenge,winogrande", help="comma-separated")
    p.add_argument("--limit", type=int, default=None, help="score the first N questions of each task (default all)")
    p.add_argument("--batch-size", type=int, default=8, help="(context, option) rows per forward pass")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default figures/zeroshot_MODEL.json)")


@command("zeroshot", _zeroshot_args)
def run_zeroshot(args: argparse.Namespace) -> int:
    """Zero-shot multiple-choice accuracy (acc, acc_norm, n per task) in the lm-evaluation-harness convention."""
    from helpers.models import load_model
    from helpers.storage import FIGURES_DIR, slug, write_json_atomic
    from helpers.tasks import load_task
    from helpers.zeroshot import evaluate_task

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty; give a comma-separated list such as piqa,hellaswag")
    for task in tasks:  # fail on a bad task name or limit before loading the model
        load_task(task, 1 if args.limit is None else args.limit)
    model, tokenizer = load_model(args.model)
    summary = {task: evaluate_task(model, tokenizer, task, args.limit, args.batch_size).summary for task in tasks}
    out = args.out or FIGURES_DIR / f"zeroshot_{slug(args.model)}.json"
    write_json_atomic(out, {"model": args.model, "limit": args.limit, "split": "validation", "tasks": summary})
    print(f"{'task':<15}{'acc':>8}{'acc_norm':>10}{'n':>7}")
    for task, s in summary.items():
        norm = "-" if s["acc_norm"] is None else f"{s['acc_norm']:.4f}"
        print(f"{task:<15}{s['acc']:>8.4f}{norm:>10}{s['n']:>7}")
    print(f"wrote {out}")
    return 0


def _slice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument("--sp", type=float, required=True, help="mean slice fraction, e.g. 0.3")
    p.add_argument("--sb", type=float, default=None, help="base slice (default SP: constant slicing)")
    p.add_argument("--calib", default="pride-and-prejudice", help="text name or .txt file for calibration")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--lr-text", default=None, help="text for Layer Redundancy (default: the calibration text)")
    p.add_argument("--layout", choices=["auto", "tied", "untied"], default="auto", help="embedding layout")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="device for the current layer (default: CUDA if present)")
    p.add_argument("--out", type=Path, required=True, help="folder to write the sliced model to")


@command("slice", _slice_args)
def run_slice(args: argparse.Namespace) -> int:
    """Slice a model (constant when SB = SP, dynamic by Layer Redundancy otherwise) and save it."""
    from helpers.ledger import ledger_totals, parameter_ledger
    from helpers.models import load_model
    from helpers.slicing import allocation_dims, constant_dims, rotate_and_slice, save_sliced
    from helpers.textdata import load_windows

    sb = args.sp if args.sb is None else args.sb
    model, tokenizer = load_model(args.model, device="cpu")
    dense = ledger_totals(parameter_ledger(model))["total"]
    if sb == args.sp:
        dims = constant_dims(model, args.sp)
    else:
        from helpers.redundancy import cached_layer_redundancy

        lr_text = args.lr_text or args.calib
        lr = cached_layer_redundancy(args.model, lr_text, args.calib_seqlen, args.calib_windows, args.batch_size)
        dims = allocation_dims(lr["lr"].to_numpy(), args.sp, sb, model.config.hidden_size)
    calib = load_windows(tokenizer, args.calib, args.calib_seqlen, args.calib_windows)
    tied = {"auto": None, "tied": True, "untied": False}[args.layout]
    info = rotate_and_slice(model, calib, dims, tied=tied, batch_size=args.batch_size, device=args.device)
    save_sliced(model, tokenizer, args.out)
    params = ledger_totals(parameter_ledger(model))["total"]
    mean_slice = 1 - sum(dims) / (len(dims) * model.config.hidden_size)
    print(f"dims per layer: {dims}")
    print(f"realised mean slice {mean_slice:.4f}; layout {'tied' if info.tied else 'untied'}")
    print(f"parameters {params:,} (dense {dense:,}; {1 - params / dense:+.2%} removed)")
    print(f"wrote {args.out}")
    return 0


def _ppl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder (dense or sliced) or Hugging Face id")
    p.add_argument("--text", default="great-expectations", help="text name or .txt file")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=32, help="number of windows (0: every full window)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="JSON file for perplexity, tokens, params")


@command("ppl", _ppl_args)
def run_ppl(args: argparse.Namespace) -> int:
    """Perplexity (non-overlapping windows, BOS as the family wants) and the realised parameter count."""
    from helpers.evaluation import perplexity
    from helpers.ledger import ledger_totals, parameter_ledger
    from helpers.models import load_model
    from helpers.storage import write_json_atomic

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


def _speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder (sliced/pruned too) or Hugging Face id")
    p.add_argument("--text", default="great-expectations", help="text the prompts are cut from")
    p.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated generation batch sizes")
    p.add_argument("--json", action="store_true", help="print one JSON line (for scripts)")


@command("speed", _speed_args)
def run_speed(args: argparse.Namespace) -> int:
    """Prefill throughput, generation tokens/s per batch size and peak memory of one model, in this process."""
    import json

    from helpers.ledger import ledger_totals, parameter_ledger
    from helpers.models import load_model
    from helpers.speed import device_name, generation_speed, prefill_throughput
    from helpers.textdata import load_windows

    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes needs positive integers, got {args.batch_sizes!r}.")
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
    from helpers.reproduce import SIZES

    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, folder or Hugging Face id")
    p.add_argument("--size", choices=sorted(SIZES), default="reduced", help="reduced: < 30 min on 2 CPU cores")
    p.add_argument("--out", type=Path, default=None, help="output folder (default figures/)")
    p.add_argument("--no-depth", action="store_true", help="skip the depth-pruning comparison")


@command("reproduce", _reproduce_args)
def run_reproduce(args: argparse.Namespace) -> int:
    """Regenerate every figure and table (with a manifest) into figures/; resumable."""
    import dataclasses

    from helpers.reproduce import SIZES, reproduce
    from helpers.storage import FIGURES_DIR

    settings = dataclasses.replace(SIZES[args.size], model=args.model)
    if args.no_depth:
        settings = dataclasses.replace(settings, depth=False)
    reproduce(settings, args.out or FIGURES_DIR)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, func) in COMMANDS.items():
        p = sub.add_parser(name, help=(func.__doc__ or "").split("\n")[0])
        add_arguments(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
