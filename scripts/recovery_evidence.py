"""Perplexity and zero-shot accuracy of compressed folders before and after `recover`, with paired verdicts.

Each model is scored once (perplexity on held-out windows, the paper's metric per task on the same
questions) and its scores cached as JSON in --out, so an interrupted run resumes. Every pair
BEFORE=AFTER gets a paired perplexity difference and paired accuracy differences (after minus before,
bootstrap intervals from helpers.evaluation.stats). Usage:
    python scripts/recovery_evidence.py --out DIR [--limit 50] BEFORE=AFTER [BEFORE=AFTER ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from helpers.compression.checkpoints import load_model
from helpers.compression.depth import parameter_count
from helpers.evaluation.perplexity import perplexity
from helpers.evaluation.stats import (
    accuracy_interval,
    paired_accuracy,
    paired_average,
    paired_perplexity,
    perplexity_interval,
)
from helpers.evaluation.tasks import PAPER_TASKS, paper_metric
from helpers.evaluation.zeroshot import evaluate
from helpers.infra.storage import slug, write_json_atomic
from helpers.infra.textdata import EVAL_TEXT


def scores(folder: str, out: Path, args: argparse.Namespace) -> dict:
    """Parameters, per-window NLL and per-question correctness of one model (cached in `out`)."""
    cache = out / f"{slug(folder)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, tokenizer = load_model(folder, device="cpu")
    ppl = perplexity(model, tokenizer, EVAL_TEXT, args.seqlen, args.windows, progress=False)
    params = parameter_count(model)
    results = evaluate(model, tokenizer, list(PAPER_TASKS), args.limit, dtype=getattr(torch, args.dtype))
    correct = {}
    for task, result in results.items():
        pred = result.pred if paper_metric(task) == "acc" else result.pred_norm
        correct[task] = (pred == result.labels).astype(int).tolist()
    record = dict(model=folder, params=params, window_nll=list(ppl.window_nll), window_tokens=list(ppl.window_tokens))
    record["correct"] = correct
    write_json_atomic(cache, record)
    return record


def describe(record: dict) -> str:
    """One Markdown row: parameters, perplexity with its interval, each task's accuracy +- interval, average."""
    ppl = perplexity_interval(record["window_nll"], record["window_tokens"])
    cells = [f"{record['params']:,}", f"{ppl.value:.1f} [{ppl.low:.1f}, {ppl.high:.1f}]"]
    for task in PAPER_TASKS:
        acc = accuracy_interval(record["correct"][task])
        cells.append(f"{acc.value:.3f} [{acc.low:.3f}, {acc.high:.3f}]")
    average = np.mean([np.mean(record["correct"][task]) for task in PAPER_TASKS])
    return " | ".join([Path(record["model"]).name, *cells, f"{average:.3f}"])


def compare(before: dict, after: dict) -> str:
    """One Markdown row: after minus before, paired, for perplexity, each task and the task average."""
    ppl = paired_perplexity(after["window_nll"], before["window_nll"], after["window_tokens"])
    cells = [f"{ppl.diff:+.1f} [{ppl.low:+.1f}, {ppl.high:+.1f}] {ppl.verdict}"]
    for task in PAPER_TASKS:
        acc = paired_accuracy(after["correct"][task], before["correct"][task])
        cells.append(f"{acc.diff:+.3f} [{acc.low:+.3f}, {acc.high:+.3f}] {acc.verdict}")
    avg = paired_average([after["correct"][t] for t in PAPER_TASKS], [before["correct"][t] for t in PAPER_TASKS])
    cells.append(f"{avg.diff:+.3f} [{avg.low:+.3f}, {avg.high:+.3f}] {avg.verdict}")
    return " | ".join([f"{Path(after['model']).name} - {Path(before['model']).name}", *cells])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pairs", nargs="+", help="BEFORE=AFTER folder pairs")
    parser.add_argument("--out", type=Path, required=True, help="folder for the per-model score caches")
    parser.add_argument("--limit", type=int, default=50, help="questions per task (the reduced gallery scores 200)")
    parser.add_argument(
        "--dtype", default="float32", help="zero-shot scoring precision (bfloat16 is slow without AVX512-BF16)"
    )
    parser.add_argument("--seqlen", type=int, default=512, help="perplexity window (the ppl command's)")
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows (the ppl command's default is 32)")
    args = parser.parse_args()
    pairs = [pair.split("=") for pair in args.pairs]
    records = {}
    for folder in dict.fromkeys(f for pair in pairs for f in pair):
        records[folder] = scores(folder, args.out, args)
        print(describe(records[folder]), flush=True)
    header = ["model", "params", f"perplexity {EVAL_TEXT}", *PAPER_TASKS, "average"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for folder in records:
        print("| " + describe(records[folder]) + " |")
    print("\n| after - before | perplexity | " + " | ".join([*PAPER_TASKS, "average"]) + " |")
    print("|" + "---|" * (len(PAPER_TASKS) + 3))
    for before, after in pairs:
        print("| " + compare(records[before], records[after]) + " |")


if __name__ == "__main__":
    main()
