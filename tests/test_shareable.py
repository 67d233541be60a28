"""Sliced (tied, untied, with and without `final_dim`) and pruned folders load with plain transformers, in an
interpreter that never imports helpers, and give the lab loader's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import run_without_helpers
from transformers import AutoModelForCausalLM

from helpers.compression.checkpoints import load_model, save_pruned
from helpers.compression.replacement import replacement_info, streamline
from helpers.compression.sliced_io import save_sliced
from helpers.compression.slicing import rotate_and_slice
from helpers.models.loading import tiny_model
from helpers.models.pruned_layers import build_replacement

TOL = 1e-5

# Loads every folder given with transformers alone and saves its logits; helpers cannot be imported (the
# venv may have it installed, so a finder refuses it), and nothing may have imported it.
PLAIN = """
import sys
class NoHelpers:
    def find_spec(self, name, path=None, target=None):
        if name == "helpers" or name.startswith("helpers."):
            raise ImportError("helpers is blocked in this interpreter")
sys.meta_path.insert(0, NoHelpers())
import torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, folder + ".logits")
    print(folder, type(model).__name__)
assert not [name for name in sys.modules if name == "helpers" or name.startswith("helpers.")]
"""


def _ids(seqlen: int = 16) -> torch.Tensor:
    ids = torch.randint(3, 128, (4, seqlen), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2  # a BOS, as Gemma windows start
    return ids


def _sliced(tmp_path, family: str, tied: bool, final_dim: int | None = None, **config) -> str:
    model = tiny_model(family, seed=1, tie_word_embeddings=tied, **config)
    rotate_and_slice(model, _ids(), [48, 40, 56, 32], progress=False, final_dim=final_dim)
    assert model.slicing_info.tied == tied
    name = f"{family}-{'tied' if tied else 'untied'}-final{final_dim or 'full'}"
    return str(save_sliced(model, None, tmp_path / name))


def _pruned(tmp_path) -> str:
    model = tiny_model("llama", seed=2, num_hidden_layers=5, tie_word_embeddings=True)
    block = build_replacement("swiglu", 64, 32)
    for param in block.parameters():
        param.data.add_(0.05 * torch.randn_like(param))  # a trained-looking replacement, not the identity
    streamline(model, 1, 2, block)
    info = {"removed": [1, 2], "replacement": replacement_info(block, "swiglu", 1)}
    return str(save_pruned(model, None, tmp_path / "pruned", info))


def test_saved_folders_load_with_plain_transformers(tmp_path):
    folders = [
        _sliced(tmp_path, "llama", tied=True),
        _sliced(tmp_path, "llama", tied=False),
        _sliced(tmp_path, "llama", tied=True, final_dim=24),  # the head reads 24 of 64 coordinates
        _sliced(tmp_path, "llama", tied=False, final_dim=24),
        _sliced(tmp_path, "gemma3_text", tied=True, head_dim=16, sliding_window=8),
        _pruned(tmp_path),
    ]
    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    run_without_helpers(PLAIN, [str(tmp_path / "ids.pt"), *folders], tmp_path)
    for folder in folders:
        lab, _ = load_model(folder, device="cpu")
        with torch.no_grad():
            expected = lab(input_ids=ids).logits
        plain = torch.load(folder + ".logits")
        assert plain.shape == expected.shape
        assert (plain - expected).abs().max() < TOL, folder
        spec = json.loads((Path(folder) / "config.json").read_text())["lab_checkpoint"]
        if spec["format"] == "sliced":  # the record names the head's width, as slicing.json does
            assert spec["final_dim"] == json.loads((Path(folder) / "slicing.json").read_text())["final_dim"]
            assert spec["final_dim"] == (24 if "final24" in folder else 64)


def test_unsupported_family_is_refused_in_one_line(tmp_path, monkeypatch):
    model = tiny_model("opt", ffn_dim=96, word_embed_proj_dim=64)
    rotate_and_slice(model, _ids(), [48, 40, 56, 32], progress=False)
    folder = save_sliced(model, None, tmp_path / "opt")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    with pytest.raises(NotImplementedError, match="sliced opt model loads only with the lab"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    load_model(str(folder), device="cpu")  # the lab's loader still reads it
