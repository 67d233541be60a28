"""Readings generated from numbers, and the small helpers that took the lessons' computing loops."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig

from helpers.compression.allocation import ModelShape, dense_param_count, savings_table
from helpers.experiments.readings import (
    outlier_layers,
    read_accuracy,
    read_depth_comparison,
    read_difference,
    read_lr_profile,
    read_results_table,
)
from helpers.experiments.sweeps import constant_vs_dynamic
from helpers.infra.storage import markdown_table
from helpers.infra.textdata import split_windows
from helpers.ui.widgets import lr_file_label


def test_lr_profile_names_the_layers_far_from_the_rest():
    values = np.full(30, 0.98)
    values[[0, 1, 24, 29]] = [0.0, 0.82, 0.85, 0.70]
    assert outlier_layers(values) == [0, 1, 24, 29]
    text = read_lr_profile(values)
    assert "26 of 30 layers" in text and "layers 0, 1, 24 and 29" in text
    assert "flat" in read_lr_profile(np.linspace(0.95, 1.0, 30))


@pytest.mark.parametrize(
    ("interval", "verdict"), [(None, "no interval given"), ((-0.02, 0.05), "includes 0"), ((0.01, 0.05), "excludes 0")]
)
def test_difference_verdict_follows_the_interval(interval, verdict):
    text = read_difference(
        "dynamic", 80.0, "constant", 100.0, higher_is_better=False, what="perplexity", interval=interval
    )
    assert "dynamic is ahead" in text and verdict in text
    if interval == (0.01, 0.05):
        assert text.endswith("constant is worse.")


def test_accuracy_gap_in_questions():
    text = read_accuracy("winogrande", 0.600, 0.475, 40, chance=0.5)
    assert "+0.125" in text and "about 5 of 40 questions" in text and "within 0.05 of chance (0.50)" in text
    assert "chance" not in read_accuracy("piqa", 0.65, 0.70, 40, chance=0.5)


def test_results_table_reading_compares_within_each_sp():
    tasks = ["piqa"]
    table = pd.DataFrame(
        {
            "method": ["dense", "constant", "dynamic"],
            "sp": [0.0, 0.3, 0.3],
            "sb": [0.0, 0.3, 0.0],
            "piqa": [0.70, 0.55, 0.75],
            "average": [0.70, 0.55, 0.75],
            "ppl_eval": [40.0, 107.0, 79.0],
        }
    )
    text = read_results_table(table, tasks, 40)
    assert "SP = 0.30" in text and "dynamic 0.750 against constant 0.550" in text
    assert "Above dense: dynamic at SP = 0.30 on piqa" in text and "about 2 of 40" in text
    paired = read_results_table(table, tasks, 40, accuracy_intervals={0.3: (0.05, 0.35)})
    assert "[+0.050, +0.350], excludes 0: constant is worse" in paired


def test_constant_vs_dynamic_picks_the_constant_and_the_best_rows():
    sweep = pd.DataFrame(
        {
            "sb": [0.3, 0.15, 0.0],
            "mean_slice": [0.3, 0.3, 0.3],
            "params": [10, 11, 12],
            "perplexity": [50.0, 40.0, 45.0],
            "eval_perplexity": [60.0, 48.0, 52.0],
        }
    ).assign(best=lambda t: t["perplexity"] == t["perplexity"].min())
    table = constant_vs_dynamic({0.3: sweep})
    assert table["method"].tolist() == ["constant", "dynamic"]
    assert table["sb"].tolist() == [0.3, 0.15] and table["perplexity"].tolist() == [60.0, 48.0]


def test_split_windows_cuts_consecutive_groups():
    ids = torch.arange(20).reshape(10, 2)
    calib, train, val = split_windows(ids, 3, 4, 2)
    assert torch.equal(calib, ids[:3]) and torch.equal(train, ids[3:7]) and torch.equal(val, ids[7:9])
    with pytest.raises(ValueError, match="only 10 are available"):
        split_windows(ids, 8, 4)


def test_selector_label_is_readable():
    assert lr_file_label(Path("data/cache/lr/smollm2-135m__gutenberg__L64__N4.csv")) == (
        "smollm2-135m: LR on gutenberg, 4 x 64 tokens"
    )
    assert lr_file_label(Path("figures/lr_smollm2-135m.csv")) == "smollm2-135m: LR from figures/lr_smollm2-135m.csv"


def test_savings_table_caps_sb_at_sp_and_reports_what_is_removed():
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=True,
    )
    shape = ModelShape.from_config(config)
    table = savings_table(np.array([0.2, 0.9, 0.95, 0.99]), [0.125, 0.25], 0.5, shape)
    # SB = 0.5 is capped at SP: constant slicing, 56 and 48 of 64 dimensions in every layer, exactly SP.
    assert table["SP"].tolist() == [0.125, 0.25] and table["realised mean slice"].tolist() == [0.125, 0.25]
    dense = dense_param_count(shape)["total"]
    removed = [f"{1 - n / dense:.1%}" for n in table["parameters"]]
    assert table["removed (all)"].tolist() == removed and table["parameters"].iloc[1] < table["parameters"].iloc[0]


def test_depth_comparison_reading_quotes_each_paired_verdict():
    table = pd.DataFrame(
        {
            "method": ["dense", "dynamic slicing", "ShortGPT", "LLM-Streamline"],
            "removed_pct": [0.0, 15.9, 15.8, 15.8],
            "perplexity": [40.0, 79.4, 78.6, 67.6],
            "avg_acc": [0.50, 0.42, 0.46, 0.45],
            "ppl_diff": [-39.4, 0.0, -0.8, -11.8],
            "ppl_diff_low": [-45.0, 0.0, -5.1, -15.2],
            "ppl_diff_high": [-33.1, 0.0, 3.2, -8.0],
            "ppl_verdict": ["better", "not resolved", "not resolved", "better"],
            "acc_diff": [0.080, 0.0, 0.040, 0.035],
            "acc_diff_low": [0.050, 0.0, -0.010, 0.001],
            "acc_diff_high": [0.110, 0.0, 0.090, 0.070],
            "acc_verdict": ["better", "not resolved", "not resolved", "better"],
        }
    )
    text = read_depth_comparison(table)
    assert "- ShortGPT: perplexity not resolved (difference -0.8, interval -5.1 to +3.2)" in text
    assert "- LLM-Streamline: perplexity resolved lower (difference -11.8, interval -15.2 to -8.0)" in text
    assert "average accuracy resolved higher (difference +0.035" in text
    assert "1 of 2 rows are resolved better than dynamic slicing, 0 worse and 1 not resolved" in text
    assert "- dynamic slicing:" not in text and "- dense:" not in text
    bare = read_depth_comparison(table[["method", "removed_pct", "perplexity", "avg_acc"]])
    assert "no paired intervals" in bare and "LLM-Streamline's (67.6)" in bare


def test_markdown_table_reads_back_as_the_cells_it_was_given():
    rows = [["dense", "1,000", 0.5], ["constant SP=0.3", "800", "117.2 (98.1-140.0)"]]
    text = markdown_table("model | parameters | perplexity (95% interval)", rows)
    lines = text.splitlines()
    assert lines[1] == "|---|---|---|" and text.endswith("\n")
    parsed = pd.read_csv(StringIO("\n".join([lines[0], *lines[2:]])), sep="|", dtype=str).iloc[:, 1:-1]
    assert [c.strip() for c in parsed.columns] == ["model", "parameters", "perplexity (95% interval)"]
    assert parsed.map(str.strip).values.tolist() == [[str(c) for c in row] for row in rows]
