"""Zero-shot scoring speed: the lab's scorers against lm-evaluation-harness on the same questions, one run.

    .venv/bin/python scripts/bench_zeroshot.py --limit 100 --repeats 3
    PYTHONPATH=. $LMEVAL_VENV/bin/python scripts/bench_zeroshot.py   # a venv with lm-eval 0.4.13: also times it

Times, on the default model in float32 and interleaved over `--repeats`: the lab's shared-context scorer
(the default), its whole-row scorer (the harness's way, same code path otherwise) and, when `lm_eval` is
importable, lm-evaluation-harness itself (HF backend, batch 16, its own task definitions reading the same
offline arrow files). Prints questions/s (median and spread) and the ratios, checks that the float32 choices
agree, then scores once in bfloat16 and prints its agreement with float32: the fraction of questions with
the same choice and the accuracy difference with its paired 95% interval.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from helpers.compression.checkpoints import load_model
from helpers.evaluation import stats
from helpers.evaluation.tasks import TASKS, datasets_dir, paper_metric
from helpers.evaluation.zeroshot import evaluate
from helpers.models.loading import DEFAULT_MODEL, model_label

# the harness's own task definitions, relative to lm_eval/tasks/
HARNESS_TASKS = {
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
}


def harness_yamls(folder: Path, tasks: list[str]) -> list[str]:
    """Task YAMLs that include the harness's own definitions but read the offline validation arrow files."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    names = []
    for task in tasks:
        (arrow,) = (datasets_dir() / TASKS[task][0]).glob("*.arrow")
        name = f"{task}_offline"
        folder.joinpath(f"{name}.yaml").write_text(  # no test split: the harness then scores validation, as we do
            f"include: {root / HARNESS_TASKS[task]}\ntask: {name}\ntag: []\ndataset_path: arrow\ndataset_name: null\n"
            f"training_split: null\ntest_split: null\ndataset_kwargs:\n  data_files:\n    validation: {arrow}\n"
        )
        names.append(name)
    return names


def run_harness(model, tokenizer, tasks: list[str], limit: int, folder: Path) -> dict[str, float]:
    """lm-evaluation-harness on the in-memory model; the paper metric per task."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = harness_yamls(folder, tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, limit=limit, task_manager=TaskManager(include_path=str(folder))
    )["results"]
    return {t: results[f"{t}_offline"][f"{paper_metric(t)},none"] for t in tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="piqa,hellaswag,arc_easy,winogrande")
    parser.add_argument("--limit", type=int, default=100, help="questions per task")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    try:
        import lm_eval  # noqa: F401

        harness = True
    except ImportError:
        harness = False
        print("lm_eval is not importable: timing the lab only (see the docstring for the harness venv)")
    n = args.limit * len(tasks)
    times: dict[str, list[float]] = {"lab shared": [], "lab whole-row": [], **({"harness": []} if harness else {})}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved, so that a busy machine slows every contender alike
            for name in times:
                start = time.perf_counter()
                if name == "harness":
                    results[name] = run_harness(model, tokenizer, tasks, args.limit, Path(tmp))
                else:
                    scorer = "shared" if name == "lab shared" else "full"
                    results[name] = evaluate(model, tokenizer, tasks, args.limit, 16, scorer)
                times[name].append(time.perf_counter() - start)
    threads = torch.get_num_threads()
    print(f"{model_label(DEFAULT_MODEL)}, float32, CPU threads {threads}, {n} questions ({args.limit} per task)")
    rate = {name: n / np.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:14s} {rate[name]:7.2f} questions/s  (times {', '.join(f'{x:.1f}' for x in t)} s)")
    base = "harness" if harness else "lab whole-row"
    print(f"ratio lab shared / {base}: {rate['lab shared'] / rate[base]:.2f}x")
    shared, full = results["lab shared"], results["lab whole-row"]
    same = all(np.array_equal(shared[t].pred, full[t].pred) for t in tasks)
    gap = max(
        float(np.max(np.abs(np.concatenate(shared[t].option_scores) - np.concatenate(full[t].option_scores))))
        for t in tasks
    )
    print(f"float32 shared vs whole-row: same choices {same}, largest option-score difference {gap:.2e}")
    if harness:
        for t in tasks:
            print(f"  {t}: lab {shared[t].summary[paper_metric(t)]:.4f}  harness {results['harness'][t]:.4f}")
    start = time.perf_counter()
    low = evaluate(model, tokenizer, tasks, args.limit, 16, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    print(f"bfloat16 shared: {n / seconds:.2f} questions/s (one run)")
    for t in tasks:
        pick = (lambda r: r.pred) if paper_metric(t) == "acc" else (lambda r: r.pred_norm)
        a = (pick(low[t]) == low[t].labels).astype(float)
        b = (pick(shared[t]) == shared[t].labels).astype(float)
        cmp = stats.paired_accuracy(a, b)
        print(
            f"  {t}: same choice {np.mean(pick(low[t]) == pick(shared[t])):.3f}; accuracy bf16 - fp32 "
            f"{cmp.diff:+.3f} (95% {cmp.low:+.3f} to {cmp.high:+.3f}, {cmp.verdict})"
        )


if __name__ == "__main__":
    main()
