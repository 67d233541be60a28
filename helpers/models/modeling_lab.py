"""Load this folder, a model sliced or depth-pruned by the dynamic-slicing lab, with plain transformers.

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

config.json names this file in `auto_map` and records under `lab_checkpoint`
how the model differs from its family's own transformers model: per-layer
kept dimensions and the tied or untied layout for a sliced model, the trained
replacement for a pruned one. `LabCheckpoint.from_pretrained` builds the
family's own model from the config, swaps in those modules (defined below,
copied from the lab), gives every weight the shape stored in the folder and
loads the weights. The result is the family's ordinary model class: forward,
generate and save work as usual. Needs only torch, safetensors and transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

# >>> lab sources: each name imported here is replaced by its source when the lab writes this file
# (F401: some are only used by the others, e.g. ReplacementBlock by build_replacement)
from helpers.models.pruned_layers import ReplacementBlock, build_replacement  # noqa: F401
from helpers.models.sliced_layers import (  # noqa: F401
    PostNormSlicedLayer,
    PreNormSlicedLayer,
    RotatedEmbedding,
    TiedHead,
    WeightlessRMSNorm,
    _call_attention,
)

# <<< lab sources


def build_sliced(model: nn.Module, spec: dict) -> None:
    """Give the family's model the sliced layout: sliced layers, weightless final norm, new embedding and head."""
    d, dims, eps = model.config.hidden_size, spec["dims"], spec["eps"]
    layer_class = {"PreNormSlicedLayer": PreNormSlicedLayer, "PostNormSlicedLayer": PostNormSlicedLayer}
    layers = model.get_submodule(spec["layers"])
    for i, layer in enumerate(list(layers)):
        d_out = dims[i + 1] if i + 1 < len(dims) else d
        layers[i] = layer_class[spec["layer_class"]](layer.self_attn, layer.mlp, dims[i], d_out, d, eps)
    model.set_submodule(spec["final_norm"], WeightlessRMSNorm(d, eps))
    table = model.get_submodule(spec["embedding"])
    if spec["tied"]:  # one V x d table, read by a d x d_0 input map and by the head
        model.set_submodule(spec["embedding"], RotatedEmbedding(table, dims[0]))
        model.set_submodule(spec["head"], TiedHead(table))
    else:
        model.set_submodule(spec["embedding"], nn.Embedding(table.num_embeddings, dims[0]))
        model.set_submodule(spec["head"], nn.Linear(d, table.num_embeddings, bias=spec["head_bias"]))


def build_pruned(model: nn.Module, spec: dict) -> None:
    """Put the trained replacement (if any) in place; attention modules take consecutive KV-cache slots."""
    layers = model.get_submodule(spec["layers"])
    replacement = spec.get("replacement") or {}
    if replacement.get("kind") in ("ffn", "swiglu"):
        block = build_replacement(replacement["kind"], model.config.hidden_size, replacement["hidden"])
        layers[replacement["position"]] = block
    slot = 0
    for layer in layers:
        if hasattr(layer, "self_attn"):
            layer.self_attn.layer_idx = slot
            slot += 1


def match_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Re-create every parameter whose stored tensor has another shape (sliced widths), keeping its dtype."""
    for name, tensor in state.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = getattr(owner, attr)
        if tuple(current.shape) == tuple(tensor.shape):
            continue
        fresh = torch.empty(tensor.shape, dtype=current.dtype)
        setattr(owner, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features, owner.in_features = tensor.shape


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load every safetensors shard of `folder`; a key may be missing only where it shares a loaded tensor."""
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    match_shapes(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    loaded = {model.get_parameter(name).data_ptr() for name in state if name not in unexpected}
    unshared = [name for name in missing if model.get_parameter(name).data_ptr() not in loaded]
    if unexpected or unshared:
        raise ValueError(f"{folder}: weights do not match the saved layout (missing {unshared}, extra {unexpected}).")


class LabCheckpoint(PreTrainedModel):
    """Only a loader: `from_pretrained` returns the family's own transformers model in the saved layout."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs) -> nn.Module:
        """Build the family's model from `config`, apply `config.lab_checkpoint`, load the weights, eval mode."""
        folder = Path(pretrained_model_name_or_path)
        config = config or AutoConfig.from_pretrained(folder)
        spec = config.lab_checkpoint
        if spec["format"] == "unsupported":
            raise NotImplementedError(f"{folder}: {spec['reason']}")
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
        {"sliced": build_sliced, "pruned": build_pruned}[spec["format"]](model, spec)
        load_weights(model, folder)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return model.to(dtype if isinstance(dtype, torch.dtype) else torch.float32).eval()
