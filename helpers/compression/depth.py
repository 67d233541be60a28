"""Depth pruning: delete decoder layers and keep the model a working Hugging Face model.

`remove_layers` deletes decoder layers and renumbers what the KV cache and the
attention masks key on, giving a smaller, ordinary Hugging Face model. Which
layers to delete comes from `helpers.analysis.block_scores`; saving and loading
a pruned folder is `helpers.compression.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from helpers.models.adapters import get_adapter


def renumber_layers(model: nn.Module) -> nn.Module:
    """Make config and attention modules agree with the current list of decoder layers.

    Attention modules are numbered consecutively (the KV cache slot each one
    writes); a layer without attention (a trained replacement) takes no slot.
    """
    layers = get_adapter(model).layers(model)
    slot = 0
    for layer in layers:
        attention = getattr(layer, "self_attn", None)
        if attention is not None:
            attention.layer_idx = slot
            slot += 1
    model.config.num_hidden_layers = len(layers)
    return model


def remove_layers(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Delete decoder layers `indices` in place and return the model, which stays a working HF model.

    Updates `config.num_hidden_layers`, `config.layer_types` (per-layer
    attention kind), and every attention module's `layer_idx`.
    """
    layers = get_adapter(model).layers(model)
    drop = sorted(set(int(i) for i in indices))
    if len(drop) != len(list(indices)):
        raise ValueError(f"Layer indices must be distinct, got {list(indices)}.")
    if drop and (drop[0] < 0 or drop[-1] >= len(layers)):
        raise ValueError(f"Layer indices must lie in 0..{len(layers) - 1}, got {drop}.")
    if len(drop) >= len(layers):
        raise ValueError("Cannot remove every layer; keep at least one.")
    keep = [i for i in range(len(layers)) if i not in drop]
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:
        model.config.layer_types = [layer_types[i] for i in keep]
    for i in reversed(drop):
        del layers[i]
    return renumber_layers(model)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters, counting tied (shared) tensors once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
