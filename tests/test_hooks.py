"""The one hook helper: callbacks see each layer's input and output, may replace it, never outlive the block."""

from __future__ import annotations

import functools

import pytest
import torch

from helpers.models.hooks import forward_hooks, layer_input, layer_output, with_layer_input
from helpers.models.loading import tiny_model


def _hook_count(model) -> int:
    """Hooks of the helper still registered (transformers installs its own on the first hidden-states call)."""
    hooks = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    return sum(isinstance(h, functools.partial) and h.func.__module__ == "helpers.models.hooks" for h in hooks)


def test_hooks_see_every_layer_in_order_and_match_output_hidden_states():
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    seen_in, seen_out = [], []
    with (
        torch.no_grad(),
        forward_hooks(
            model.model.layers,
            pre=lambda i, args, kwargs: seen_in.append((i, layer_input(args, kwargs))),
            post=lambda i, args, kwargs, out: seen_out.append((i, layer_output(out))),
        ),
    ):
        states = model(ids, output_hidden_states=True).hidden_states
    assert [i for i, _ in seen_in] == [i for i, _ in seen_out] == [0, 1, 2]
    for i, x in seen_in:  # hidden_states[i] is layer i's input (the last entry carries the final norm instead)
        torch.testing.assert_close(x, states[i])
    for i, x in seen_out[:-1]:
        torch.testing.assert_close(x, states[i + 1])
    assert _hook_count(model) == 0


def test_a_replaced_input_reaches_the_layer():
    """Zeroing layer 0's input zeroes the whole bias-free Llama stack: RMS norms, projections and head map 0 to 0."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 7))
    zero = lambda _i, args, kwargs: with_layer_input(args, kwargs, torch.zeros_like(layer_input(args, kwargs)))  # noqa: E731
    with torch.no_grad():
        with forward_hooks(model.model.layers[:1], pre=zero):
            logits = model(ids).logits
        dense = model(ids).logits
    assert torch.equal(logits, torch.zeros_like(logits)) and dense.abs().max() > 0


def test_hooks_are_removed_after_an_error_inside_the_block_or_a_hook():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="inside"), forward_hooks(model.model.layers, pre=lambda *a: None):
        assert _hook_count(model) == 4
        raise RuntimeError("inside")

    def stop(_i, _args, _kwargs):
        raise KeyError("stop")

    with pytest.raises(KeyError), forward_hooks(model.model.layers, pre=stop, post=lambda *a: None):
        assert _hook_count(model) == 8
        model(torch.randint(0, 128, (1, 4)))
    assert _hook_count(model) == 0


def test_layer_input_reads_positional_and_keyword_calls():
    x, y = torch.ones(2), torch.zeros(2)
    assert layer_input((x,), {}) is x and layer_input((), {"hidden_states": x}) is x
    assert with_layer_input((x, 3), {"a": 1}, y) == ((y, 3), {"a": 1})
    assert with_layer_input((), {"hidden_states": x, "a": 1}, y)[1] == {"hidden_states": y, "a": 1}
    assert layer_output((x, None)) is x and layer_output(x) is x
