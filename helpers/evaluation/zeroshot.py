"""Zero-shot multiple-choice scoring in the lm-evaluation-harness convention (docs/method.md section 5).

An option's score is the sum of the log-probabilities of its continuation tokens given its context.
acc takes the argmax of the sums; acc_norm the argmax of the sums divided by the option's length in
characters (the harness's `len(choice)`). WinoGrande reports acc only.

Tokenisation follows the harness: encode context + continuation as one string without special tokens (a BOS
is put first only where the model family wants one, as in `helpers.infra.textdata`), encode the context alone, and
take the tokens past the context's length as the continuation. Every (context, continuation) pair of a task is one row.

Two scorers give the same sums (to float rounding). `score_rows_shared` (the default) groups rows by their
context tokens: contexts of similar length are bucketed, run once through the backbone with a KV cache, the
cache is repeated for each option, and the continuations are scored from it; the LM head runs only at the
positions that predict a continuation token. `score_rows` is the harness's way, one right-padded forward
over every whole row, kept as the reference. `evaluate(..., dtype=torch.bfloat16)` scores a bfloat16 copy
(slicing and PCA stay in float32/float64). Contexts longer than the model's window are cut from the left.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.evaluation.tasks import Question, load_task
from helpers.infra.textdata import bos_id
from helpers.models.adapters import get_adapter

SCORERS = ("shared", "full")  # shared context + KV cache (default), or one whole forward per row


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
    max_len = _max_len(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    scores = np.zeros(len(rows))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch_size]
        inputs = [rows[i][0][:-1][-max_len:] for i in idx]  # the last token is only ever a target
        ids, mask = _pad(inputs, max(map(len, inputs)), device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for r, i in enumerate(idx):
            tokens, n_cont = rows[i]
            length = len(inputs[r])
            picked = logits[r, length - n_cont : length].float().log_softmax(-1)
            target = torch.tensor(tokens[-n_cont:], device=picked.device)
            scores[i] = picked.gather(-1, target[:, None]).sum().item()
    return scores


def _max_len(model) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 10**9


def _pad(seqs: list[list[int]], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their 0/1 mask."""
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, : len(seq)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_rows_shared(
    model, rows: list[tuple[list[int], int]], batch_size: int = 8, desc: str = "scoring"
) -> np.ndarray:
    """Like `score_rows`, but each distinct context runs once (KV cache) and the LM head only where scored."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    adapter = get_adapter(model)
    backbone, head = adapter.backbone(model), adapter.head(model)
    device = next(model.parameters()).device
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (tokens, n_cont) in enumerate(rows):
        if len(tokens) <= n_cont:
            raise ValueError("Every row needs at least one context token before its continuation.")
        groups.setdefault(tuple(tokens[:-n_cont]), []).append(i)
    contexts = sorted(groups, key=len, reverse=True)  # buckets of similar length
    scores = np.zeros(len(rows))
    for start in tqdm(range(0, len(contexts), batch_size), desc=desc, unit="batch", leave=False):
        batch = contexts[start : start + batch_size]
        members = [(b, i) for b, ctx in enumerate(batch) for i in groups[ctx]]
        longest = max(rows[i][1] for _, i in members)
        kept = [list(ctx[-(_max_len(model) - longest + 1) :]) for ctx in batch]
        ids, mask = _pad(kept, max(map(len, kept)), device)
        out = backbone(input_ids=ids, attention_mask=mask, use_cache=True)
        lengths = mask.sum(1)
        last = out.last_hidden_state[torch.arange(len(batch), device=device), lengths - 1]
        first = head(last).float().log_softmax(-1)  # predicts each option's first token
        for b, i in members:
            scores[i] = first[b, rows[i][0][-rows[i][1]]].item()
        members = sorted((m for m in members if rows[m[1]][1] > 1), key=lambda m: rows[m[1]][1])
        for sub in range(0, len(members), batch_size):  # continuations bucketed by length too
            _score_continuations(
                backbone, head, out.past_key_values, mask, rows, members[sub : sub + batch_size], scores
            )
    return scores


def _score_continuations(backbone, head, context_cache, mask, rows, members, scores: np.ndarray) -> None:
    """Add to `scores` the log-probabilities of continuation tokens 2.. of `members`, from their contexts' cache."""
    device = mask.device
    which = torch.tensor([b for b, _ in members], device=device)
    cache = copy.deepcopy(context_cache)
    cache.batch_select_indices(which)  # one copy of its context's cache per option
    conts = [rows[i][0][-rows[i][1] :] for _, i in members]
    cont_ids, cont_mask = _pad([c[:-1] for c in conts], max(map(len, conts)) - 1, device)
    positions = mask.sum(1)[which][:, None] + torch.arange(cont_ids.shape[1], device=device)
    hidden = backbone(
        input_ids=cont_ids,
        attention_mask=torch.cat([mask[which], cont_mask], 1),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    logp = head(hidden[cont_mask.bool()]).float().log_softmax(-1)
    targets = torch.tensor([t for c in conts for t in c[1:]], device=device)
    picked = logp.gather(-1, targets[:, None])[:, 0].double().cpu()
    at = 0
    for (_, i), c in zip(members, conts, strict=True):
        scores[i] += float(picked[at : at + len(c) - 1].sum())
        at += len(c) - 1


def score_questions(
    model, tokenizer, questions: list[Question], batch_size: int = 8, desc: str = "scoring", scorer: str = "shared"
) -> list[np.ndarray]:
    """Per question, the array of its option scores (sum of continuation log-probabilities)."""
    if scorer not in SCORERS:
        raise ValueError(f"Unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}.")
    rows = [encode_pair(tokenizer, c, k) for q in questions for c, k in q.pairs()]
    flat = (score_rows_shared if scorer == "shared" else score_rows)(model, rows, batch_size, desc)
    out, at = [], 0
    for q in questions:
        out.append(flat[at : at + len(q.options)])
        at += len(q.options)
    return out


def evaluate_task(
    model, tokenizer, task: str, limit: int | None = None, batch_size: int = 8, scorer: str = "shared"
) -> TaskResult:
    """Score the first `limit` questions of `task`; return summary metrics and per-question records."""
    questions = load_task(task, limit)
    scores = score_questions(model, tokenizer, questions, batch_size, desc=task, scorer=scorer)
    lengths = [np.array(q.norm_lengths(), dtype=float) for q in questions]
    return summarise(task, scores, lengths, [q.label for q in questions])


def in_dtype(model, dtype: torch.dtype):
    """The model itself for float32, else a copy cast to `dtype` (the original keeps its float32 weights)."""
    if dtype == torch.float32:
        return model
    return copy.deepcopy(model).to(dtype)


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    scorer: str = "shared",
    dtype: torch.dtype = torch.float32,
) -> dict[str, TaskResult]:
    """`evaluate_task` for each task, in order, on the model cast to `dtype` for scoring."""
    scored = in_dtype(model, dtype)
    return {task: evaluate_task(scored, tokenizer, task, limit, batch_size, scorer) for task in tasks}


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
