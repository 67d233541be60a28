"""The real Gemma-3-270m (Q4_K_M weights dequantised to float32) through the pipeline, kept small (262k vocab)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from helpers.analysis.capture import collect_hidden_states
from helpers.analysis.redundancy import layer_redundancy
from helpers.compression import allocation
from helpers.compression.allocation import ModelShape, constant_dims, layer_allocation
from helpers.compression.checkpoints import load_model
from helpers.compression.ledger import ledger_totals, parameter_ledger
from helpers.compression.sliced_io import save_sliced
from helpers.compression.slicing import rotate_and_slice
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.evaluation.zeroshot import encode_pair, evaluate_task
from helpers.infra.textdata import load_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from helpers.models.loading import MissingWheelError

    try:
        return load_model("gemma3-270m", device="cpu")
    except MissingWheelError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def windows(gemma):
    """Two windows of 64 tokens of Pride and Prejudice, each starting with the BOS."""
    return load_windows(gemma[1], "pride-and-prejudice", 64, 2)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_windows_start_with_bos_and_bos_matters(gemma, windows):
    model, tokenizer = gemma
    assert (windows[:, 0] == tokenizer.bos_token_id).all() and (windows[:, 1:] != tokenizer.bos_token_id).all()
    with_bos = perplexity_on_ids(model, windows, progress=False)
    without = perplexity_on_ids(model, windows[:, 1:], progress=False)
    assert with_bos.bos and not without.bos
    assert with_bos.perplexity < without.perplexity


def test_lr_leaves_the_bos_out(gemma, windows):
    model, _ = gemma
    lr = layer_redundancy(model, windows, progress=False)["lr"].to_numpy()
    states = collect_hidden_states(model, windows)
    direct = [
        torch.nn.functional.cosine_similarity(a[:, 1:].double(), b[:, 1:].double(), dim=-1).mean().item()
        for a, b in itertools.pairwise(states)
    ]
    assert lr.shape == (18,) and np.allclose(lr, direct, atol=1e-4)


def test_rotation_without_slicing_keeps_logits(gemma, windows):
    model, _ = gemma
    rotated = copy.deepcopy(model)
    rotate_and_slice(rotated, windows, [640] * 18, progress=False)
    before, after = logits(model, windows), logits(rotated, windows)
    assert (after - before).abs().max() < 5e-3 * before.abs().max()
    assert torch.equal(after.argmax(-1), before.argmax(-1))


@pytest.mark.parametrize("kind", ["constant", "dynamic"])
def test_slicing_runs_keeps_tied_and_reloads(gemma, windows, kind, tmp_path):
    model, tokenizer = gemma
    if kind == "constant":
        dims = constant_dims(ModelShape.from_config(model.config), 0.25).tolist()
    else:
        lr = layer_redundancy(model, windows, progress=False)["lr"].to_numpy()
        dims = layer_allocation(lr, 0.25, 0.1, ModelShape.from_config(model.config)).kept_dim.tolist()
    sliced = copy.deepcopy(model)
    rotate_and_slice(sliced, windows, dims, progress=False)
    assert sliced.model.embed_tokens.table.weight is sliced.lm_head.table.weight  # still one 262k x 640 table
    totals = ledger_totals(parameter_ledger(sliced))
    shape = allocation.ModelShape.from_config(model.config)
    assert totals["total"] == allocation.sliced_param_count(shape, np.array(dims))["total"]
    assert totals["post_norm_maps"] == 640 * (sum(dims) + sum(dims[1:]) + 640)
    out = logits(sliced, windows)
    assert torch.isfinite(out).all()
    save_sliced(sliced, tokenizer, tmp_path / kind)
    reloaded, reloaded_tokenizer = load_model(str(tmp_path / kind), device="cpu")
    assert torch.equal(logits(reloaded, windows), out)
    assert reloaded_tokenizer.prepend_bos  # the family's BOS decision survives the round trip


def test_zero_shot_puts_the_bos_first(gemma):
    model, tokenizer = gemma
    ids, n_cont = encode_pair(tokenizer, "The sky is", " blue")
    assert ids[0] == tokenizer.bos_token_id and n_cont >= 1
    result = evaluate_task(model, tokenizer, "arc_easy", limit=4, batch_size=4)
    assert result.summary["n"] == 4 and 0 <= result.summary["acc_norm"] <= 1
