"""The command line runs the same pipeline as the notebooks and fails with readable errors."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers.cli import main


@pytest.mark.slow
def test_lr_command_writes_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "lr.csv"
    assert main(["lr", "--text", "war-of-the-worlds", "--seqlen", "32", "--windows", "2", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["layer", "lr", "bi", "lr_norm"]
    assert len(table) == 30 and table["layer"].tolist() == list(range(30))
    assert (tmp_path / "lr.png").stat().st_size > 1000 and (tmp_path / "lr.svg").exists()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lr", "--model", "nonexistent-model"], "Unknown model"),
        (["lr", "--text", "no-such-book"], "Unknown text"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_bad_command_line_does_not_import_other_stages():
    """`slice` with a missing --out fails in one line without loading the book builder or matplotlib."""
    import subprocess
    import sys

    code = (
        "import sys; from helpers.cli import main; rc = main(['slice', '--sp', '0.3']); "
        "print(rc, sorted(m for m in ('nbformat', 'matplotlib', 'helpers.ui.book', 'helpers.experiments.reproduce') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "2 []", out.stdout + out.stderr
    assert "required: --out" in out.stderr


@pytest.mark.parametrize("name", ["slice", "reproduce", "rules", "book"])
def test_every_command_help_lists_its_own_arguments(name, capsys):
    assert main([name, "--help"]) == 0
    assert "--out" in capsys.readouterr().out


def test_slice_final_dim_last_gives_the_head_the_last_layers_width(tmp_path, capsys):
    """`slice --final-dim last`: the head reads the last layer's kept width ((1 - SP) d rounded down to 8)."""
    from transformers import AutoTokenizer

    from helpers.compression.checkpoints import load_model
    from helpers.models.loading import DEFAULT_MODEL, resolve_model, tiny_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    argv = ["slice", "--model", str(tmp_path / "tiny"), "--sp", "0.3", "--calib-seqlen", "16", "--calib-windows", "8"]
    assert main([*argv, "--final-dim", "last", "--out", str(tmp_path / "sliced")]) == 0
    kept = int(0.7 * 64) // 8 * 8  # tiny_model's hidden size is 64
    assert f"the head reads {kept} dimensions" in capsys.readouterr().out
    model, _ = load_model(str(tmp_path / "sliced"), device="cpu")
    assert model.slicing_info.final_dim == kept and tuple(model.lm_head.weight.shape) == (len(tokenizer), kept)
