"""Speed benchmark: dense vs constant vs dynamic slicing, float32 and bfloat16, interleaved repeats.

    python scripts/bench_speed.py              # SmolLM2-135M, SP 0.30, 5 repeats, 1 thread per model
    python scripts/bench_speed.py --quick      # 2 repeats, short prompts: a smoke run
    python scripts/bench_speed.py --sliced-head  # also constant slicing with the last residual sliced (final_dim)
    python scripts/bench_speed.py --modes eager,compiled  # also every model under torch.compile, static KV cache
    python scripts/bench_speed.py --products-only  # FLOPs and the layer products' FLOP rates, no workloads

Each model runs in its own worker process (fixed torch threads, one warm-up round);
every round asks each worker once per workload, in a rotated order, so the load of a
shared machine hits all models alike. Prefill is prompt -> next-token logits at 1 x 512
and 8 x 512 tokens; generation is greedy `generate` (KV cache) of 64 new tokens after a
32-token prompt at batch 1 and 16. Ratios pair each sample with dense's from the same
round. CUDA is used when present. Sliced models are sliced once (calibration 32 x 256
tokens) and kept under data/sliced/bench_speed/. The table opens with each model's FLOPs
(a prefill, one token's forward) and the speed-ups they allow at equal FLOP rates (the
ceilings), then times the decoder layers' products alone to show whether narrower products
run at dense's FLOP rate. Under the speed table, one generated reading per sliced model and
workload (as under the reproduce command's). Writes data/runs/speed_table.{csv,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pandas as pd
import torch

from helpers.compression.checkpoints import load_model
from helpers.evaluation.speed import (
    MODES,
    WORKLOADS,
    device_name,
    flop_markdown,
    flop_table,
    interleaved_benchmark,
    product_markdown,
    product_rates,
    product_summary,
    speed_markdown,
    summarise,
)
from helpers.experiments.readings import read_speed_table
from helpers.infra.storage import DATA_DIR, RUNS_DIR, slug, write_csv_atomic, write_text_atomic
from helpers.infra.textdata import CALIB_TEXT
from helpers.models.loading import DEFAULT_MODEL, pick_device


def sliced_folder(
    model_name: str, sp: float, sb: float, calib: str, windows: int, seqlen: int, sliced_head: bool = False
) -> Path:
    """Slice the dense model once at (SP, SB) and return the saved folder; `sliced_head`: final_dim = last dim."""
    from helpers.analysis.redundancy import cached_layer_redundancy
    from helpers.compression.allocation import ModelShape, constant_dims, layer_allocation
    from helpers.compression.sliced_io import save_sliced
    from helpers.compression.slicing import rotate_and_slice
    from helpers.infra.textdata import load_windows

    name = f"{slug(model_name)}-sp{sp:g}-sb{sb:g}-{calib}-{windows}x{seqlen}" + ("-sliced-head" if sliced_head else "")
    folder = DATA_DIR / "sliced" / "bench_speed" / name
    if (folder / "slicing.json").exists():
        return folder
    model, tokenizer = load_model(model_name, device="cpu")
    shape = ModelShape.from_config(model.config)
    if sb == sp:
        dims = constant_dims(shape, sp).tolist()
    else:  # nominal size: the folders docs/speed.md measured
        lr = cached_layer_redundancy(model_name, calib, seqlen, windows, loaded=(model, tokenizer))
        dims = layer_allocation(lr["lr"].to_numpy(), sp, sb, shape, "nominal").kept_dim.tolist()
    final_dim = dims[-1] if sliced_head else None
    rotate_and_slice(model, load_windows(tokenizer, calib, seqlen, windows), dims, final_dim=final_dim)
    return save_sliced(model, tokenizer, folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sp", type=float, default=0.3)
    p.add_argument("--sb", type=float, default=0.0, help="base slice of the dynamic model")
    p.add_argument("--calib", default=CALIB_TEXT)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="eager", help="eager and/or compiled (torch.compile + static KV cache)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every worker (fixed)")
    p.add_argument("--prefill-len", type=int, default=512, help="prefill prompt length (a busy machine: smaller)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--quick", action="store_true", help="2 repeats, 64-token prompts, 8 new tokens")
    p.add_argument("--sliced-head", action="store_true", help="add constant slicing with final_dim (V x d' head)")
    p.add_argument("--products-only", action="store_true", help="stop after the FLOP and layer-product tables")
    p.add_argument("--out", type=Path, default=RUNS_DIR / "speed_table")
    args = p.parse_args()
    if not set(args.modes.split(",")) <= set(MODES):
        p.error(f"--modes takes {' and/or '.join(MODES)}, got {args.modes!r}")
    if args.quick:
        args.repeats, args.prefill_len, args.new_tokens = 2, 64, 8
    workloads = tuple(
        dataclasses.replace(w, length=args.prefill_len)
        if w.kind == "prefill"
        else dataclasses.replace(w, new_tokens=args.new_tokens)
        for w in WORKLOADS
    )
    models = {
        "dense": args.model,
        f"constant SP={args.sp:g}": str(sliced_folder(args.model, args.sp, args.sp, args.calib, 32, 256)),
        f"dynamic SP={args.sp:g} SB={args.sb:g}": str(sliced_folder(args.model, args.sp, args.sb, args.calib, 32, 256)),
    }
    if args.sliced_head:
        folder = sliced_folder(args.model, args.sp, args.sp, args.calib, 32, 256, sliced_head=True)
        models[f"constant SP={args.sp:g}, sliced head"] = str(folder)
    header = (
        f"Model {args.model}; {device_name(pick_device(None), threads=False)}, "
        f"{args.threads} torch thread(s) per worker; {args.repeats} interleaved repeats after one warm-up; "
        "median [interquartile range]; ratio = per-round tokens/s over dense's.\n"
        f"Command: python {' '.join(sys.argv)}\n\n"
    )
    loaded = {label: load_model(source, device="cpu")[0] for label, source in models.items()}
    header += (
        "FLOPs (matrix products counted by torch.utils.flop_counter, causal attention from the config; one token's "
        "forward = a decoding step's products per sequence); ceiling = dense's FLOPs over the model's: the speed-up "
        "if every FLOP ran at the same rate (docs/method.md section 7).\n\n"
        + flop_markdown(flop_table(loaded, args.prefill_len), args.prefill_len)
        + "\n"
    )
    torch.set_num_threads(args.threads)  # as in every worker
    rows = [w.batch * w.length for w in workloads if w.kind == "prefill"]  # the prefill workloads' token counts
    products = [product_rates(loaded, n, dtype) for dtype in args.dtypes.split(",") for n in rows]
    header += (
        "Layer products alone (every linear layer of the decoder layers on random rows, as many as a prefill's "
        f"tokens; this process, {args.threads} thread(s), a warm-up, then n interleaved rounds): a time ratio below "
        "the FLOP ratio means the narrower products ran at a lower FLOP rate than dense's.\n\n"
        + product_markdown(product_summary(pd.concat(products)))
        + "\n"
    )
    del loaded  # the workloads run in worker processes
    if args.products_only:
        write_text_atomic(args.out.with_suffix(".md"), header)
        print(header + f"wrote {args.out.with_suffix('.md')}")
        return
    samples = []
    runs = [(dtype, mode) for mode in args.modes.split(",") for dtype in args.dtypes.split(",")]
    for dtype, mode in runs:  # tables are rewritten after each run, so a stopped benchmark keeps its part
        samples.append(interleaved_benchmark(models, dtype, workloads, args.repeats, args.threads, mode=mode))
        summary = summarise(pd.concat(samples))
        text = header + speed_markdown(summary) + "\n" + read_speed_table(summary) + "\n"
        write_csv_atomic(summary, args.out.with_suffix(".csv"))
        write_text_atomic(args.out.with_suffix(".md"), text)
        print(text, flush=True)
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
