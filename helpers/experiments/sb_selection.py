"""SB selection rules, judged on data that no rule selects on (docs/method.md section 6).

Works on the cached sweep cells (`reproduce.sweep`): every candidate SB < SP already has its
selection-book perplexity, each held-out book's per-window NLL and every question's correctness.
One trial is (SP, held-out book b, random half r of every task's questions). The rules:
- `select_book` (the paper's): lowest perplexity on the selection book;
- `question_half`: lowest error rate (0/1 loss: the cells keep each question's correctness, not its
  log-likelihood) on the selection half of the zero-shot questions, averaged over tasks;
- `books_agree`: lowest mean rank by perplexity over the selection book and every held-out book but b.
Each pick is scored on book b's perplexity and on the accuracy of the other half of the questions,
against the SB that is best on those evaluation data (the oracle): how often a rule finds it, and
what it loses when it does not (regret), next to what it costs (tokens or questions per candidate).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SELECTION_RULES = ("select_book", "question_half", "books_agree")
SPLITS = 20  # random question halves per (SP, book)
SEED = 0


def _book_ppl(raw: dict, book: int, windows: int) -> float:
    """Perplexity of one held-out book from a cell's per-window NLLs (books are stored one after another)."""
    part = slice(book * windows, (book + 1) * windows)
    return float(np.exp(np.sum(raw["eval_window_nll"][part]) / np.sum(raw["eval_window_tokens"][part])))


def _accuracy(raw: dict, tasks: tuple[str, ...], halves: dict[str, np.ndarray]) -> float:
    """Mean over tasks of the accuracy on the questions `halves[task]` picks."""
    return float(np.mean([np.asarray(raw["tasks"][t]["correct"])[halves[t]].mean() for t in tasks]))


def _split(raw: dict, tasks: tuple[str, ...], rng: np.random.Generator) -> tuple[dict, dict]:
    """A random half of every task's questions for selection, the rest for evaluation."""
    select, evaluate = {}, {}
    for task in tasks:
        n = len(raw["tasks"][task]["correct"])
        order = rng.permutation(n)
        select[task], evaluate[task] = order[: n // 2], order[n // 2 :]
    return select, evaluate


def selection_trials(cells: pd.DataFrame, tasks: tuple[str, ...], n_books: int, windows: int) -> pd.DataFrame:
    """One row per (SP, held-out book, split, rule): the SB picked, the oracle SBs, the regrets."""
    rng = np.random.default_rng(SEED)
    rows = []
    for sp, group in cells[cells["method"] == "dynamic"].groupby("sp"):
        group = group.reset_index(drop=True)
        book_ppl = np.array([[_book_ppl(raw, b, windows) for b in range(n_books)] for raw in group["raw"]])
        select_ppl = group["ppl_select"].to_numpy()
        for book in range(n_books):
            others = [select_ppl] + [book_ppl[:, b] for b in range(n_books) if b != book]
            ranks = np.mean([pd.Series(v).rank().to_numpy() for v in others], axis=0)
            for split in range(SPLITS):
                halves = _split(group["raw"].iloc[0], tasks, rng)
                select_acc = np.array([_accuracy(raw, tasks, halves[0]) for raw in group["raw"]])
                eval_acc = np.array([_accuracy(raw, tasks, halves[1]) for raw in group["raw"]])
                picks = {
                    "select_book": int(np.argmin(select_ppl)),
                    "question_half": int(np.argmax(select_acc)),
                    "books_agree": int(np.lexsort((select_ppl, ranks))[0]),
                }
                best_ppl, best_acc = int(np.argmin(book_ppl[:, book])), int(np.argmax(eval_acc))
                for rule, pick in picks.items():
                    rows.append(
                        {
                            "sp": sp,
                            "book": book,
                            "split": split,
                            "rule": rule,
                            "candidates": len(group),
                            "sb": group["sb"].iloc[pick],
                            "oracle_sb_ppl": group["sb"].iloc[best_ppl],
                            "oracle_sb_acc": group["sb"].iloc[best_acc],
                            "ppl_regret": book_ppl[pick, book] - book_ppl[best_ppl, book],
                            "acc_regret": eval_acc[best_acc] - eval_acc[pick],
                        }
                    )
    return pd.DataFrame(rows)


def selection_summary(trials: pd.DataFrame, costs: dict[str, str]) -> pd.DataFrame:
    """Per rule: share of trials that pick the evaluation-best SB (perplexity, accuracy), mean regrets, cost."""
    rows = []
    for rule in SELECTION_RULES:
        t = trials[trials["rule"] == rule]
        rows.append(
            {
                "rule": rule,
                "trials": len(t),
                "candidates": int(t["candidates"].min()) if len(t) else 0,  # SBs < SP to choose from, fewest over SPs
                "finds_best_ppl": float(np.mean(np.isclose(t["sb"], t["oracle_sb_ppl"]))),
                "finds_best_acc": float(np.mean(np.isclose(t["sb"], t["oracle_sb_acc"]))),
                "mean_ppl_regret": float(t["ppl_regret"].mean()),
                "mean_acc_regret": float(t["acc_regret"].mean()),
                "picked_sb": ", ".join(f"{v:g}" for v in sorted(t["sb"].unique())),
                "cost_per_candidate": costs[rule],
            }
        )
    return pd.DataFrame(rows)


def selection_costs(select_windows: int, eval_windows: int, n_books: int, seqlen: int, questions: int) -> dict:
    """What each rule scores per candidate SB, in words."""
    return {
        "select_book": f"{select_windows * seqlen:,} tokens",
        "question_half": f"{questions // 2:,} questions",
        "books_agree": f"{(select_windows + (n_books - 1) * eval_windows) * seqlen:,} tokens",
    }
