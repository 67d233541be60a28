"""Slicing on tiny random Llama/Mistral/Qwen2 models: invariance, shapes, layouts, save/reload."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import noisy_model
from transformers import AutoConfig, AutoModelForCausalLM

from helpers.compression import allocation
from helpers.compression.ledger import ledger_totals, parameter_ledger
from helpers.compression.sliced_io import load_sliced, save_sliced
from helpers.compression.slicing import (
    gram,
    make_rotation_invariant,
    rotate_and_slice,
    untie_sliced,
)
from helpers.models.adapters import UnsupportedArchitectureError, get_adapter, supported_model_types
from helpers.models.sliced_layers import PreNormSlicedLayer

FAMILIES = supported_model_types()
DYNAMIC = [48, 40, 56, 32]  # different kept dims per layer: rectangular shortcuts
TOL = 1e-4


def calib(n: int = 6, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_freed_memory_returns_heap_pages():
    """2,000 freed 100 kB tensors stay resident (one tensor above them pins the heap's top) until the trim."""
    code = """
import re
from pathlib import Path
import torch
from helpers.infra.memory import release_freed_memory
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
blocks = [torch.ones(25_000) for _ in range(2000)]
pinned = torch.ones(25_000)
del blocks
held = rss()
print(held, release_freed_memory(), rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    held, released, after = float(out[0]), out[1], float(out[2])
    assert released == "True"
    assert held - after > 150  # MiB: most of the 200 MB of freed blocks went back


@pytest.mark.parametrize("d", [7, 64, 577])
def test_gram_equals_the_full_product(d):
    """The block-triangular x^T x equals numpy's float64 x.T @ x, mirror half included, for uneven block widths."""
    x = torch.randn(300, d, dtype=torch.float64)
    g = gram(x)
    expected = x.numpy().T @ x.numpy()
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_keeps_outputs(family):
    model = noisy_model(family)
    ids = calib(3)
    before = logits(model, ids)
    adapter = get_adapter(model)
    norms = [adapter.final_norm(model)]
    for layer in adapter.layers(model):
        norms += [adapter.input_norm(layer), adapter.post_attention_norm(layer)]
    weights = [p for norm in norms for p in norm.parameters()]  # held, so that their ids stay theirs
    make_rotation_invariant(model)
    kept = {id(p) for p in model.parameters()}
    assert weights and not [p for p in weights if id(p) in kept]  # scales (and biases) folded into the linears
    assert (logits(model, ids) - before).abs().max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_unsliced_rotation_keeps_outputs(family):
    model = noisy_model(family)
    ids = calib()
    before = logits(model, ids)
    rotate_and_slice(model, ids, [64] * 4, progress=False)
    assert (logits(model, ids) - before).abs().max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_slicing_gives_the_closed_form_count_and_reloads(family, tmp_path):
    """Any family: per-layer widths, rectangular MLP shortcuts, ledger parts equal to the closed-form count, reload."""
    model = noisy_model(family)
    adapter, shape = get_adapter(model), allocation.ModelShape.from_config(model.config)
    ids = calib()
    rotate_and_slice(model, ids, DYNAMIC, progress=False)
    for i, layer in enumerate(adapter.layers(model)):
        d_out = DYNAMIC[i + 1] if i + 1 < len(DYNAMIC) else 64
        assert isinstance(layer, adapter.sliced_layer_class)
        assert layer.mlp_shortcut.weight.shape == (d_out, DYNAMIC[i])
    real = ledger_totals(parameter_ledger(model))
    expected = allocation.sliced_param_count(shape, np.array(DYNAMIC), tied=model.slicing_info.tied)
    assert {part: real[part] for part in expected} == expected
    out = logits(model, ids)
    assert out.shape == (6, 32, 128) and torch.isfinite(out).all()
    save_sliced(model, None, tmp_path / "sliced")
    assert torch.equal(logits(load_sliced(tmp_path / "sliced")[0], ids), out)


def test_dynamic_shapes_and_rectangular_shortcuts():
    """The Llama layout by its module names (other families: tests/test_gemma3_tiny.py, tests/test_opt_tiny.py)."""
    model = noisy_model("llama")
    ids = calib()
    rotate_and_slice(model, ids, DYNAMIC, progress=False)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        d_out = DYNAMIC[i + 1] if i + 1 < len(DYNAMIC) else 64
        assert isinstance(layer, PreNormSlicedLayer)
        assert layer.attn_shortcut.weight.shape == (DYNAMIC[i], DYNAMIC[i])
        assert layer.mlp_shortcut.weight.shape == (d_out, DYNAMIC[i])
        assert layer.self_attn.q_proj.weight.shape[1] == DYNAMIC[i]
        assert layer.mlp.down_proj.weight.shape[0] == d_out
    assert model.model.embed_tokens.weight.shape == (128, DYNAMIC[0])
    out = logits(model, ids)
    assert out.shape == (6, 32, 128) and torch.isfinite(out).all()


def test_slicing_changes_outputs_but_keeps_them_close():
    model = noisy_model("llama")
    ids = calib()
    before = logits(model, ids)
    rotate_and_slice(model, ids, [56] * 4, progress=False)
    diff = (logits(model, ids) - before).abs().max()
    assert TOL < diff < before.abs().max()


def test_constant_equals_dynamic_with_equal_dims():
    ids = calib()
    constant, dynamic = noisy_model("llama"), noisy_model("llama")
    dims = allocation.constant_dims(allocation.ModelShape.from_config(constant.config), 0.25)
    assert dims.tolist() == [48] * 4  # (1 - 0.25) x 64 rounded down to 8
    rotate_and_slice(constant, ids, dims, progress=False)
    rotate_and_slice(dynamic, ids, [48] * 4, progress=False)
    assert torch.equal(logits(constant, ids), logits(dynamic, ids))


def test_tied_layout_matches_untied_and_is_smaller():
    """Tied head = shared table + the final norm's d-vector: no d x d output matrix, same logits as untied."""
    ids = calib()
    tied, untied = noisy_model("llama", tied=True), noisy_model("llama", tied=True)
    rotate_and_slice(tied, ids, DYNAMIC, progress=False)
    rotate_and_slice(untied, ids, DYNAMIC, tied=False, progress=False)
    assert tied.slicing_info.tied and not untied.slicing_info.tied
    assert (logits(tied, ids) - logits(untied, ids)).abs().max() < TOL
    assert tied.model.embed_tokens.table.weight is tied.lm_head.table.weight
    own = {name: tuple(p.shape) for name, p in tied.lm_head.named_parameters() if not name.startswith("table.")}
    assert own == {"scale": (64,)}
    n_tied = ledger_totals(parameter_ledger(tied))["total"]
    n_untied = ledger_totals(parameter_ledger(untied))["total"]
    assert n_tied == n_untied - 128 * DYNAMIC[0] + 64 * DYNAMIC[0] + 64


def test_tied_needs_tied_model():
    with pytest.raises(ValueError, match="tied"):
        rotate_and_slice(noisy_model("llama"), calib(), DYNAMIC, tied=True, progress=False)


@pytest.mark.parametrize("dims", [[48] * 3, [0, 48, 48, 48], [65, 48, 48, 48]])
def test_bad_dims_are_rejected(dims):
    with pytest.raises(ValueError, match="dim"):
        rotate_and_slice(noisy_model("llama"), calib(), dims, progress=False)


def test_unsupported_architecture_names_supported_ones():
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match=r"llama.*mistral.*qwen2"):
        make_rotation_invariant(model)


@pytest.mark.parametrize(("family", "tied"), [("llama", True), ("qwen2", False)])
def test_save_and_reload_gives_identical_logits(tmp_path, family, tied):
    model = noisy_model(family, tied=tied)
    ids = calib()
    rotate_and_slice(model, ids, DYNAMIC, progress=False)
    folder = save_sliced(model, None, tmp_path / "sliced")
    assert (folder / "slicing.json").exists() and (folder / "model.safetensors").exists()
    reloaded, _ = load_sliced(folder, device="cpu")
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    assert reloaded.slicing_info.dims == DYNAMIC and reloaded.slicing_info.tied == tied


def test_interrupted_save_leaves_no_folder(tmp_path):
    model = noisy_model("llama")
    rotate_and_slice(model, calib(), DYNAMIC, progress=False)

    class BrokenTokenizer:
        def save_pretrained(self, _folder):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_sliced(model, BrokenTokenizer(), tmp_path / "sliced")
    assert list(tmp_path.iterdir()) == []


def test_save_needs_a_sliced_model(tmp_path):
    with pytest.raises(ValueError, match="sliced"):
        save_sliced(noisy_model("llama"), None, tmp_path / "x")


def test_generation_with_cache_matches_full_forward():
    model = noisy_model("mistral")
    ids = calib()
    rotate_and_slice(model, ids, DYNAMIC, progress=False)
    prompt = ids[:1, :8]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    seq = prompt
    for _ in range(6):
        nxt = logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_kept_variance_is_a_fraction():
    model = noisy_model("llama")
    info = rotate_and_slice(model, calib(), DYNAMIC, progress=False)
    kept = info.kept_variance()
    assert set(kept) == {f"attn_{i}" for i in range(4)} | {f"mlp_{i}" for i in range(4)}
    assert all(0 < v < 1 for v in kept.values())


def test_ledger_matches_allocation_formula_on_tiny_models():
    for family, tied in [("llama", True), ("llama", False), ("qwen2", False)]:
        model = noisy_model(family, tied=tied)
        shape = allocation.ModelShape.from_config(model.config)
        dense = ledger_totals(parameter_ledger(model))
        assert dense["total"] == allocation.dense_param_count(shape)["total"]
        rotate_and_slice(model, calib(), DYNAMIC, progress=False)
        real = ledger_totals(parameter_ledger(model))
        expected = allocation.sliced_param_count(shape, DYNAMIC, tied=tied)
        assert real["total"] == expected["total"]
        for part in ("attention", "mlp", "shortcuts", "norms"):
            assert real[part] == expected[part], part
        assert real["embeddings"] + real["head"] == expected["embeddings"] + expected["head"]


def test_untie_sliced_keeps_outputs():
    ids = calib()
    model = noisy_model("llama", tied=True)
    rotate_and_slice(model, ids, DYNAMIC, progress=False)
    before = logits(model, ids)
    untie_sliced(model)
    assert not model.slicing_info.tied and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert (logits(model, ids) - before).abs().max() < TOL
    with pytest.raises(ValueError, match="tied"):
        untie_sliced(model)


def test_activations_on_disk_give_the_same_model_and_leave_no_files(tmp_path):
    ids = calib()
    in_memory, on_disk = noisy_model("llama", tied=True), noisy_model("llama", tied=True)
    rotate_and_slice(in_memory, ids, DYNAMIC, batch_size=2, progress=False)
    rotate_and_slice(on_disk, ids, DYNAMIC, batch_size=2, progress=False, offload_dir=tmp_path)
    assert torch.equal(logits(in_memory, ids), logits(on_disk, ids))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tied", [True, False])
def test_final_dim_projects_the_last_residual_on_its_principal_directions(tmp_path, tied):
    """final_dim = k: logits equal the full-width model's, with its last residual projected on its top-k PCA."""
    ids, k = calib(), 40
    full, short = noisy_model("llama", tied=True), noisy_model("llama", tied=True)
    rotate_and_slice(full, ids, DYNAMIC, tied=tied, progress=False)
    info = rotate_and_slice(short, ids, DYNAMIC, tied=tied, progress=False, final_dim=k)
    residuals = []  # independent: what the full model's final norm reads, every token (uncentred PCA)
    hook = full.model.norm.register_forward_hook(lambda _m, args, _out: residuals.append(args[0].double()))
    logits(full, ids)
    hook.remove()
    y = residuals[0].reshape(-1, 64)
    top = torch.linalg.eigh(y.T @ y).eigenvectors[:, -k:]
    projected = (residuals[0] @ top @ top.T).float()
    with torch.no_grad():
        expected = full.lm_head(full.model.norm(projected))
    got = logits(short, ids)
    assert (got - expected).abs().max() < TOL
    assert (got - logits(full, ids)).abs().max() > 100 * TOL  # the projection really changed something
    assert tuple(short.lm_head.weight.shape) == (128, k) and info.final_dim == k
    assert "head_4" in info.kept_variance() and ledger_totals(parameter_ledger(short))["head"] == 128 * k
    shape = allocation.ModelShape.from_config(full.config)
    counted = allocation.sliced_param_count(shape, np.array(DYNAMIC), tied=tied, final_dim=k)
    real = ledger_totals(parameter_ledger(short))  # the formula against the real model
    assert all(real[part] == counted[part] for part in ("total", "head", "embeddings", "mlp", "shortcuts"))
    reloaded, _ = load_sliced(save_sliced(short, None, tmp_path / "sliced"), device="cpu")
    assert torch.equal(logits(reloaded, ids), got) and reloaded.slicing_info.final_dim == k


def test_sliced_forward_honours_logits_to_keep_like_dense():
    """Prefill benchmarks ask for the last position's logits only; every head layout must give exactly those."""
    ids = calib()
    models = [noisy_model("llama", tied=True) for _ in range(3)]
    rotate_and_slice(models[1], ids, DYNAMIC, progress=False)
    rotate_and_slice(models[2], ids, DYNAMIC, progress=False, final_dim=40)
    for model in models:
        with torch.no_grad():
            last = model(input_ids=ids, logits_to_keep=1).logits
        assert last.shape == (6, 1, 128)
        assert (last - logits(model, ids)[:, -1:]).abs().max() < 1e-5
