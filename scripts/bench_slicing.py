"""Slicing benchmark: wall time and peak memory of slicing, perplexity dense vs constant vs dynamic, speed.

    python scripts/bench_slicing.py            # SmolLM2-135M, 30%, calib 64 x 512, eval 16 x 512, SB step 0.05
    python scripts/bench_slicing.py --quick    # calib 4 x 128, eval 2 x 128, SB in {SP, 0}
    python scripts/bench_slicing.py --slicing-only   # only the timed slicing (CPU-seconds, wall, peak RSS)

Dynamic slicing's SB is chosen by the SB sweep (lowest perplexity on --select, a book other than
--eval). Parameter counts come from the ledger; compression is against the dense model as shipped.
Writes data/runs/bench_slicing.json and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
import torch

from helpers.analysis.redundancy import cached_layer_redundancy
from helpers.compression.allocation import ModelShape, constant_dims
from helpers.compression.checkpoints import load_model
from helpers.compression.ledger import compression, ledger_totals, parameter_ledger
from helpers.compression.slicing import rotate_and_slice
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.evaluation.speed import device_name, generation_speed
from helpers.experiments.sweeps import sb_sweep
from helpers.infra.memory import peak_memory_mb, reset_peak_memory
from helpers.infra.storage import RUNS_DIR, write_json_atomic
from helpers.infra.textdata import CALIB_TEXT, EVAL_TEXT, load_windows
from helpers.models.loading import DEFAULT_MODEL, pick_device


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sp", type=float, default=0.3)
    p.add_argument("--calib", default=CALIB_TEXT)
    p.add_argument("--select", default="war-of-the-worlds", help="book that picks SB")
    p.add_argument("--eval", default=EVAL_TEXT, help="held-out book for perplexity")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--sb-step", type=float, default=0.05)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--offload-dir", default=None, help="keep calibration activations on disk here while slicing")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--slicing-only", action="store_true", help="stop after timing the slicing (no sweep, no speed)")
    p.add_argument("--out", default=str(RUNS_DIR / "bench_slicing.json"))
    args = p.parse_args()
    if args.quick:
        args.calib_windows, args.calib_seqlen, args.eval_windows, args.eval_seqlen = 4, 128, 2, 128
        args.sb_step, args.new_tokens = args.sp, 8
    return args


def speed_rows(name: str, model, prompts: torch.Tensor, new_tokens: int) -> list[dict]:
    return [{"model": name, **generation_speed(model, prompts, new_tokens, batch)} for batch in (1, 16)]


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device()
    model, tok = load_model(args.model, device="cpu")
    calib = load_windows(tok, args.calib, args.calib_seqlen, args.calib_windows)
    select = load_windows(tok, args.select, args.eval_seqlen, args.eval_windows)
    held_out = load_windows(tok, args.eval, args.eval_seqlen, args.eval_windows)
    prompts = load_windows(tok, args.eval, 64, 16)
    dense_params = ledger_totals(parameter_ledger(model))["total"]

    # 1. constant slicing (the allocation at SB = SP: same realised mean as dynamic): time and memory
    lr = cached_layer_redundancy(args.model, args.calib, args.calib_seqlen, args.calib_windows)["lr"].to_numpy()
    dims = constant_dims(ModelShape.from_config(model.config), args.sp).tolist()
    sliced = copy.deepcopy(model)
    reset_peak_memory(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    rotate_and_slice(sliced, calib, dims, device=device, offload_dir=args.offload_dir)
    slicing = {
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,
        "peak_memory_mb": peak_memory_mb(device),
        "activations": "disk" if args.offload_dir else "memory",
    }
    slicing.update(calib=f"{args.calib} {args.calib_windows}x{args.calib_seqlen}", device=device_name(device))
    print(f"slicing {args.model} at {args.sp:.0%}: {slicing}", flush=True)  # before the long sweep below
    if args.slicing_only:
        write_json_atomic(args.out, {"args": vars(args), "slicing": slicing})
        print(f"wrote {args.out}")
        return

    # 2. perplexity: dense, constant, dynamic with SB picked by the sweep
    sweep = sb_sweep(model, lr, args.sp, calib, select, step=args.sb_step, eval_ids=held_out, size="nominal")
    best = sweep[sweep["best"]].iloc[0]
    model.to(device)
    sliced.to(device)
    rows = [
        {"method": "dense", "sb": None, "mean_slice": 0.0, "params": dense_params},
        {"method": "constant", "sb": args.sp, "mean_slice": 1 - sum(dims) / len(dims) / model.config.hidden_size},
        {"method": f"dynamic (SB={best['sb']:g})", "sb": best["sb"], "mean_slice": best["mean_slice"]},
    ]
    rows[0]["perplexity"] = perplexity_on_ids(model, held_out, desc="dense").perplexity
    rows[1]["params"] = ledger_totals(parameter_ledger(sliced))["total"]
    rows[1]["perplexity"] = perplexity_on_ids(sliced, held_out, desc="constant").perplexity
    rows[2]["params"], rows[2]["perplexity"] = int(best["params"]), float(best["eval_perplexity"])
    quality = pd.DataFrame(rows)
    quality["compression"] = [compression(n, dense_params) for n in quality["params"]]

    # 3. generation speed, dense vs constant-sliced
    speed = pd.DataFrame(
        speed_rows("dense", model, prompts, args.new_tokens)
        + speed_rows(f"sliced {args.sp:.0%}", sliced, prompts, args.new_tokens)
    )

    print(f"\nSB sweep (perplexity on {args.select}, eval on {args.eval}):\n{sweep.to_string(index=False)}")
    print(f"\nperplexity on {args.eval} ({args.eval_windows} x {args.eval_seqlen}, no BOS):")
    print(quality.to_string(index=False))
    print(f"\ngeneration ({args.new_tokens} new tokens, 64-token prompts, greedy, KV cache):")
    print(speed.to_string(index=False))
    result = {
        "args": vars(args),
        "slicing": slicing,
        "sweep": sweep.to_dict("records"),
        "quality": quality.to_dict("records"),
        "speed": speed.to_dict("records"),
    }
    write_json_atomic(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
