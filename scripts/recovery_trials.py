"""Which recovery loss and learning rate the gallery's budget should use: a small paired trial.

For constant slicing at each SP, the unrecovered model and one recovery per (loss, learning rate) are
measured by `Lab.measure` at the `reduced` preset's sizes (the gallery's questions and windows), each
recovery with the gallery's recipe otherwise (`Settings.recovery()`: its token budget, windows and
validation). Prints average accuracy and held-out perplexity, and each recovery's paired difference
from the unrecovered model (95% intervals, verdicts from `helpers.evaluation.stats`). Usage:
    python scripts/recovery_trials.py [--sps 0.1 0.3] [--trials lm:2e-4 lm:1e-3 distill:1e-3]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from helpers.compression.recovery import recover, recovery_data
from helpers.experiments.cells import Lab
from helpers.experiments.methods_report import paired
from helpers.experiments.presets import SIZES


def _average(cell: dict) -> float:
    return float(np.mean([np.mean(t["correct"]) for t in cell["tasks"].values()]))


def _paired(after: dict, before: dict) -> str:
    d = paired(after, before)
    return (
        f"accuracy {100 * d['acc_diff']:+.1f} points [{100 * d['acc_diff_low']:+.1f}, {100 * d['acc_diff_high']:+.1f}] "
        f"{d['acc_verdict']}; perplexity {d['ppl_diff']:+.1f} [{d['ppl_diff_low']:+.1f}, {d['ppl_diff_high']:+.1f}] "
        f"{d['ppl_verdict']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sps", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--trials", nargs="+", default=["lm:2e-4", "lm:1e-3", "distill:1e-3"], help="LOSS:LR")
    args = parser.parse_args()
    lab = Lab(SIZES["reduced"], progress=False)
    for sp in args.sps:
        before = lab.measure(lab.sliced(sp, sp), select=False)
        print(
            f"SP {sp:.2f} constant, unrecovered: accuracy {_average(before):.3f}, perplexity {before['ppl_eval']:.1f}"
        )
        for trial in args.trials:
            loss, lr = trial.split(":")
            recipe = dataclasses.replace(lab.settings.recovery(), loss=loss, lr=float(lr))
            train, val = recovery_data(lab.tokenizer, recipe)
            model, report = recover(
                lab.sliced(sp, sp),
                lab.tokenizer,
                recipe,
                train[: recipe.planned_steps * recipe.batch_size],
                val,
                progress=False,
                teacher=lab.model,
            )
            after = lab.measure(model, select=False)
            print(
                f"  {loss} lr {lr}, {report.tokens:,} tokens (best step {report.best_step}, {report.seconds:.0f} s): "
                f"accuracy {_average(after):.3f}, perplexity {after['ppl_eval']:.1f}; "
                f"vs unrecovered {_paired(after, before)}"
            )


if __name__ == "__main__":
    main()
