"""Zero-shot multiple-choice scoring in the lm-evaluation-harness convention (docs/method.md section 5).

An option's score is the sum of the log-probabilities of its continuation tokens given its context.
acc takes the argmax of the sums; acc_norm the argmax of the sums divided by the option's length in
characters (the harness's `len(choice)`). WinoGrande reports acc only.

Tokenisation follows the harness: encode context + continuation as one string without special tokens (a BOS
is put first only where the model family wants one, as in `helpers.textdata`), encode the context alone, and
take the tokens past the context's length as the continuation. Every (context, continuation) pair of a task is
one row; rows are sorted by length and scored `batch_size` at a time in one right-padded forward pass, so the
options of a question (same context) and neighbouring questions share a batch. Contexts longer than the
model's window are cut from the left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.tasks import Question, load_task
from helpers.textdata import bos_id


@dataclass
class TaskResult:
    """Summary metrics plus per-question records (option scores are what stability metrics need)."""

    task: str
    summary: dict  # {"acc", "acc_norm", "n"}; acc_norm is None for WinoGrande
    option_scores: list[np.ndarray]  # per question: sum of continuation log-probabilities per option
    option_lengths: list[np.ndarray]  # per question: characters per option used by acc_norm
    labels: np.ndarray
    pred: np.ndarray = field(init=False)
    pred_norm: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.pred = np.array([int(np.argmax(s)) for s in self.option_scores])
        self.pred_norm = np.array(
            [int(np.argmax(s / n)) for s, n in zip(self.option_scores, self.option_lengths, strict=True)]
        )


def summarise(task: str, option_scores: list[np.ndarray], option_lengths: list[np.ndarray], labels) -> TaskResult:
    """Build a TaskResult (acc, acc_norm, n) from per-question option scores."""
    result = TaskResult(task, {}, option_scores, option_lengths, np.asarray(labels, dtype=int))
    result.summary = {
        "acc": float(np.mean(result.pred == result.labels)),
        "acc_norm": None if task == "winogrande" else float(np.mean(result.pred_norm == result.labels)),
        "n": len(result.labels),
    }
    return result


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context + continuation and how many of them (at the end) are the continuation."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    n_cont = len(whole) - n_context
    bos = bos_id(tokenizer)
    whole = whole if bos is None else [bos, *whole]
    if n_cont < 1:
        raise ValueError(f"Continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return whole, n_cont


@torch.no_grad()
def score_rows(model, rows: list[tuple[list[int], int]], batch_size: int = 8, desc: str = "scoring") -> np.ndarray:
    """Sum of continuation log-probabilities for each (token ids, continuation length) row, batched."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None) or 10**9
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    scores = np.zeros(len(rows))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch_size]
        inputs = [rows[i][0][:-1][-max_len:] for i in idx]  # the last token is only ever a target
        width = max(map(len, inputs))
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, seq in enumerate(inputs):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, i in enumerate(idx):
            tokens, n_cont = rows[i]
            length = len(inputs[r])
            picked = logits[r, length - n_cont : length].float().log_softmax(-1)
            target = torch.tensor(tokens[-n_cont:], device=picked.device)
            scores[i] = picked.gather(-1, target[:, None]).sum().item()
    return scores


def score_questions(
    model, tokenizer, questions: list[Question], batch_size: int = 8, desc: str = "scoring"
) -> list[np.ndarray]:
    """Per question, the array of its option scores (sum of continuation log-probabilities)."""
    rows = [encode_pair(tokenizer, c, k) for q in questions for c, k in q.pairs()]
    flat = score_rows(model, rows, batch_size, desc)
    out, at = [], 0
    for q in questions:
        out.append(flat[at : at + len(q.options)])
        at += len(q.options)
    return out


def evaluate_task(model, tokenizer, task: str, limit: int | None = None, batch_size: int = 8) -> TaskResult:
    """Score the first `limit` questions of `task`; return summary metrics and per-question records."""
    questions = load_task(task, limit)
    scores = score_questions(model, tokenizer, questions, batch_size, desc=task)
    lengths = [np.array(q.norm_lengths(), dtype=float) for q in questions]
    return summarise(task, scores, lengths, [q.label for q in questions])


def evaluate(
    model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8
) -> dict[str, TaskResult]:
    """`evaluate_task` for each task, in order."""
    return {task: evaluate_task(model, tokenizer, task, limit, batch_size) for task in tasks}


def lm_eval_harness(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """Run lm-evaluation-harness itself on an in-memory (possibly sliced) model; returns its results dict.

    Optional path: needs `pip install lm-eval` and internet for the harness's datasets.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError(
            "lm-evaluation-harness is not installed: pip install lm-eval; needs internet for datasets"
        ) from err
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)["results"]
