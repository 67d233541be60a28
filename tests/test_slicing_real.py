"""Slicing the real default model (SmolLM2-135M): invariance, layouts, parameter formula, save/reload.

Small calibration (8 windows x 128 tokens of one book) keeps this file fast; the
equivalences tested here do not depend on how good the PCA is. The measured
max abs logit differences are printed (run with -s to see them).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from helpers.compression.allocation import ModelShape, constant_dims, layer_allocation
from helpers.compression.checkpoints import load_model
from helpers.compression.ledger import ledger_totals, parameter_ledger
from helpers.compression.sliced_io import load_sliced, save_sliced
from helpers.compression.slicing import make_rotation_invariant, rotate_and_slice
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.infra.textdata import load_windows

pytestmark = pytest.mark.slow

# Logits of SmolLM2 reach |30-40| and some activations ~1e4, so float32 reordering gives ~1e-3 at most.
LOGIT_TOL = 5e-3
DYNAMIC_30 = [int(v) for v in np.tile([448, 384, 416, 352, 400, 392], 5)]  # mean 398.7 ~ 30.8% sliced


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """eigh on 576 x 576 and small matmuls gain nothing from threads and suffer badly on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense():
    return load_model()


@pytest.fixture(scope="module")
def calib(dense):
    return load_windows(dense[1], "pride-and-prejudice", 128, 8)


@pytest.fixture(scope="module")
def held_out(dense):
    return load_windows(dense[1], "great-expectations", 128, 2)


@pytest.fixture(scope="module")
def dense_logits(dense, held_out):
    with torch.no_grad():
        return dense[0](held_out).logits


@pytest.fixture(scope="module")
def sliced_tied(dense, calib):
    model = copy.deepcopy(dense[0])
    rotate_and_slice(model, calib, DYNAMIC_30, progress=False)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_folding_keeps_logits(dense, held_out, dense_logits):
    model = make_rotation_invariant(copy.deepcopy(dense[0]))
    diff = (logits(model, held_out) - dense_logits).abs().max().item()
    print(f"\nfolding: max abs logit difference {diff:.2e}")
    assert diff < LOGIT_TOL


def test_slicing_at_zero_keeps_logits(dense, calib, held_out, dense_logits):
    model = copy.deepcopy(dense[0])
    rotate_and_slice(model, calib[:2], constant_dims(ModelShape.from_config(model.config), 0.0), progress=False)
    diff = (logits(model, held_out) - dense_logits).abs().max().item()
    print(f"\nslicing 0%: max abs logit difference {diff:.2e}")
    assert diff < LOGIT_TOL


def test_sliced_model_is_smaller_and_still_a_language_model(dense, sliced_tied, held_out):
    dense_total = ledger_totals(parameter_ledger(dense[0]))["total"]
    sliced_total = ledger_totals(parameter_ledger(sliced_tied))["total"]
    assert sliced_total < dense_total
    ppl_dense = perplexity_on_ids(dense[0], held_out, progress=False).perplexity
    ppl_sliced = perplexity_on_ids(sliced_tied, held_out, progress=False).perplexity
    print(f"\nperplexity dense {ppl_dense:.1f}, sliced ~30% tied {ppl_sliced:.1f}")
    assert ppl_dense < ppl_sliced < 50 * ppl_dense


def test_ledger_counts_unique_parameters(dense, sliced_tied):
    for model in (dense[0], sliced_tied):
        unique = {id(p): p.numel() for p in model.parameters()}
        assert ledger_totals(parameter_ledger(model))["total"] == sum(unique.values())
    assert sliced_tied.model.embed_tokens.table.weight is sliced_tied.lm_head.table.weight


def test_parameter_count_equals_allocation_formula(dense, sliced_tied):
    allocation = pytest.importorskip("helpers.compression.allocation")
    shape = allocation.ModelShape.from_config(dense[0].config)
    assert shape.tied_embeddings
    assert ledger_totals(parameter_ledger(dense[0]))["total"] == allocation.dense_param_count(shape)["total"]
    expected = allocation.sliced_param_count(shape, DYNAMIC_30)
    assert ledger_totals(parameter_ledger(sliced_tied))["total"] == expected["total"]


def test_tied_and_untied_give_the_same_logits(dense, calib, sliced_tied, held_out):
    untied = copy.deepcopy(dense[0])
    rotate_and_slice(untied, calib, DYNAMIC_30, tied=False, progress=False)
    diff = (logits(untied, held_out) - logits(sliced_tied, held_out)).abs().max().item()
    print(f"\ntied vs untied: max abs logit difference {diff:.2e}")
    assert diff < LOGIT_TOL
    n_tied = ledger_totals(parameter_ledger(sliced_tied))["total"]
    n_untied = ledger_totals(parameter_ledger(untied))["total"]
    assert n_tied < n_untied


def test_save_and_reload(dense, sliced_tied, held_out, tmp_path):
    folder = save_sliced(sliced_tied, dense[1], tmp_path / "smollm-sliced")
    model, tokenizer = load_model(str(folder))
    diff = (logits(model, held_out) - logits(sliced_tied, held_out)).abs().max().item()
    assert diff == 0.0
    again, _ = load_sliced(folder, device="cpu")
    assert again.slicing_info.dims == DYNAMIC_30
    prompt = tokenizer("The house was", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    print(f"\nreloaded model continues 'The house was' with {text!r}")
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8 and text.strip()


def test_sb_equal_sp_reproduces_constant_slicing(dense, calib, held_out):
    shape = ModelShape.from_config(dense[0].config)
    lr = np.linspace(0.5, 0.99, shape.n_layers) ** 2  # any scores: SB = SP ignores them
    dims = layer_allocation(lr, sp=0.3, sb=0.3, shape=shape).kept_dim.tolist()
    assert dims == [int(0.7 * 576) // 8 * 8] * shape.n_layers  # SliceGPT's rounding, written out
    constant, dynamic = copy.deepcopy(dense[0]), copy.deepcopy(dense[0])
    rotate_and_slice(constant, calib[:2], constant_dims(shape, 0.3), progress=False)
    rotate_and_slice(dynamic, calib[:2], dims, progress=False)
    assert torch.equal(logits(constant, held_out), logits(dynamic, held_out))
