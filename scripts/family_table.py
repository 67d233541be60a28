"""Dense vs constant vs dynamic slicing of one model at several SP: parameters from the ledger, perplexity.

    python scripts/family_table.py --model gemma3-270m            # the Gemma-3-270m table of docs/gemma3.md
    python scripts/family_table.py --model gemma3-270m --quick    # smoke run

Dynamic slicing uses LR on the calibration windows and one fixed SB for every SP (no SB sweep:
on a CPU the sweep multiplies the cost by the number of SB values). BOS as the family wants it
(Gemma 3: every window starts with it). Prints a Markdown table and writes it as JSON to --out.
"""

from __future__ import annotations

import argparse
import copy
import time

import pandas as pd
import torch

from helpers.analysis.redundancy import layer_redundancy
from helpers.compression.allocation import ModelShape, constant_dims, layer_allocation
from helpers.compression.checkpoints import load_model
from helpers.compression.ledger import ledger_totals, parameter_ledger
from helpers.compression.slicing import rotate_and_slice
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.infra.storage import write_json_atomic
from helpers.infra.textdata import CALIB_TEXT, load_windows


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--sps", default="0.2,0.25,0.3", help="comma-separated mean slice fractions")
    p.add_argument("--sb", type=float, default=0.1, help="base slice of the dynamic rows")
    p.add_argument("--calib", default=CALIB_TEXT)
    p.add_argument("--eval", default="war-of-the-worlds", help="held-out book for perplexity")
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="one SP, 2 x 64 tokens")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args()
    if args.quick:
        args.sps, args.calib_windows, args.eval_windows, args.seqlen = "0.25", 2, 2, 64
    return args


def row(name: str, model, eval_ids: torch.Tensor, dense_params: int | None, seconds: float) -> dict:
    totals = ledger_totals(parameter_ledger(model))
    ppl = perplexity_on_ids(model, eval_ids, batch_size=2, progress=False)
    return {
        "model": name,
        "params": totals["total"],
        "params_vs_dense": totals["total"] / (dense_params or totals["total"]),
        "body": totals["total"] - totals["embeddings"] - totals["head"],
        "post_norm_maps": totals["post_norm_maps"],
        "perplexity": ppl.perplexity,
        "bos": ppl.bos,
        "slice_seconds": round(seconds, 1),
    }


def main() -> None:
    args = parse()
    model, tokenizer = load_model(args.model, device="cpu")
    calib = load_windows(tokenizer, args.calib, args.seqlen, args.calib_windows)
    eval_ids = load_windows(tokenizer, args.eval, args.seqlen, args.eval_windows)
    lr = layer_redundancy(model, calib, batch_size=2, progress=False)["lr"].to_numpy()
    rows = [row("dense", model, eval_ids, None, 0.0)]
    dense = rows[0]["params"]
    shape = ModelShape.from_config(model.config)
    d = shape.hidden_size
    for sp in [float(v) for v in args.sps.split(",")]:
        dynamic = layer_allocation(lr, sp, args.sb, shape, "nominal").kept_dim  # the size docs/ reports
        for kind, dims in (("constant", constant_dims(shape, sp).tolist()), ("dynamic", dynamic.tolist())):
            sliced = copy.deepcopy(model)
            start = time.perf_counter()
            rotate_and_slice(sliced, calib, dims, batch_size=2, progress=False)
            label = f"{kind} {sp:.0%}" + (f" (SB={args.sb:g})" if kind == "dynamic" else f" (d={dims[0]})")
            rows.append(row(label, sliced, eval_ids, dense, time.perf_counter() - start))
            rows[-1]["realised_slice"] = 1 - sum(dims) / len(dims) / d
            del sliced
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(
        f"{args.model}; calibration {args.calib} {args.calib_windows} x {args.seqlen}, "
        f"perplexity on {args.eval} {args.eval_windows} x {args.seqlen} tokens, BOS first: {bool(table['bos'].all())}"
    )
    print(table.to_markdown(index=False, floatfmt=".3f"))
    if args.out:
        write_json_atomic(args.out, {"settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
