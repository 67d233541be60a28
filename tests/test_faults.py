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
from safetensors.torch import load_file, save_file
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
    _issue28_inputs(root, tokenizer, ids)
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


BAD_BYTE_AT = 100  # where bad_utf8.txt holds its invalid byte


def _edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def _issue28_inputs(root: Path, tokenizer, ids: torch.Tensor) -> None:
    """A pruned folder, a tied --final-dim folder with edited slicing.json copies, a dense folder missing a
    weight, badly encoded texts, an empty LR table, a symlink to the user's folder and an empty folder."""
    from helpers.compression.checkpoints import save_pruned
    from helpers.compression.replacement import replacement_info, streamline
    from helpers.models.pruned_layers import build_replacement

    model = tiny_model(**TINY)
    block = build_replacement("ffn", TINY["hidden_size"], 16)
    streamline(model, 1, 1, block)
    save_pruned(model, tokenizer, root / "pruned", {"removed": [1], "replacement": replacement_info(block, "ffn", 1)})
    model = tiny_model(**TINY)
    rotate_and_slice(model, ids, [24, 16], progress=False, final_dim=8)
    save_sliced(model, tokenizer, root / "sliced_final")
    for name, changes in (
        ("dims_edit", {"dims": [16, 16]}),
        ("tied_flip", {"tied": False}),
        ("final_edit", {"final_dim": 16}),
    ):
        shutil.copytree(root / "sliced_final", root / name)
        _edit_json(root / name / "slicing.json", **changes)
    shutil.copytree(root / "tiny", root / "missing_weight")
    weights = load_file(str(root / "tiny" / "model.safetensors"))
    weights.pop("model.layers.0.mlp.up_proj.weight")
    save_file(weights, str(root / "missing_weight" / "model.safetensors"), metadata={"format": "pt"})
    (root / "bad_utf8.txt").write_bytes(TEXT[:BAD_BYTE_AT].encode() + b"\xff" + TEXT[BAD_BYTE_AT:].encode())
    (root / "latin1.txt").write_bytes(TEXT.replace("river", "rivi\xe8re").encode("latin-1"))
    (root / "lr_empty.csv").write_text("")
    (root / "link_user").symlink_to(root / "user")
    (root / "emptydir").mkdir()


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
    (["rules", "--sb-step", "0", "--sb-only", "--out", "{w}/new"], {}, "--sb-step: invalid step in (0, 1) value"),
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
BAD_INPUTS_28 = [  # issue 28: what a careless or hostile user still broke
    (["ppl", "--model", "{w}/tiny", "--out", "{w}/tiny/config.json", "--overwrite"], {}, "inside the input folder"),
    (["lr", "--model", "{w}/tiny", "--out", "{w}/tiny/lr.csv"], {}, "inside the input folder"),
    (["ppl", "--model", "{w}/tiny", "--out", "/proc/x/r.json"], {}, "cannot create a file in /proc"),
    (
        ["zeroshot", "--model", "{w}/tiny", "--tasks", "piqa", "--out", "/sys/r.json"],
        {},
        "cannot create a file in /sys",
    ),
    (["slice", "--model", "{w}/tiny", "--sp", "0.25", "--out", "/proc/x/s"], {}, "cannot create a file in /proc"),
    (["reproduce", "--size", "smoke", "--out", "/proc/x/rep"], {}, "cannot create a file in /proc"),
    (
        ["ppl", "--model", "{w}/tiny", "--out", "{w}/link_user", "--overwrite"],
        {},
        "is a folder but this output is a file",
    ),
    (["slice", "--model", "{w}/tiny", "--sp", "0.25", "--out", "{w}/link_user", "--overwrite"], {}, "did not write"),
    (["lr", "--model", "{w}/sliced"], {}, "is a sliced model; lr needs a dense one"),
    (["slice", "--model", "{w}/sliced", "--sp", "0.25", *NEW], {}, "is a sliced model; slice needs a dense one"),
    (["prune", "--model", "{w}/sliced", "--n", "1", *NEW], {}, "is a sliced model; prune needs a dense one"),
    (["lr", "--model", "{w}/pruned"], {}, "is a pruned model; lr needs a dense one"),
    (["allocate", "--lr", "{w}/lr.csv", "--sp", "0.3", "--sb", "0.1", "--model", "{w}/sliced"], {}, "allocate needs"),
    (["ppl", "--model", "{w}/dims_edit", *TEXT_ARGS], {}, "slicing.json: field 'dims' gives layer 0 16 dimensions"),
    (["ppl", "--model", "{w}/tied_flip", *TEXT_ARGS], {}, "slicing.json: field 'tied' is false"),
    (["ppl", "--model", "{w}/final_edit", *TEXT_ARGS], {}, "slicing.json: field 'final_dim' is 16"),
    (["ppl", "--model", "{w}/missing_weight", *TEXT_ARGS], {}, "missing ['model.layers.0.mlp.up_proj.weight']"),
    (["ppl", "--model", "{w}/tiny"], {"HELPERS_DEVICE": "meta"}, "HELPERS_DEVICE='meta' cannot run a model forward"),
    (["slice", "--model", "{w}/tiny", "--sp", "0.25", "--offload-dir", "{w}/results.json", *NEW], {}, "is a file"),
    (["zeroshot", "--model", "{w}/tiny", "--tasks", "piqa", "--out", "{w}/newdir/"], {}, "names a folder"),
    (["allocate", "--lr", "{w}/lr_empty.csv", "--sp", "0.3", "--sb", "0.1", "--model", "{w}/tiny"], {}, "lr_empty.csv"),
    (["reproduce", "--check", "--out", "{w}/emptydir"], {}, "emptydir holds no sweep_cells.csv"),
    (
        ["ppl", "--model", "{w}/tiny", "--text", "{w}/bad_utf8.txt"],
        {},
        f"not valid utf-8: byte {BAD_BYTE_AT} is b'\\xff'",
    ),
    (["ppl", "--model", "{w}/tiny", "--text", "{w}/latin1.txt"], {}, "latin1.txt is not valid utf-8"),
    (["ppl", "--model", "{w}/tiny", *TEXT_ARGS, "--encoding", "klingon"], {}, "--encoding 'klingon'"),
]
BAD_INPUTS = BAD_INPUTS + BAD_INPUTS_28


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
    assert len(BAD_INPUTS) >= 30 + len(BAD_INPUTS_28) and len(BAD_INPUTS_28) >= 25


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


# Runs `python -m helpers ARGV` with the command's work patched to wait, after the work, until every
# process named in sys.argv[2] has got as far (marker files): the writers then race for the same --out.
RACER = """
import importlib, pathlib, sys, time
me, others, target, argv = pathlib.Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3], sys.argv[4:]
module_name, name = target.rsplit(".", 1)
module = importlib.import_module(module_name)
work = getattr(module, name)
def wait_for_the_others(*args, **kwargs):
    result = work(*args, **kwargs)
    me.touch()
    deadline = time.time() + 120
    while not all(pathlib.Path(o).exists() for o in others) and time.time() < deadline:
        time.sleep(0.02)
    return result
setattr(module, name, wait_for_the_others)
from helpers.cli import main
sys.exit(main(argv))
"""
RACES = {  # command -> (the function whose end both runs reach before either writes, extra arguments)
    "ppl": ("helpers.evaluation.perplexity.perplexity", ["--text", "{w}/text.txt", "--seqlen", "8", "--windows", "1"]),
    "slice": (
        "helpers.compression.slicing.rotate_and_slice",
        ["--sp", "0.25", "--calib", "{w}/text.txt", "--calib-seqlen", "16", "--calib-windows", "4"],
    ),
}


def _last_line(stderr: str) -> str:
    """The error line of a subprocess's stderr (progress bars may come before it): exactly one, no traceback."""
    assert "Traceback" not in stderr and sum(line.startswith("error:") for line in stderr.splitlines()) == 1, stderr
    return stderr.strip().splitlines()[-1]


def _racers(tmp_path: Path, target: str, argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run one `python -m helpers` per argv at once, each reaching `target`'s end before any writes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    marks = [tmp_path / f"mark{k}" for k in range(len(argvs))]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(mark), ",".join(str(m) for m in marks if m != mark), target, *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mark, argv in zip(marks, argvs, strict=True)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.parametrize("command", sorted(RACES))
def test_two_concurrent_writers_to_one_out_keep_both_results(world, tmp_path, command):
    """Both runs pass the start checks (the --out is free), both finish their work, then race for --out:
    one wins, the other keeps its result under another name and says so in one line (exit 2). Nothing is lost."""
    target, extra = RACES[command]
    out = tmp_path / "runs" / ("same.json" if command == "ppl" else "same")
    argv = [command, "--model", str(world / "tiny"), *[a.format(w=world) for a in extra], "--out", str(out)]
    before = tree_hash(world)
    results = _racers(tmp_path, target, [argv, argv])
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-2000:] for r in results]
    loser = next(r for r in results if r.returncode == 2)
    err = _last_line(loser.stderr)
    assert "kept this run's result as" in err, err
    kept = Path(err.rsplit(" as ", 1)[1].rstrip("."))
    assert kept.parent == out.parent and kept != out
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, kept.name])  # no partial left
    if command == "ppl":
        assert {json.loads(p.read_text())["model"] for p in (out, kept)} == {str(world / "tiny")}
    else:
        for folder in (out, kept):
            assert load_sliced(folder, device="cpu")[0].slicing_info.dims == [24, 24]
    assert tree_hash(world) == before


def test_output_claimed_at_start_is_not_replaced_when_it_changes(tmp_path):
    """The storage layer alone: a file that changed after the start checks is kept; so is this run's result."""
    from helpers.infra.storage import OutputConflictError, check_output, output_claims

    out = tmp_path / "r.json"
    out.write_text("old\n")
    with output_claims():
        check_output(out, overwrite=True)
        out.unlink()
        out.write_text("another run's\n")  # a new file (new inode) appears at the claimed path
        with pytest.raises(OutputConflictError, match="kept this run's result as"), atomic_path(out) as tmp:
            tmp.write_text("mine\n")
    assert out.read_text() == "another run's\n"
    (kept,) = [p for p in tmp_path.iterdir() if p != out]
    assert kept.read_text() == "mine\n" and kept.name == f"r-{os.getpid()}.json"
    with output_claims():  # unchanged since the check: replaced as asked
        check_output(out, overwrite=True)
        with atomic_path(out) as tmp:
            tmp.write_text("mine again\n")
    assert out.read_text() == "mine again\n"


def test_ctrl_c_during_a_run_writes_nothing_and_says_so(world, tmp_path):
    """SIGINT while the work runs: exit 130, one line, no --out and no partial file."""
    out = tmp_path / "r.json"
    argv = ["ppl", "--model", str(world / "tiny"), *[a.format(w=world) for a in TEXT_ARGS], "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    never = tmp_path / "never"  # the run waits for a process that does not exist, until interrupted
    proc = subprocess.Popen(
        [sys.executable, "-c", RACER, str(tmp_path / "mark"), str(never), RACES["ppl"][0], *argv],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (tmp_path / "mark").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "mark").exists(), "the run never reached its work"
    proc.send_signal(signal.SIGINT)
    err = _last_line(proc.communicate(timeout=60)[1])
    assert proc.returncode == 130 and "interrupted" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mark"]


def test_final_dim_below_the_floor_warns_loudly(world, tmp_path, caplog):
    out = tmp_path / "s"
    argv = ["slice", "--model", str(world / "tiny"), "--sp", "0.25", "--final-dim", "1", "--out", str(out)]
    calib = ["--calib", str(world / "text.txt"), "--calib-seqlen", "16", "--calib-windows", "4"]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, *calib]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("WARNING: --final-dim 1 keeps 1 of 32 dimensions" in w and "below 8" in w for w in warnings), warnings
    assert load_sliced(out, device="cpu")[0].slicing_info.final_dim == 1  # documented: warned, then done


def test_other_encodings_only_when_named(world, tmp_path, capsys):
    """latin1.txt is refused as UTF-8 (see BAD_INPUTS_28) and read with --encoding latin-1: 'è' survives."""
    from helpers.infra.textdata import load_text, text_encoding

    with text_encoding("latin-1"):
        assert "rivière" in load_text(str(world / "latin1.txt"))
    out = tmp_path / "r.json"
    argv = [
        "ppl",
        "--model",
        str(world / "tiny"),
        "--text",
        str(world / "latin1.txt"),
        "--seqlen",
        "8",
        "--windows",
        "1",
    ]
    assert main([*argv, "--encoding", "latin-1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["perplexity"] > 1
    with pytest.raises(ValueError, match=f"byte {BAD_BYTE_AT}"):
        load_text(str(world / "bad_utf8.txt"))


def test_model_cache_edit_with_restored_mtime_is_detected(world, tmp_path):
    from helpers.models.loading import _record_weights

    folder = tmp_path / "cache"
    shutil.copytree(world / "tiny", folder)
    _record_weights(folder)
    weights = folder / "model.safetensors"
    stat = weights.stat()
    flip_bytes(weights, at=0.7)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as recorded
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(IntegrityError, match="does not match its recorded SHA-256"):
        check_model_cache(folder)


def test_zeroed_block_anywhere_in_the_weights_gives_new_lr(world, tmp_path, lr_cache):
    """A 64 KiB block zeroed in a > 16 MiB weights file, between where a sampled fingerprint would look, with
    the mtime restored: the LR cache key changes and the new table matches a direct computation."""
    folder = tmp_path / "model"
    model = tiny_model(**{**TINY, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4})
    model.save_pretrained(folder)
    shutil.copy(world / "tiny" / "tokenizer.json", folder)
    shutil.copy(world / "tiny" / "tokenizer_config.json", folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    assert size > 16 << 20
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8 : 8 + header_len])
    offsets = [t["data_offsets"] for k, t in header.items() if k.startswith("model.layers.")]
    layers = (8 + header_len + min(o[0] for o in offsets), 8 + header_len + max(o[1] for o in offsets))
    block = 64 << 10
    sampled = [k * (size - block) // 63 for k in range(64)]  # where the old fingerprint read 64 KiB blocks
    start = next(s + block + 4096 for s in sampled if layers[0] <= s + block + 4096 and s + 3 * block < layers[1])
    assert not any(s < start + block and start < s + block for s in sampled)  # the zeroed block is between them
    args = (str(folder), str(world / "text.txt"), 16, 2)
    first = redundancy.cached_layer_redundancy(*args, progress=False)
    key = redundancy.lr_cache_path(*args)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[start : start + block] = bytes(block)
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert redundancy.lr_cache_path(*args) != key
    second = redundancy.cached_layer_redundancy(*args, progress=False)
    changed, tokenizer = load_model(str(folder), device="cpu")
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :32].view(2, 16)
    np.testing.assert_allclose(second["lr"], redundancy.layer_redundancy(changed, ids, progress=False)["lr"], atol=1e-6)
    assert not np.allclose(first["lr"], second["lr"], atol=1e-7)


def test_pruned_and_sliced_folders_never_load_as_dense(world):
    """load_dense (what LR and block scores use) refuses lab folders; the lab's loader rebuilds them."""
    from helpers.models.loading import load_dense

    for kind in ("pruned", "sliced"):
        with pytest.raises(ValueError, match=f"is a {kind} model; load it with"):
            load_dense(str(world / kind))
    model, _ = load_model(str(world / "pruned"), device="cpu")
    assert type(model.model.layers[1]).__name__ == "ReplacementBlock"
