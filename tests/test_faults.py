"""Fault injection: bad inputs, damaged files and killed saves never destroy data or pass as results.

Every bad input must give one line on stderr, a non-zero exit and leave every
pre-existing file as it was (the tree is hashed before and after). Tiny random
models saved as folders stand in for the real one; CLI calls run in-process
except where the exit code and the traceback path of `python -m helpers` matter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from helpers.analysis import block_scores as depth
from helpers.analysis import redundancy
from helpers.cli import main
from helpers.compression.checkpoints import load_model
from helpers.compression.sliced_io import load_sliced, save_sliced
from helpers.compression.slicing import rotate_and_slice
from helpers.experiments.results import CellCache
from helpers.infra.integrity import IntegrityError, check_calibration_tokens
from helpers.infra.storage import OutputExistsError, atomic_path
from helpers.models.loading import DEFAULT_MODEL, check_model_cache, resolve_model, tiny_model

REPO = Path(__file__).resolve().parent.parent
TINY = dict(
    vocab_size=49152,  # the real tokenizer's vocabulary, so the saved folders load with a tokenizer
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
TEXT = " ".join(f"The {w} walked to the river and saw {n} boats." for n, w in enumerate(["man", "dog", "girl"] * 40))


def tree_hash(root: Path) -> dict[str, str]:
    """Path -> SHA-256 (or 'dir') of everything under `root`, hidden files included."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def flip_bytes(path: Path, at: float = 0.6, n: int = 64) -> None:
    """Zero `n` bytes inside a file without changing its size (silent corruption)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start : start + n] = bytes(n) if any(data[start : start + n]) else b"\xff" * n
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A user's tree: their own folder and files, a tiny model, a sliced model and damaged copies of it."""
    root = tmp_path_factory.mktemp("world")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    model = tiny_model(**TINY)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "text.txt").write_text(TEXT)
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :256].view(8, 32)
    rotate_and_slice(model, ids, [24, 16], progress=False)
    save_sliced(model, tokenizer, root / "sliced")
    for name in ("damaged", "no_dims", "bad_dims", "no_tokenizer"):
        shutil.copytree(root / "sliced", root / name)
    flip_bytes(root / "damaged" / "model.safetensors")
    for name, edit in (("no_dims", lambda m: m.pop("dims")), ("bad_dims", lambda m: m.update(dims="24,16"))):
        meta = json.loads((root / name / "slicing.json").read_text())
        edit(meta)
        (root / name / "slicing.json").write_text(json.dumps(meta))
    (root / "no_tokenizer" / "tokenizer.json").unlink()
    (root / "bad_config").mkdir()
    (root / "bad_config" / "config.json").write_text("{not json")
    user = root / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes\n")
    (user / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (root / "results.json").write_text('{"mine": 1}\n')
    pd.DataFrame({"layer": [0, 1], "lr": [0.9, 0.8]}).to_csv(root / "lr.csv", index=False)
    pd.DataFrame({"layer": [0, 1], "lr": [0.9, np.nan]}).to_csv(root / "lr_nan.csv", index=False)
    pd.DataFrame({"layer": [0, 1], "score": [0.9, 0.8]}).to_csv(root / "lr_nocol.csv", index=False)
    pd.DataFrame({"layer": [0, 1, 2], "lr": [0.9, 0.8, 0.7]}).to_csv(root / "lr_3.csv", index=False)
    return root


NEW = ["--out", "{w}/new"]
TEXT_ARGS = ["--text", "{w}/text.txt", "--seqlen", "8", "--windows", "1"]
BAD_INPUTS = [  # (argv with {w} for the world folder, environment, part of the expected message)
    (["lr", "--batch-size", "0"], {}, "--batch-size"),
    (["lr", "--seqlen", "-3"], {}, "--seqlen"),
    (["lr", "--windows", "abc"], {}, "--windows"),
    (["ppl", "--windows", "-1"], {}, "--windows"),
    (["ppl", "--batch-size", "0"], {}, "--batch-size"),
    (["slice", "--sp", "1.5", "--out", "{w}/new"], {}, "--sp"),
    (["slice", "--out", "{w}/new"], {}, "required"),
    (["slice", "--sp", "0.3", "--final-dim", "0", "--out", "{w}/new"], {}, "--final-dim"),
    (["slice", "--sp", "0.3", "--final-dim", "first", "--out", "{w}/new"], {}, 'positive integer or "last"'),
    (["slice", "--sp", "0.3", "--final-dim", "100000", "--model", "{w}/tiny", "--out", "{w}/new"], {}, "hidden size"),
    (["allocate", "--lr", "{w}/lr.csv", "--sp", "0.3", "--sb", "-0.1"], {}, "--sb"),
    (["speed", "--batch-sizes", "1,0"], {}, "--batch-sizes"),
    (["rules", "--sb-step", "0", "--sb-only", "--out", "{w}/new"], {}, "--sb-step"),
    (["frobnicate"], {}, "invalid choice"),
    (["lr", "--model", "nonexistent-model"], {}, "Unknown model"),
    (["lr", "--model", "{w}/user"], {}, "config.json"),
    (["ppl", "--model", "{w}/bad_config"], {}, "Could not read a config"),
    (["lr", "--text", "no-such-book"], {}, "Unknown text"),
    (["lr", "--text", "{w}/user"], {}, "is a folder"),
    (["allocate", "--lr", "{w}/user", "--sp", "0.3", "--sb", "0.1"], {}, "is a folder"),
    (["allocate", "--lr", "{w}/missing.csv", "--sp", "0.3", "--sb", "0.1"], {}, "missing"),
    (["allocate", "--lr", "{w}/lr_nan.csv", "--sp", "0.3", "--sb", "0.1", "--model", "{w}/tiny"], {}, "NaN"),
    (["allocate", "--lr", "{w}/lr_nocol.csv", "--sp", "0.3", "--sb", "0.1", "--model", "{w}/tiny"], {}, "'lr'"),
    (["allocate", "--lr", "{w}/lr_3.csv", "--sp", "0.3", "--sb", "0.1", "--model", "{w}/tiny"], {}, "3 layers"),
    (["ppl", "--model", "{w}/tiny", "--out", "{w}/results.json"], {}, "already exists"),
    (["ppl", "--model", "{w}/tiny", "--out", "{w}/user", "--overwrite"], {}, "is a folder"),
    (["slice", "--model", "{w}/tiny", "--sp", "0.25", "--out", "{w}/user", "--overwrite"], {}, "did not write"),
    (["prune", "--model", "{w}/tiny", "--n", "1", "--out", "{w}/user", "--overwrite"], {}, "did not write"),
    (["prune", "--model", "{w}/tiny", "--n", "1", "--out", "{w}/sliced", "--overwrite"], {}, "pruned output"),
    (["slice", "--model", "{w}/tiny", "--sp", "0.25", "--out", "{w}/sliced"], {}, "already exists"),
    (["slice", "--model", "{w}/tiny", "--sp", "0.25", "--out", "{w}/results.json", "--overwrite"], {}, "is a file"),
    (["slice", "--model", "{w}/sliced", "--sp", "0.25", "--out", "{w}/sliced", "--overwrite"], {}, "is the input"),
    (["ppl", "--model", "{w}/tiny", "--text", "{w}/text.txt", "--out", "{w}/text.txt", "--overwrite"], {}, "input"),
    (["ppl", "--model", "{w}/tiny", "--out", "{w}/results.json/x.json"], {}, "is a file"),
    (["lr", "--model", "{w}/tiny", "--out", "{w}/user/notes.txt"], {}, "already exists"),
    (["lr", "--model", "{w}/tiny"], {"HELPERS_DEVICE": "banana"}, "HELPERS_DEVICE='banana' is not a device"),
    (["ppl", "--model", "{w}/tiny"], {"HELPERS_DEVICE": "cuda:9"}, "HELPERS_DEVICE='cuda:9'"),
    (["slice", "--model", "{w}/tiny", "--sp", "0.25", "--device", "quantum", "--out", "{w}/new"], {}, "--device"),
    (
        ["slice", "--model", "{w}/tiny", "--sp", "0.25", "--calib-seqlen", "4", "--calib-windows", "2", *NEW],
        {},
        "at least 32 tokens",
    ),
    (["zeroshot", "--model", "{w}/tiny", "--tasks", "nosuchtask"], {}, "Unknown task"),
    (["zeroshot", "--model", "{w}/tiny", "--tasks", ","], {}, "--tasks is empty"),
    (["reproduce", "--out", "{w}/user"], {}, "not an earlier reproduce output"),
    (["ppl", "--model", "{w}/damaged", *TEXT_ARGS], {}, "damaged/model.safetensors does not match the checksum"),
    (["ppl", "--model", "{w}/no_dims", *TEXT_ARGS], {}, "slicing.json: field 'dims' is missing"),
    (["ppl", "--model", "{w}/bad_dims", *TEXT_ARGS], {}, "field 'dims' must be a list of integers"),
    (["ppl", "--model", "{w}/no_tokenizer", *TEXT_ARGS], {}, "no_tokenizer/tokenizer.json is missing"),
]


@pytest.mark.parametrize(("argv", "env", "message"), BAD_INPUTS, ids=[f"{a[0][0]}: {a[2]}" for a in BAD_INPUTS])
def test_bad_input_one_line_nonzero_and_nothing_changed(world, argv, env, message, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "cuda" in env.get("HELPERS_DEVICE", "") and torch.cuda.device_count() > 9:
        pytest.skip("this machine has a tenth GPU")
    before = tree_hash(world)
    code = main([a.format(w=world) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert tree_hash(world) == before


def test_enough_bad_inputs():
    assert len(BAD_INPUTS) >= 30


def test_cli_exit_code_and_traceback_only_with_verbose(world):
    """Through `python -m helpers`: exit 2 and one line; with -v the traceback appears."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HELPERS_DEVICE": "banana"}
    argv = [sys.executable, "-m", "helpers", "lr", "--model", str(world / "tiny")]
    quiet = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr.strip().count("\n") == 0 and "Traceback" not in quiet.stderr
    with pytest.raises(ValueError, match="banana"):  # -v re-raises, so Python prints the traceback
        os.environ["HELPERS_DEVICE"] = "banana"
        try:
            main(["-v", "lr", "--model", str(world / "tiny")])
        finally:
            del os.environ["HELPERS_DEVICE"]


def test_user_folder_survives_atomic_writes(world):
    """The storage layer itself refuses to put a lab output over a folder it did not write."""
    before = tree_hash(world / "user")
    with pytest.raises(OutputExistsError, match="did not write"), atomic_path(world / "user", kind="sliced") as tmp:
        tmp.mkdir()
    with pytest.raises(OutputExistsError, match="is a folder"), atomic_path(world / "user") as tmp:
        tmp.write_text("x")
    assert tree_hash(world / "user") == before
    assert not [p for p in world.iterdir() if p.name.endswith(".partial")]


def test_intact_model_loads_and_damage_is_named(world):
    model, tokenizer = load_sliced(world / "sliced", device="cpu")
    assert tokenizer is not None and model.slicing_info.dims == [24, 16]
    with pytest.raises(IntegrityError, match=r"damaged/model\.safetensors does not match the checksum"):
        load_model(str(world / "damaged"), device="cpu")


SAVER = """
import sys, time
from pathlib import Path
from helpers.infra.storage import atomic_path
with atomic_path(sys.argv[1], kind="sliced") as tmp:
    tmp.mkdir()
    (tmp / "slicing.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"new" * 100000)
    Path(sys.argv[2]).write_text("ready")
    time.sleep(60)
"""


def test_sigkill_during_save_keeps_previous_output_and_next_save_cleans(tmp_path):
    out = tmp_path / "sliced"
    with atomic_path(out, kind="sliced") as tmp:
        tmp.mkdir()
        (tmp / "slicing.json").write_text('{"old": 1}')
    before = tree_hash(out)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(out), str(ready)], env=env)
    deadline = time.time() + 60
    while not ready.exists() and saver.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the saving process never got going"
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    assert tree_hash(out) == before  # the previous output is untouched
    partials = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(partials) == 1  # the killed save left its temporary folder...
    with atomic_path(out, kind="sliced") as tmp:
        tmp.mkdir()
        (tmp / "slicing.json").write_text('{"new": 1}')
    assert not partials[0].exists()  # ...which the next save to the same place removed
    assert json.loads((out / "slicing.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready", "sliced"]


@pytest.fixture
def lr_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(redundancy, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(depth, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def test_weights_change_invalidates_lr_cache(world, tmp_path, lr_cache):
    folder = tmp_path / "model"
    shutil.copytree(world / "tiny", folder)
    args = (str(folder), str(world / "text.txt"), 16, 2)
    first = redundancy.cached_layer_redundancy(*args, progress=False)
    path = redundancy.lr_cache_path(*args)
    assert path.exists()
    model, tokenizer = load_model(str(folder), device="cpu")
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.mul_(3.0).add_(0.05)
    model.save_pretrained(folder)  # new weights, same folder and file names
    assert redundancy.lr_cache_path(*args) != path
    second = redundancy.cached_layer_redundancy(*args, progress=False)
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :32].view(2, 16)
    fresh = redundancy.layer_redundancy(model, ids, progress=False)  # independent computation on the new weights
    np.testing.assert_allclose(second["lr"], fresh["lr"], atol=1e-6)
    assert not np.allclose(first["lr"], second["lr"], atol=1e-4)


def test_text_edit_of_same_size_invalidates_lr_cache(world, tmp_path, lr_cache):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    before = redundancy.lr_cache_path(str(world / "tiny"), str(text), 16, 2)
    text.write_text(TEXT.replace("dog", "cat"))  # same size, other content
    assert redundancy.lr_cache_path(str(world / "tiny"), str(text), 16, 2) != before


def test_corrupt_lr_cache_entry_is_named_removed_and_recomputed(world, lr_cache, caplog):
    args = (str(world / "tiny"), str(world / "text.txt"), 16, 2)
    good = redundancy.cached_layer_redundancy(*args, progress=False)
    path = redundancy.lr_cache_path(*args)
    path.write_text(path.read_text().splitlines()[0] + "\n0,nan,nan,nan\n")  # truncated, NaN
    with caplog.at_level(logging.WARNING):
        again = redundancy.cached_layer_redundancy(*args, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "\n" not in warnings[0]
    pd.testing.assert_frame_equal(again, good)
    pd.testing.assert_frame_equal(pd.read_csv(path), good)


def test_corrupt_depth_cache_entry_is_recomputed(world, lr_cache, caplog):
    args = (str(world / "tiny"), str(world / "text.txt"), 16, 2)
    good = depth.cached_block_scores(*args, progress=False)
    (path,) = (lr_cache / "depth").glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])  # a truncated archive
    with caplog.at_level(logging.WARNING):
        again = depth.cached_block_scores(*args, progress=False)
    assert any(str(path) in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(again.cos_all, good.cos_all)


def test_model_cache_damage_is_detected(world, tmp_path):
    from helpers.models.loading import _record_weights

    folder = tmp_path / "cache"
    shutil.copytree(world / "tiny", folder)
    _record_weights(folder)
    check_model_cache(folder)  # intact: passes
    flip_bytes(folder / "model.safetensors")
    with pytest.raises(IntegrityError, match="does not match its recorded SHA-256"):
        check_model_cache(folder)
    save_file({"w": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="header declares"):
        check_model_cache(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match=r"tokenizer\.json is missing"):
        check_model_cache(folder)


def test_corrupt_cell_cache_entry_is_recomputed(tmp_path):
    cache = CellCache("cells", root=tmp_path)
    cache.path({"a": 1}).parent.mkdir(parents=True)
    cache.path({"a": 1}).write_text('{"result": ')
    assert cache.get_or_compute({"a": 1}, lambda: {"x": 2}) == {"x": 2}
    assert json.loads(cache.path({"a": 1}).read_text())["result"] == {"x": 2}


def test_few_calibration_tokens_refused_or_warned(caplog):
    with pytest.raises(ValueError, match="at least 576"):
        check_calibration_tokens(128, 576)
    with caplog.at_level(logging.WARNING):
        check_calibration_tokens(128, 576, allow_few=True)
    assert "Only 128 calibration tokens" in caplog.text
    check_calibration_tokens(576, 576)


def test_figure_next_to_table_gets_its_own_name(world, tmp_path, lr_cache, capsys):
    out = tmp_path / "curve.png"
    tail = ["--windows", "2", "--out", str(out)]
    assert main(["lr", "--model", str(world / "tiny"), "--text", str(world / "text.txt"), "--seqlen", "16", *tail]) == 0
    assert pd.read_csv(out)["layer"].tolist() == [0, 1]  # the table was not overwritten by the plot
    assert (tmp_path / "curve_plot.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "curve_plot.svg").exists()
    assert main(["lr", "--model", str(world / "tiny"), "--out", str(out)]) == 2  # exists: needs --overwrite
    assert "already exists" in capsys.readouterr().err


def test_corrupt_hidden_state_shard_is_recomputed(tmp_path, caplog):
    from helpers.compression.replacement import capture_block_pairs, iter_pairs

    model = tiny_model()
    ids = torch.randint(0, 128, (5, 8), generator=torch.Generator().manual_seed(0))
    folder = capture_block_pairs(model, ids, 1, 2, tmp_path / "pairs", batch_size=2, progress=False)
    good = [torch.cat(pair) for pair in iter_pairs(folder)]
    shard = sorted(folder.glob("pairs_*.pt"))[1]
    shard.write_bytes(shard.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        capture_block_pairs(model, ids, 1, 2, folder, batch_size=2, progress=False)
    assert shard.name in caplog.text and str(folder) in caplog.text
    for again, before in zip(iter_pairs(folder), good, strict=True):
        torch.testing.assert_close(torch.cat(again), before)
