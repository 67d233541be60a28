"""OPT on tiny random configs: LayerNorm folding with mean-centring, learned positions, rectangular shortcuts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.compression import allocation
from helpers.compression.ledger import ledger_totals, parameter_ledger
from helpers.compression.sliced_io import load_sliced, save_sliced
from helpers.compression.slicing import make_rotation_invariant, rotate_and_slice
from helpers.models.loading import tiny_model

DIMS = [48, 40, 56, 32]
TOL = 1e-4


def noisy_opt(seed: int = 0, tied: bool = True):
    """A tiny OPT whose LayerNorm scales and biases are random and far from (1, 0)."""
    model = tiny_model("opt", seed=seed, tie_word_embeddings=tied)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.25 + 1.5 * torch.rand(param.shape, generator=gen) - 0.75 * name.endswith("bias"))
    return model


def calib(n: int = 6, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(2, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_folding_centres_the_residual_stream_and_keeps_outputs():
    ids = calib()
    model = noisy_opt()
    before = logits(model, ids)
    make_rotation_invariant(model)
    assert (logits(model, ids) - before).abs().max() < TOL
    assert model.model.decoder.embed_tokens.weight.mean(-1).abs().max() < 1e-6  # rows are mean-free
    assert model.model.decoder.embed_positions.weight.mean(-1).abs().max() < 1e-6
    assert model.lm_head.bias is not None  # the final LayerNorm's bias, folded into the head


def test_rmsnorm_families_are_not_centred():
    """Centring is right for LayerNorm and wrong for RMSNorm: a Llama's embedding rows keep their means."""
    model = tiny_model("llama")
    means = model.model.embed_tokens.weight.mean(-1).clone()
    make_rotation_invariant(model)
    assert torch.equal(model.model.embed_tokens.weight.mean(-1), means) and means.abs().max() > 1e-3


def test_full_width_rotation_keeps_outputs():
    ids = calib()
    model = noisy_opt()
    before = logits(model, ids)
    rotate_and_slice(model, ids, [64] * 4, progress=False)
    assert (logits(model, ids) - before).abs().max() < TOL


def test_dynamic_slicing_shapes_ledger_and_reload(tmp_path):
    ids = calib()
    model = noisy_opt()
    shape = allocation.ModelShape.from_config(model.config)
    assert allocation.dense_param_count(shape)["total"] == sum(p.numel() for p in model.parameters())
    rotate_and_slice(model, ids, DIMS, progress=False)  # ships tied; LayerNorm families slice untied
    assert not model.slicing_info.tied
    for i, layer in enumerate(model.model.decoder.layers):
        d_out = DIMS[i + 1] if i + 1 < len(DIMS) else 64
        assert layer.attn_shortcut.weight.shape == (DIMS[i], DIMS[i])
        assert layer.mlp_shortcut.weight.shape == (d_out, DIMS[i])
        assert layer.mlp.fc2.weight.shape[0] == d_out
    assert model.model.decoder.embed_positions.weight.shape[1] == DIMS[0]
    real = ledger_totals(parameter_ledger(model))
    expected = allocation.sliced_param_count(shape, np.array(DIMS), tied=False)
    for part in ("embeddings", "head", "attention", "mlp", "shortcuts", "total"):
        assert real[part] == expected[part], part
    out = logits(model, ids)
    save_sliced(model, None, tmp_path / "opt")
    reloaded, _ = load_sliced(tmp_path / "opt")
    assert torch.equal(logits(reloaded, ids), out)


def test_tied_layout_is_refused_for_layernorm():
    with pytest.raises(ValueError, match="tied"):
        rotate_and_slice(noisy_opt(), calib(), DIMS, tied=True, progress=False)
