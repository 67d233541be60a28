"""Layer Redundancy: streamed capture against a direct computation, memory, architectures, cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers.analysis.capture import collect_hidden_states, layer_hooks
from helpers.analysis.redundancy import layer_redundancy, lr_table, normalise, token_cosine
from helpers.models.adapters import supported_model_types
from helpers.models.loading import tiny_model


def direct_lr(model, ids: torch.Tensor) -> np.ndarray:
    """LR from output_hidden_states, with a hook supplying the raw last-layer output."""
    raw_last = {}
    last = len(model.model.layers) - 1

    def grab(index, _x_in, x_out):
        if index == last:
            raw_last["x"] = x_out.detach().clone()

    with torch.no_grad(), layer_hooks(model, grab):
        hs = list(model(ids, output_hidden_states=True).hidden_states)
    hs[-1] = raw_last["x"]  # hidden_states[-1] has the final norm applied
    cos = [torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean().item() for i in range(last + 1)]
    return np.array(cos)


@pytest.mark.slow
def test_streamed_lr_matches_direct_computation_on_real_model(smollm, book_windows):
    model, _ = smollm
    streamed = layer_redundancy(model, book_windows, batch_size=3, progress=False)
    expected = direct_lr(model, book_windows)
    assert len(streamed) == model.config.num_hidden_layers
    np.testing.assert_allclose(streamed["lr"].to_numpy(), expected, atol=1e-4)


@pytest.mark.slow
def test_last_layer_lr_uses_raw_output_not_final_norm(smollm, book_windows):
    model, _ = smollm
    ids = book_windows[:2]
    with torch.no_grad():
        normed = model(ids, output_hidden_states=True).hidden_states
    states = collect_hidden_states(model, ids)
    streamed_last = layer_redundancy(model, ids, progress=False)["lr"].iloc[-1]
    with_norm = token_cosine(normed[-2], normed[-1]).mean().item()
    raw = token_cosine(states[-2], states[-1]).mean().item()
    assert streamed_last == pytest.approx(raw, abs=1e-5)
    assert abs(with_norm - raw) > 1e-3, "the final norm should visibly change the last cosine"


def test_token_cosine_is_rowwise_and_counts_zero_vectors_as_half():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 1.0], [6.0, 8.0]])
    np.testing.assert_allclose(token_cosine(a, b).numpy(), [0.0, 0.5, 1.0], atol=1e-7)


def test_padding_tokens_are_excluded():
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 128, (2, 16))
    full = layer_redundancy(model, ids[:1], progress=False)["lr"].to_numpy()
    # Second window is all padding after 0 tokens of content: masking it out must leave window 1's LR.
    mask = torch.ones_like(ids)
    mask[1] = 0
    mask[1, 0] = 1  # one real token so the window is not empty
    masked = layer_redundancy(model, ids, attention_mask=mask, progress=False)["lr"].to_numpy()
    states = collect_hidden_states(model, ids[1:, :1])
    first_token = np.array([token_cosine(states[i], states[i + 1]).item() for i in range(3)])
    np.testing.assert_allclose(masked, (full * 16 + first_token) / 17, atol=1e-5)


@pytest.mark.parametrize("model_type", supported_model_types())
def test_tiny_architectures_give_one_lr_per_layer(model_type):
    model = tiny_model(model_type, num_hidden_layers=5)
    table = layer_redundancy(model, torch.randint(0, 128, (3, 12)), batch_size=2, progress=False)
    assert list(table.columns) == ["layer", "lr", "bi", "lr_norm"]
    assert table["layer"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(table["bi"], 1 - table["lr"])
    assert table["lr_norm"].min() == 0 and table["lr_norm"].max() == 1
    assert np.all(np.abs(table["lr"]) <= 1 + 1e-6)


def test_normalise_rejects_constant_and_nan_scores():
    with pytest.raises(ValueError, match="equal"):
        normalise(np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        lr_table(np.array([0.5, np.nan]))


def test_capture_hooks_are_removed_after_use():
    model = tiny_model("llama")
    seen = []
    with layer_hooks(model, lambda i, a, b: seen.append(i)):
        model(torch.randint(0, 128, (1, 4)))
    model(torch.randint(0, 128, (1, 4)))
    assert seen == [0, 1, 2, 3]


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from helpers.compression.checkpoints import load_model
    from helpers.analysis.redundancy import layer_redundancy
    model, _ = load_model(device="cpu")
    torch.manual_seed(0)
    windows = int(sys.argv[1])
    ids = torch.randint(0, 40000, (windows, 128))
    layer_redundancy(model, ids[:4], batch_size=4, progress=False)  # warm-up allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layer_redundancy(model, ids, batch_size=4, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kb": after - before}))
    """
)


@pytest.mark.slow
def test_capture_memory_does_not_grow_with_windows():
    """Peak RSS while streaming 48 windows stays within a few MB of streaming 4.

    Keeping every layer's hidden states would need 48 x 128 x 31 x 576 x 4 B = 440 MB.
    """

    def growth(windows: int) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(windows)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["growth_kb"]

    few, many = growth(4), growth(48)
    assert many - few < 40_000, f"peak RSS grew by {many - few} kB between 4 and 48 windows"
