"""The interface every model-family adapter implements, with the defaults of a pre-norm RMSNorm family."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from helpers.models.sliced_layers import PreNormSlicedLayer


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer's parameter count depends on, per unit of residual width (docs/method.md section 2).

    Widths are summed over the linear layers of each role: `attention_reads` is
    q + k + v (outputs of the layers that read the normed residual before
    attention), `attention_writes` the input width of the projection writing
    attention's result (heads x head_dim), likewise for the MLP.
    """

    attention_reads: int
    attention_writes: int
    mlp_reads: int
    mlp_writes: int
    attention_fixed: int = 0  # attention parameters that do not scale with d: reader biases, q/k norms
    mlp_fixed: int = 0  # MLP parameters that do not scale with d: reader biases
    attention_writer_bias: bool = False  # the projection writing attention's result has a bias (width d)
    mlp_writer_bias: bool = False  # the projection writing the MLP's result has a bias (width d)
    norms: int = 2  # d-wide norm weight vectors per layer
    norm_bias: bool = False  # LayerNorm: each norm also has a bias vector
    post_norms: bool = False  # branch outputs are normalised in d dims: writers keep d, plus two d x k maps


class ModelAdapter:
    """Names the parts of a decoder-only model that the lab reads or rewrites, and what is family-specific.

    The slicing, ledger, depth and replacement code only talk to a model
    through these methods. The defaults describe a Llama-like family
    (pre-norm RMSNorm blocks, rotary positions, no BOS); a family file
    overrides what differs and registers itself.
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    prepend_bos: bool = False  # whether texts start with the BOS token (Gemma 3 needs it; SmolLM2 does not)
    head_weight_name: str = "lm_head.weight"  # the state-dict key of the head (absent when tied)
    centres_residual: bool = False  # LayerNorm families: the residual stream is made mean-free when folding
    sliced_layer_class: type[PreNormSlicedLayer] = PreNormSlicedLayer
    tiny_config: Mapping[str, Any] = MappingProxyType({})  # config values a tiny test model of the family needs

    def backbone(self, model: nn.Module) -> nn.Module:
        """The transformer without the LM head (runs embeddings, layers, final norm)."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""
        raise NotImplementedError

    # Whole-model parts ----------------------------------------------------------------
    def embedding(self, model: nn.Module) -> nn.Module:
        """The token embedding module."""
        raise NotImplementedError

    def set_embedding(self, model: nn.Module, module: nn.Module) -> None:
        """Replace the token embedding module."""
        raise NotImplementedError

    def embedding_scale(self, model: nn.Module) -> float:
        """The factor the embedding module multiplies its table rows by (Gemma: sqrt(d))."""
        return 1.0

    def position_tables(self, model: nn.Module) -> list[nn.Embedding]:
        """Learned position tables added to the token embeddings (OPT); rotated with them."""
        return []

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm between the last layer and the head."""
        raise NotImplementedError

    def set_final_norm(self, model: nn.Module, module: nn.Module) -> None:
        """Replace the final norm."""
        raise NotImplementedError

    def head(self, model: nn.Module) -> nn.Module:
        """The LM head (hidden state -> vocabulary logits)."""
        raise NotImplementedError

    def set_head(self, model: nn.Module, module: nn.Module) -> None:
        """Replace the LM head."""
        raise NotImplementedError

    def tied(self, model: nn.Module) -> bool:
        """Whether the head shares its weight with the embedding table."""
        head_weight = getattr(self.head(model), "weight", None)
        table_weight = getattr(self.embedding(model), "weight", None)
        return head_weight is not None and head_weight is table_weight

    def norm_eps(self, model: nn.Module) -> float:
        """The epsilon of the model's norms."""
        return float(model.config.rms_norm_eps)

    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        """The per-coordinate scale a norm applies after normalising (Gemma: 1 + w)."""
        return norm.weight.detach()

    def norm_bias(self, norm: nn.Module) -> torch.Tensor | None:
        """The bias a norm adds after scaling (LayerNorm), or None."""
        bias = getattr(norm, "bias", None)
        return None if bias is None else bias.detach()

    # Per-layer parts --------------------------------------------------------------------
    def input_norm(self, layer: nn.Module) -> nn.Module:
        """The norm before attention."""
        return layer.input_layernorm

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        """The norm before the MLP."""
        return layer.post_attention_layernorm

    def output_norms(self, layer: nn.Module) -> list[nn.Module]:
        """Norms applied to the attention and MLP outputs before the residual add (post-norm families)."""
        return []

    def is_decoder_layer(self, layer: nn.Module) -> bool:
        """Whether `layer` is one of the family's (possibly sliced) decoder layers, not a foreign block."""
        return hasattr(layer, "self_attn") and hasattr(layer, "mlp")

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention block (called as `attention(hidden_states=..., **layer_kwargs)[0]`)."""
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP block (called as `mlp(x)`)."""
        return layer.mlp

    def attention_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """Linear layers that read the (normed) residual stream before attention."""
        raise NotImplementedError

    def attention_output(self, layer: nn.Module) -> nn.Linear:
        """The linear layer that writes attention's result to the residual stream."""
        raise NotImplementedError

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """Linear layers that read the (normed) residual stream before the MLP."""
        raise NotImplementedError

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        """The linear layer that writes the MLP's result to the residual stream."""
        raise NotImplementedError

    def set_layer(self, model: nn.Module, index: int, layer: nn.Module) -> None:
        """Replace decoder layer `index` (e.g. by a sliced layer)."""
        self.layers(model)[index] = layer

    def sliced_layer(self, layer: nn.Module, d_in: int, d_out: int, hidden_size: int, eps: float) -> nn.Module:
        """The sliced replacement of `layer` (its own attention and MLP), before any basis is chosen."""
        return self.sliced_layer_class(self.attention(layer), self.mlp(layer), d_in, d_out, hidden_size, eps)

    def position_embeddings(self, backbone: nn.Module, layer: nn.Module, x: torch.Tensor, positions: torch.Tensor):
        """What `layer` receives as `position_embeddings` (rotary cos/sin) for hidden states `x`."""
        return backbone.rotary_emb(x, positions)

    # Parameter-count formulas --------------------------------------------------------------
    def layer_shape(self, config: Any) -> LayerShape:
        """Parameter formula of one decoder layer."""
        raise NotImplementedError

    def position_rows(self, config: Any) -> int:
        """Rows of learned position tables (0 for rotary families)."""
        return 0

    def final_norm_params(self, config: Any) -> int:
        """Parameters of the final norm."""
        return config.hidden_size
