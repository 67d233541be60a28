"""Load this folder, a model sliced or depth-pruned by the dynamic-slicing lab, with plain transformers.

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

config.json names this file in `auto_map` and records under `lab_checkpoint`
how the model differs from its family's own transformers model: per-layer
kept dimensions, the last residual's width (`final_dim`) and the tied or untied
layout for a sliced model, the trained replacement for a pruned one.
`LabCheckpoint.from_pretrained` builds the family's own model from the config,
swaps in those modules with `build_sliced` (defined below, copied from the lab:
the same builder the lab's own loader calls), checks every weight has the shape
the record gives and loads the weights. The result is the family's ordinary
model class: forward, generate and save work as usual. Needs only torch,
safetensors and transformers.
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
    _resize,
    build_sliced,
    set_linear,
)

# <<< lab sources


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


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load every safetensors shard of `folder`; a key may be missing only where it shares a loaded tensor."""
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(t.shape)} vs {tuple(own[k].shape)}"
        for k, t in state.items()
        if k in own and own[k].shape != t.shape
    ]
    if wrong:
        raise ValueError(f"{folder}: weights do not have the shapes config.json's lab_checkpoint gives: {wrong[:3]}.")
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
