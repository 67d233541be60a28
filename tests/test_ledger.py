"""Parameter ledger, perplexity and speed helpers on tiny models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers.compression.ledger import compression, ledger_by_layer, ledger_totals, parameter_ledger
from helpers.compression.slicing import rotate_and_slice
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.evaluation.speed import generation_speed, prefill_throughput
from helpers.models.loading import tiny_model


def unique_numel(model) -> int:
    return sum({id(p): p.numel() for p in model.parameters()}.values())


@pytest.mark.parametrize("tied", [True, False])
def test_dense_ledger_counts_every_unique_parameter(tied):
    model = tiny_model("qwen2", tie_word_embeddings=tied)
    totals = ledger_totals(parameter_ledger(model))
    assert totals["total"] == unique_numel(model)
    assert totals["head"] == (0 if tied else 128 * 64)
    assert totals["embeddings"] == 128 * 64
    attn = sum(p.numel() for layer in model.model.layers for p in layer.self_attn.parameters())
    mlp = sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())
    assert (totals["attention"], totals["mlp"]) == (attn, mlp)
    assert totals["norms"] == 64 * (2 * 4 + 1) and totals["shortcuts"] == 0 and totals["other"] == 0


def test_sliced_ledger_has_shortcuts_and_per_layer_rows():
    model = tiny_model("llama", tie_word_embeddings=True)
    ids = torch.randint(0, 128, (4, 16))
    dims = [48, 40, 56, 32]
    rotate_and_slice(model, ids, dims, progress=False)
    ledger = parameter_ledger(model)
    totals = ledger_totals(ledger)
    assert totals["total"] == unique_numel(model)
    assert totals["shortcuts"] == sum(d * d for d in dims) + sum(
        a * b for a, b in zip(dims, [*dims[1:], 64], strict=True)
    )
    assert totals["norms"] == 0
    wide = ledger_by_layer(ledger)
    assert list(wide.index) == ["embeddings", "layer 0", "layer 1", "layer 2", "layer 3", "head"]
    assert wide.to_numpy().sum() == totals["total"]


def test_compression():
    assert compression(75, 100) == pytest.approx(0.25)
    assert compression(110, 100) < 0
    with pytest.raises(ValueError):
        compression(1, 0)


def test_perplexity_matches_a_direct_computation():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    result = perplexity_on_ids(model, ids, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert result.tokens == 5 * 11 and result.windows == 5 and not result.bos
    assert math.isclose(result.perplexity, math.exp(nll.item()), rel_tol=1e-5)
    per_window = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(1)
    assert result.window_tokens == (11,) * 5
    assert torch.allclose(torch.tensor(result.window_nll, dtype=torch.float32), per_window, rtol=1e-5)
    assert result.interval().low <= result.perplexity <= result.interval().high
    with pytest.raises(ValueError):
        perplexity_on_ids(model, ids[0], progress=False)


def test_speed_functions_return_positive_rates():
    model = tiny_model("mistral")
    prompts = torch.randint(1, 128, (16, 8))
    gen = generation_speed(model, prompts, new_tokens=4, batch_size=16)
    assert gen["new_tokens"] == 64 and gen["generation_tokens_per_s"] > 0 and gen["peak_memory_mb"] > 0
    pre = prefill_throughput(model, prompts)
    assert pre["prefill_tokens"] == 128 and pre["prefill_tokens_per_s"] > 0
    with pytest.raises(ValueError):
        generation_speed(model, prompts[:2], batch_size=16)


def test_ledger_counts_a_streamline_replacement_block():
    from helpers.compression.replacement import streamline
    from helpers.models.pruned_layers import build_replacement

    model = tiny_model("llama")
    block = build_replacement("swiglu", model.config.hidden_size, 32)
    streamline(model, 1, 2, block)
    ledger = parameter_ledger(model)
    totals = ledger_totals(ledger)
    assert totals["replacement"] == sum(p.numel() for p in block.parameters())
    assert totals["total"] == sum(p.numel() for p in model.parameters())
    assert totals["other"] == 0


def test_layout_ledger_rows_match_unique_parameters_of_each_layout():
    from helpers.compression.allocation import ModelShape, constant_dims
    from helpers.compression.ledger import layout_ledger
    from helpers.compression.slicing import untie_sliced

    model = tiny_model("llama", tie_word_embeddings=True)
    ids = torch.randint(0, 128, (4, 16))
    table = layout_ledger(model, ids, [0.25])
    assert table[["slice", "layout"]].values.tolist() == [[0.0, "dense"], [0.25, "untied"], [0.25, "tied"]]
    tied = copy.deepcopy(model)
    rotate_and_slice(tied, ids, constant_dims(ModelShape.from_config(tied.config), 0.25), progress=False)
    untied = untie_sliced(copy.deepcopy(tied))
    assert table["total"].tolist() == [unique_numel(model), unique_numel(untied), unique_numel(tied)]
    assert table["removed"].iloc[0] == "+0.0%"
