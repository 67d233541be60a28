"""Zero-shot multiple-choice scoring in the lm-evaluation-harness convention (docs/method.md section 5).

An option's score is the sum of the log-probabilities of its continuation tokens given its context.
acc takes the argmax of the sums; acc_norm the argmax of the sums divided by the option's length in
characters (the harness's `len(choice)`). WinoGrande reports acc only.

Tokenisation follows the harness: encode context + continuation as one string without special tokens (a BOS
is put first only where the model family wants one, as in `helpers.infra.textdata`), encode the context alone, and
take the tokens past the context's length as the continuation. Every (context, continuation) pair of a task is one row.

Two scorers give the same sums (to float rounding). `score_rows_shared` (the default) packs each question
into one sequence: the token prefix its options share runs once, then every option's remainder follows under
a block attention mask (each remainder sees the prefix and itself, with its own positions), so no token is
computed twice; for WinoGrande, whose options differ inside the context, the shared part is the sentence up
to the blank. Packs of similar length are batched, and the LM head runs only at the positions that predict a
continuation token. `score_rows` is the harness's way, one right-padded forward over every whole row, kept as
the reference. `evaluate(..., dtype=torch.bfloat16)` scores a bfloat16 copy (slicing and PCA stay in
float32/float64). Contexts longer than the model's window are cut from the left.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from helpers.evaluation.tasks import ACC_ONLY, Question, load_task
from helpers.infra.progress import progress_bar
from helpers.infra.textdata import bos_id
from helpers.models.adapters import get_adapter

SCORERS = ("shared", "full")  # shared context + KV cache (default), or one whole forward per row

SCORING_DTYPE = "bfloat16"  # zero-shot scoring precision of every table (the model is built in float32)


@dataclass
class TaskResult:
    """Summary metrics plus per-question records (option scores are what stability metrics need)."""

    task: str
    summary: dict  # {"acc", "acc_norm", "n"}; acc_norm is None for the tasks in tasks.ACC_ONLY
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
        "acc_norm": None if task in ACC_ONLY else float(np.mean(result.pred_norm == result.labels)),
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
    for start in progress_bar(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
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
    model,
    rows: list[tuple[list[int], int]],
    batch_size: int = 8,
    desc: str = "scoring",
    groups: list[list[int]] | None = None,
) -> np.ndarray:
    """Like `score_rows`, but the prefix a group's rows share runs once and the LM head only where scored.

    `groups` lists row indices that share a prefix (a question's options); by default, rows with the same
    context. Each group is packed into one sequence (shared prefix, then every row's remainder) under a
    block mask, so each token is computed once; rows longer than a sliding-attention window or the model's
    window fall back to `score_rows`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for tokens, n_cont in rows:
        if len(tokens) <= n_cont:
            raise ValueError("Every row needs at least one context token before its continuation.")
    if groups is None:
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (tokens, n_cont) in enumerate(rows):
            by_context.setdefault(tuple(tokens[:-n_cont]), []).append(i)
        groups = list(by_context.values())
    limit = min(_max_len(model), getattr(model.config, "sliding_window", None) or 10**9)
    packs, too_long = [], []
    for g in groups:
        if max(len(rows[i][0]) for i in g) > limit:
            too_long += g
        else:
            packs.append(_pack([rows[i] for i in g], g))
    packs.sort(key=lambda pack: len(pack.tokens), reverse=True)  # buckets of similar length
    adapter = get_adapter(model)
    backbone, head = adapter.backbone(model), adapter.head(model)
    device = next(model.parameters()).device
    scores = np.zeros(len(rows))
    for start in progress_bar(range(0, len(packs), batch_size), desc=desc, unit="batch", leave=False):
        _score_packs(backbone, head, packs[start : start + batch_size], rows, scores, device)
    if too_long:
        scores[too_long] = score_rows(model, [rows[i] for i in too_long], batch_size, desc)
    return scores


@dataclass
class _Pack:
    """One group of rows as a single sequence: the shared prefix, then each row's remainder (last token dropped)."""

    tokens: list[int]
    positions: list[int]
    segment: list[int]  # -1 for the prefix, else the row's index within the group
    scored: list[tuple[int, int, int]]  # (row index, packed position that predicts, target token)


def _pack(group_rows: list[tuple[list[int], int]], indices: list[int]) -> _Pack:
    """Pack rows that share a prefix (capped at the shortest context, so no continuation token is shared)."""
    prefix = min(len(tokens) - n_cont for tokens, n_cont in group_rows)
    first = group_rows[0][0]
    for tokens, _ in group_rows[1:]:
        prefix = next((k for k in range(prefix) if tokens[k] != first[k]), prefix)
    pack = _Pack(list(first[:prefix]), list(range(prefix)), [-1] * prefix, [])
    for r, (tokens, n_cont) in enumerate(group_rows):
        offset = len(pack.tokens) - prefix  # packed index of this row's position `prefix`
        rest = tokens[prefix:-1]
        pack.tokens += rest
        pack.positions += range(prefix, prefix + len(rest))
        pack.segment += [r] * len(rest)
        for j in range(len(tokens) - n_cont, len(tokens)):  # token j is predicted at row position j - 1
            at = prefix - 1 if j - 1 < prefix else offset + j - 1
            pack.scored.append((indices[r], at, tokens[j]))
    return pack


def _pack_mask(pack: _Pack, width: int) -> torch.Tensor:
    """Who may attend to whom in a pack: the prefix causally, each row its prefix and itself causally."""
    seg = torch.tensor(pack.segment)
    n = len(seg)
    same = (seg[:, None] == seg[None, :]) | (seg[None, :] == -1)
    mask = torch.zeros(width, width, dtype=torch.bool)
    mask[:n, :n] = same & torch.ones(n, n, dtype=torch.bool).tril()
    mask[torch.arange(n, width), torch.arange(n, width)] = True  # padding sees itself only (no empty rows)
    return mask


def _score_packs(backbone, head, packs: list[_Pack], rows, scores: np.ndarray, device) -> None:
    """One forward over a batch of packs; add each scored token's log-probability to its row's score."""
    width = max(len(p.tokens) for p in packs)
    ids = torch.zeros(len(packs), width, dtype=torch.long)
    positions = torch.zeros(len(packs), width, dtype=torch.long)
    for b, pack in enumerate(packs):
        ids[b, : len(pack.tokens)] = torch.tensor(pack.tokens)
        positions[b, : len(pack.tokens)] = torch.tensor(pack.positions)
    mask = torch.stack([_pack_mask(p, width) for p in packs])[:, None]
    hidden = backbone(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
    ).last_hidden_state
    where = [(b, at) for b, pack in enumerate(packs) for _, at, _ in pack.scored]
    batch_idx, pos_idx = torch.tensor(where, device=device).T
    logp = head(hidden[batch_idx, pos_idx]).float().log_softmax(-1)
    targets = torch.tensor([t for pack in packs for _, _, t in pack.scored], device=device)
    picked = logp.gather(-1, targets[:, None])[:, 0].double().cpu().numpy()
    row_of = np.array([i for pack in packs for i, _, _ in pack.scored])
    np.add.at(scores, row_of, picked)


def score_questions(
    model, tokenizer, questions: list[Question], batch_size: int = 8, desc: str = "scoring", scorer: str = "shared"
) -> list[np.ndarray]:
    """Per question, the array of its option scores (sum of continuation log-probabilities)."""
    if scorer not in SCORERS:
        raise ValueError(f"Unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}.")
    rows = [encode_pair(tokenizer, c, k) for q in questions for c, k in q.pairs()]
    if scorer == "shared":
        starts = np.cumsum([0] + [len(q.options) for q in questions])
        groups = [list(range(a, b)) for a, b in itertools.pairwise(starts)]
        flat = score_rows_shared(model, rows, batch_size, desc, groups)
    else:
        flat = score_rows(model, rows, batch_size, desc)
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
