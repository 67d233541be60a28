"""One evaluation of a model for every table: held-out perplexity per window and zero-shot answers per question.

The sweep's cells (`cells.Lab.measure`) and the depth comparison (`compare.evaluate_variant`) both call
`measure`; each adds what only it reports (selection perplexity; stability scores, speed, layers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from helpers.evaluation.perplexity import PerplexityResult, perplexity_on_ids
from helpers.evaluation.tasks import paper_metric
from helpers.evaluation.zeroshot import TaskResult, evaluate_task, in_dtype


@dataclass(frozen=True)
class Measurement:
    """Held-out perplexity (with each window's NLL) and every task's per-question result."""

    perplexity: PerplexityResult
    tasks: dict[str, TaskResult]


def measure(
    model: nn.Module, tokenizer, eval_ids: torch.Tensor, limits: Mapping[str, int | None], dtype: str
) -> Measurement:
    """Perplexity on `eval_ids`, then each task of `limits` (questions, None: all) scored on a `dtype` copy."""
    held_out = perplexity_on_ids(model, eval_ids, progress=False)
    scored = in_dtype(model, getattr(torch, dtype))
    return Measurement(
        held_out, {task: evaluate_task(scored, tokenizer, task, limit) for task, limit in limits.items()}
    )


def correct(result: TaskResult) -> list[int]:
    """Per question, 1 where the paper's metric for the task (acc or acc_norm) picks the label."""
    pred = result.pred if paper_metric(result.task) == "acc" else result.pred_norm
    return (pred == result.labels).astype(int).tolist()


def per_character_scores(result: TaskResult) -> list[list[float]]:
    """Per question, each option's log-likelihood per character (acc_norm's scale, for stability weights)."""
    return [list(map(float, s / n)) for s, n in zip(result.option_scores, result.option_lengths, strict=True)]
