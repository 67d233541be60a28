"""Time the slider callback (allocation + figure redraw + readout) against the 150 ms budget.

Usage: PYTHONPATH=. HELPERS_DATA_DIR=data python scripts/bench_slider_callback.py [--changes 50] [--lr FILE.csv]
Each timed change sets one slider's value, which fires the same observer a drag in the browser fires.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from helpers.ui.widgets import find_lr_files, slider_app

BUDGET_S = 0.150


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=50, help="number of slider moves to time")
    parser.add_argument("--lr", type=Path, default=None, help="LR CSV (default: the first cached one)")
    args = parser.parse_args()
    paths = [args.lr] if args.lr else find_lr_files()[:1]
    app = slider_app(paths)
    rng = np.random.default_rng(0)
    times = []
    while len(times) < args.changes:
        slider = app.sp if len(times) % 2 == 0 else app.sb
        value = round(float(rng.uniform(0.05 if slider is app.sp else 0.0, slider.max)), 2)
        if value == slider.value:
            continue
        start = time.perf_counter()
        slider.value = value
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"LR file: {paths[0]}")
    print(
        f"slider callback over {args.changes} changes: median {median * 1e3:.1f} ms, "
        f"90th percentile {np.percentile(times, 90) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms; "
        f"over budget: {sum(t > BUDGET_S for t in times)}; budget {BUDGET_S * 1e3:.0f} ms; "
        f"median/budget = {median / BUDGET_S:.2f}"
    )


if __name__ == "__main__":
    main()
