"""Time LR capture against a plain forward pass over the same windows, in one run.

Prints the ratio to a plain forward of the whole model (target: at most 1.15) and, to show the
cost of the hooks themselves, to a forward of the backbone alone (no LM head). Usage:
    python scripts/bench_lr_capture.py [--model smollm2-135m] [--seqlen 256] [--windows 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from helpers.analysis.redundancy import layer_redundancy
from helpers.compression.checkpoints import load_model
from helpers.infra.textdata import load_windows
from helpers.models.adapters import get_adapter
from helpers.models.loading import DEFAULT_MODEL


def plain_forward(model, ids: torch.Tensor, batch_size: int) -> None:
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            model(input_ids=ids[start : start + batch_size].to(model.device), use_cache=False)


def backbone_forward(model, ids: torch.Tensor, batch_size: int) -> None:
    plain_forward(get_adapter(model).backbone(model), ids, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--text", default="gutenberg")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    ids = load_windows(tokenizer, args.text, args.seqlen, args.windows)
    runs = {
        "plain forward": lambda: plain_forward(model, ids, args.batch_size),
        "backbone forward": lambda: backbone_forward(model, ids, args.batch_size),
        "LR capture": lambda: layer_redundancy(model, ids, args.batch_size, progress=False),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    runs["plain forward"]()  # warm-up
    for _ in range(args.repeats):  # interleave so drift hits both alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    plain, backbone, capture = (statistics.median(times[name]) for name in runs)
    print(
        f"model {args.model}, {args.windows} windows x {args.seqlen} tokens, batch {args.batch_size}, "
        f"device {model.device}, median of {args.repeats}"
    )
    print(f"plain forward: {plain:.3f} s   LR capture: {capture:.3f} s   ratio: {capture / plain:.3f} (target <= 1.15)")
    print(f"backbone forward (no LM head): {backbone:.3f} s   hook overhead ratio: {capture / backbone:.3f}")


if __name__ == "__main__":
    main()
