"""Gemma 3 on tiny random configs: (1 + w) norms, post-norm blocks, scaled embeddings, sliding/global layers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from helpers.analysis.capture import collect_hidden_states
from helpers.analysis.redundancy import layer_redundancy
from helpers.compression import allocation
from helpers.compression.ledger import ledger_totals, parameter_ledger
from helpers.compression.sliced_io import load_sliced, save_sliced
from helpers.compression.slicing import make_rotation_invariant, rotate_and_slice, untie_sliced
from helpers.models.adapters import get_adapter
from helpers.models.loading import tiny_model
from helpers.models.sliced_layers import PostNormSlicedLayer

DIMS = [48, 40, 56, 32, 48, 40]  # six layers: five sliding, one global
TOL = 1e-4


def noisy_gemma(tied: bool, seed: int = 0):
    """A tiny Gemma 3 whose norm weights w are random around 0 (scales 1 + w far from 1), window 8 < seqlen."""
    model = tiny_model("gemma3_text", seed=seed, num_hidden_layers=6, tie_word_embeddings=tied)  # tiny_config: window 8
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(-0.5 + 1.5 * torch.rand(param.shape, generator=gen))
    return model


def calib(n: int = 6, seqlen: int = 32) -> torch.Tensor:
    ids = torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2  # the BOS, as Gemma windows start
    return ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_config_has_both_attention_kinds_and_the_family_wants_bos():
    model = noisy_gemma(tied=True)
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    assert model.config.sliding_window < calib().shape[1]  # the window really cuts the test windows
    assert get_adapter(model).prepend_bos and not get_adapter(tiny_model("llama")).prepend_bos
    assert model.model.embed_tokens.embed_scale.item() == pytest.approx(8.0)  # sqrt(64)


@pytest.mark.parametrize("tied", [True, False])
def test_folding_and_full_width_rotation_keep_outputs(tied):
    ids = calib()
    model = noisy_gemma(tied)
    before = logits(model, ids)
    make_rotation_invariant(model)
    assert (logits(model, ids) - before).abs().max() < TOL
    model = noisy_gemma(tied)
    rotate_and_slice(model, ids, [64] * 6, progress=False)
    assert (logits(model, ids) - before).abs().max() < TOL


@pytest.mark.parametrize("tied", [True, False])
def test_dynamic_slicing_shapes_ledger_and_reload(tied, tmp_path):
    ids = calib()
    model = noisy_gemma(tied)
    shape = allocation.ModelShape.from_config(model.config)
    assert ledger_totals(parameter_ledger(model))["total"] == sum(p.numel() for p in model.parameters())
    assert allocation.dense_param_count(shape)["total"] == sum(p.numel() for p in model.parameters())
    before = logits(model, ids)
    rotate_and_slice(model, ids, DIMS, progress=False)
    for i, layer in enumerate(model.model.layers):
        d_out = DIMS[i + 1] if i + 1 < len(DIMS) else 64
        assert isinstance(layer, PostNormSlicedLayer)
        assert layer.self_attn.q_proj.weight.shape[1] == DIMS[i]
        assert layer.self_attn.o_proj.weight.shape[0] == 64  # the output norm acts in the original basis
        assert layer.attn_map.weight.shape == (DIMS[i], 64) and layer.mlp_map.weight.shape == (d_out, 64)
        assert layer.mlp_shortcut.weight.shape == (d_out, DIMS[i])
    out = logits(model, ids)
    assert 0 < (out - before).abs().max() < before.abs().max()
    real = ledger_totals(parameter_ledger(model))
    expected = allocation.sliced_param_count(shape, np.array(DIMS), tied=tied)
    assert real["post_norm_maps"] == 64 * (sum(DIMS) + sum(DIMS[1:]) + 64) > 0
    for part in ("embeddings", "head", "attention", "mlp", "shortcuts", "post_norm_maps", "total"):
        assert real[part] == expected[part], part
    if tied:
        assert model.model.embed_tokens.table.weight is model.lm_head.table.weight
    save_sliced(model, None, tmp_path / "g")
    reloaded, _ = load_sliced(tmp_path / "g")
    assert torch.equal(logits(reloaded, ids), out)


def test_lr_leaves_the_bos_out_but_the_pca_keeps_it():
    """LR is about the text: BOS positions do not count. PCA keeps them: the sliced model must carry the sink."""
    ids = calib()
    model = noisy_gemma(tied=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[2] *= 1000  # a huge BOS embedding
    states = collect_hidden_states(model, ids)
    direct = [torch.cosine_similarity(a[:, 1:], b[:, 1:], dim=-1).mean().item() for a, b in itertools.pairwise(states)]
    assert np.allclose(layer_redundancy(model, ids, progress=False)["lr"], direct, atol=1e-5)
    info = rotate_and_slice(model, ids, [64] * 6, progress=False)
    first = collect_hidden_states(noisy_gemma(tied=False), ids)[0]
    assert info.eigenvalues["attn_0"][0] > 1000 * first.pow(2).sum()  # the BOS direction leads the spectrum


def test_untying_keeps_the_embedding_scale():
    # the tied table is Gemma's scaled embedding module (rows x sqrt(d)); the untied table must carry that factor
    ids = calib()
    model = noisy_gemma(tied=True)
    rotate_and_slice(model, ids, DIMS, progress=False)
    tied = logits(model, ids)
    untie_sliced(model)
    assert not model.slicing_info.tied
    assert type(get_adapter(model).embedding(model)) is torch.nn.Embedding
    assert (logits(model, ids) - tied).abs().max() < TOL
