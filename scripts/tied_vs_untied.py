"""Issue 7 table: parameters and perplexity of a dense model vs constant slicing, untied and tied layouts.

    python scripts/tied_vs_untied.py                 # SmolLM2-135M, 20/25/30%, calib 32x512, eval 16x512
    python scripts/tied_vs_untied.py --quick         # 4x128 calibration, 2x128 evaluation

Writes data/runs/tied_vs_untied.csv and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy

import pandas as pd
import torch

from helpers.compression.allocation import ModelShape, constant_dims
from helpers.compression.checkpoints import load_model
from helpers.compression.ledger import compression, ledger_totals, parameter_ledger
from helpers.compression.slicing import rotate_and_slice, untie_sliced
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.infra.storage import RUNS_DIR, write_csv_atomic
from helpers.infra.textdata import CALIB_TEXT, EVAL_TEXT, load_windows
from helpers.models.loading import DEFAULT_MODEL


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--slices", type=float, nargs="+", default=[0.2, 0.25, 0.3])
    p.add_argument("--calib", default=CALIB_TEXT)
    p.add_argument("--eval", default=EVAL_TEXT)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    calib_size, eval_size = ((4, 128), (2, 128)) if args.quick else ((32, 512), (16, 512))
    model, tok = load_model(args.model)
    calib = load_windows(tok, args.calib, calib_size[1], calib_size[0])
    held_out = load_windows(tok, args.eval, eval_size[1], eval_size[0])
    dense_params = ledger_totals(parameter_ledger(model))["total"]
    ppl = perplexity_on_ids(model, held_out, desc="dense").perplexity
    rows = [{"model": "dense", "slice": 0.0, "params": dense_params, "perplexity": ppl}]
    for fraction in args.slices:
        sliced = copy.deepcopy(model)
        rotate_and_slice(sliced, calib, constant_dims(ModelShape.from_config(sliced.config), fraction), tied=True)
        for layout in ("tied", "untied"):
            if layout == "untied":
                untie_sliced(sliced)  # the same slicing in SliceGPT's layout: same outputs, more parameters
            params = ledger_totals(parameter_ledger(sliced))["total"]
            ppl = perplexity_on_ids(sliced, held_out, desc=f"{fraction} {layout}").perplexity
            rows.append({"model": f"sliced {layout}", "slice": fraction, "params": params, "perplexity": ppl})
        del sliced
    table = pd.DataFrame(rows)
    table["compression"] = [compression(n, dense_params) for n in table["params"]]
    out = RUNS_DIR / "tied_vs_untied.csv"
    write_csv_atomic(table, out)
    (cn, cl), (en, el) = calib_size, eval_size
    print(f"calibration {args.calib} {cn}x{cl}, evaluation {args.eval} {en}x{el}")
    print(table.to_string(index=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
