"""Depth pruning: block scores, layer removal, save/reload, LLM-Streamline replacement, stability."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from helpers.analysis.block_scores import block_scores
from helpers.analysis.capture import collect_hidden_states
from helpers.analysis.redundancy import layer_redundancy, token_cosine
from helpers.compression.checkpoints import load_model, load_pruned, save_pruned
from helpers.compression.depth import parameter_count, remove_layers
from helpers.compression.replacement import make_replacement, replacement_info, streamline, train_replacement
from helpers.evaluation.stability import stability
from helpers.models.adapters import get_adapter, supported_model_types
from helpers.models.loading import tiny_model

FAMILIES = supported_model_types()


def _ids(n=3, seqlen=12, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_block_scores_match_direct_computation(family):
    model = tiny_model(family, num_hidden_layers=5)
    ids = _ids()
    scores = block_scores(model, ids, batch_size=2, progress=False)
    states = collect_hidden_states(model, ids)
    for low in range(len(states)):
        for high in range(low + 1, len(states)):
            cos = token_cosine(states[low], states[high])
            assert scores.cos_all[low, high] == pytest.approx(cos.mean().item(), abs=1e-5)
            assert scores.cos_last[low, high] == pytest.approx(cos[:, -1].mean().item(), abs=1e-5)
            angle = torch.arccos(cos[:, -1].clamp(-1, 1)) / torch.pi
            assert scores.ang_last[low, high] == pytest.approx(angle.mean().item(), abs=1e-5)
    bi = scores.bi()
    lr = layer_redundancy(model, ids, batch_size=2, progress=False)["lr"].to_numpy()
    assert np.allclose(scores.lr(), lr, atol=1e-5)  # the n = 1 row is LR, so compare.py reuses it
    assert np.allclose(bi, [1 - token_cosine(states[i], states[i + 1]).mean().item() for i in range(5)], atol=1e-5)
    assert sorted(scores.choose("shortgpt", 2)) == sorted(np.argsort(bi)[:2].tolist())
    heat = scores.by_length("cos_all")
    assert heat.shape == (5, 5) and np.isnan(heat[4, 1]) and heat[1, 0] == scores.cos_all[0, 2]
    start = scores.choose("streamline", 2)[0]
    assert scores.cos_all[start, start + 2] == np.nanmax(heat[1])
    with pytest.raises(ValueError, match="n must be"):
        scores.choose("gromov", 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_layers_keeps_a_working_model(family, tmp_path):
    model = tiny_model(family, num_hidden_layers=5)
    ids = _ids()
    before = _logits(model, ids)
    assert torch.equal(_logits(remove_layers(model, []), ids), before)

    adapter = get_adapter(model)
    per_layer = parameter_count(adapter.layers(model)[0])
    total = parameter_count(model)
    remove_layers(model, [1, 3])
    assert model.config.num_hidden_layers == len(adapter.layers(model)) == 3
    assert parameter_count(model) == total - 2 * per_layer
    assert [adapter.attention(layer).layer_idx for layer in adapter.layers(model)] == [0, 1, 2]
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 3
    # generation with the KV cache must match recomputation from scratch
    prompt = ids[:1, :6]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 12) and torch.equal(cached, uncached)

    save_pruned(model, None, tmp_path / "pruned", {"removed": [1, 3]})
    reloaded, _ = load_pruned(tmp_path / "pruned", device="cpu")
    assert torch.allclose(_logits(reloaded, ids), _logits(model, ids), atol=1e-5)
    with pytest.raises(ValueError, match="distinct"):
        remove_layers(model, [0, 0])
    with pytest.raises(ValueError, match="every layer"):
        remove_layers(model, [0, 1, 2])


@pytest.mark.parametrize("kind", ["ffn", "swiglu", "layer"])
def test_replacement_inserts_saves_and_reloads(kind, tmp_path):
    model = tiny_model("llama", num_hidden_layers=5)
    ids = _ids()
    module = make_replacement(model, kind, 1, 2)
    if kind != "layer":  # zero-initialised output: starts as skipping the block
        skipped = remove_layers(copy.deepcopy(model), [1, 2])
        with_module = streamline(copy.deepcopy(model), 1, 2, copy.deepcopy(module))
        assert torch.allclose(_logits(with_module, ids), _logits(skipped, ids), atol=1e-6)
    for p in module.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    streamline(model, 1, 2, module)
    assert model.config.num_hidden_layers == 4
    generated = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, use_cache=False))
    save_pruned(model, None, tmp_path / "m", {"removed": [1, 2], "replacement": replacement_info(module, kind, 1)})
    reloaded, _ = load_pruned(tmp_path / "m", device="cpu")
    assert torch.allclose(_logits(reloaded, ids), _logits(model, ids), atol=1e-5)


def test_layer_replacement_is_causal():
    """A decoder-layer replacement trained on hidden states must not see future tokens."""
    from helpers.compression.replacement import _LayerRunner

    model = tiny_model("llama", num_hidden_layers=4)
    runner = _LayerRunner(make_replacement(model, "layer", 1, 2), model)
    x = torch.randn(1, 10, 64)
    y = x.clone()
    y[:, 6:] = torch.randn(1, 4, 64)
    with torch.no_grad():
        assert torch.allclose(runner(x)[:, :6], runner(y)[:, :6], atol=1e-5)
        assert not torch.allclose(runner(x)[:, 6:], runner(y)[:, 6:])


def test_stability():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(200, 4))
    labels = rng.integers(0, 4, 200)
    assert stability(dense, dense, labels) == pytest.approx(1.0)
    perturbed = dense + rng.normal(scale=1.0, size=dense.shape)
    value = stability(dense, perturbed, labels)
    assert 0.0 < value < 1.0
    # questions where the dense model is confident weigh more: flip only the most confident one
    spread = dense.std(1)
    flipped = dense.copy()
    top = int(np.argmax(spread))
    flipped[top] = -flipped[top] if np.argmax(dense[top]) == labels[top] else np.eye(4)[labels[top]] * 99
    lost = 1.0 - stability(dense, flipped, labels)
    weights = np.exp(spread - spread.max()) / np.exp(spread - spread.max()).sum()
    assert lost == pytest.approx(weights[top])
    with pytest.raises(ValueError):
        stability(dense, dense[:10], labels)


@pytest.mark.slow
def test_real_model_replacement_beats_identity(smollm, tmp_path):
    from helpers.infra.textdata import load_windows

    model, tok = smollm
    ids = load_windows(tok, "gutenberg", 128, 10)
    module, history = train_replacement(
        model,
        ids[:8],
        ids[8:],
        12,
        4,
        kind="ffn",
        max_steps=24,
        eval_every=8,
        patience=3,
        batch_size=2,
        cache_dir=tmp_path,
        progress=False,
    )
    assert history["best_val_mse"] < history["identity_mse"]
    assert history["val_loss"][0] == pytest.approx(history["identity_mse"])  # zero-initialised start
    pruned = streamline(copy.deepcopy(model), 12, 4, module)
    assert len(pruned.model.layers) == 27
    save_pruned(
        pruned,
        tok,
        tmp_path / "pruned",
        {"removed": list(range(12, 16)), "replacement": replacement_info(module, "ffn", 12)},
    )
    reloaded, _ = load_model(str(tmp_path / "pruned"))
    assert torch.allclose(_logits(reloaded, ids[:1, :32]), _logits(pruned, ids[:1, :32]), atol=1e-4)
    text = tok.decode(reloaded.generate(ids[:1, :16], max_new_tokens=8, do_sample=False)[0, 16:])
    assert len(text.strip()) > 0


def test_comparison_table_from_cells():
    from helpers.experiments.methods_report import comparison_table

    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 4)).tolist()
    labels = rng.integers(0, 4, 30).tolist()
    noisy = (np.array(scores) + rng.normal(scale=2.0, size=(30, 4))).tolist()

    def cell(params, task_scores, nll=3.0, tokens=0):
        correct = (np.argmax(task_scores, 1) == labels).astype(int).tolist()
        task = dict(acc_norm=float(np.mean(correct)), correct=correct, scores=task_scores, labels=labels)
        return dict(
            layers=4,
            params=params,
            ppl_eval=float(np.exp(nll)),
            eval_window_nll=[nll * 10] * 4,
            eval_window_tokens=[10] * 4,
            info={},
            training={"tokens": tokens, "seconds": 1.0, "peak_memory_mb": 10.0} if tokens else None,
            tasks={"piqa": task},
        )

    dense = cell(100, scores)
    cells = {
        ("dynamic slicing", 0.3, "none"): cell(75, noisy, nll=3.5),
        ("dynamic slicing", 0.3, "LoRA"): cell(75, scores, nll=3.2, tokens=64),
    }
    table = comparison_table(cells, dense).set_index(["method", "recovery"])
    before, after = table.loc[("dynamic slicing", "none")], table.loc[("dynamic slicing", "LoRA")]
    assert table.loc[("dense", "none"), "stability"] == pytest.approx(1.0) and 0 < before["stability"] < 1
    assert before["removed_pct"] == pytest.approx(25.0) and after["params"] == before["params"]
    right = np.mean(np.argmax(scores, 1) == labels)
    assert table.loc[("dense", "none"), "avg_acc_se"] == pytest.approx(np.sqrt(right * (1 - right) / 29))
    assert after["gain_acc_diff"] == pytest.approx(after["avg_acc"] - before["avg_acc"])
    assert after["gain_ppl_verdict"] == "better" and after["gain_ppl_diff_high"] < 0  # every window's NLL fell
    assert after["tokens"] == 64 and before["tokens"] == 0 and after["acc_diff"] == 0  # its own reference
    assert table.loc[("dense", "none"), "perplexity_low"] == pytest.approx(np.exp(3.0))
