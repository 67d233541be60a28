"""Gemma 3 adapter (text models, `gemma3_text`; Gemma-3-270m is the offline one).

Layout `model.model.{embed_tokens, layers, norm, rotary_emb}` + `model.lm_head`, tied
embeddings. What differs from Llama, and how the lab handles it (docs/method.md section 3):
- every norm scales by (1 + w), not w: `norm_scale` returns 1 + w, so folding is unchanged;
- the embedding module multiplies rows by sqrt(d): kept inside the tied table's lookup,
  folded into the table when untied (`embedding_scale`);
- the attention and MLP outputs are normalised before the residual add (post-norms):
  the block becomes a `PostNormSlicedLayer`, whose output norms act in the original
  d-dim basis and are followed by d x k maps holding diag(1 + w) and the new basis;
- q/k norms act per head inside attention, so rotation never touches them;
- sliding/global layers differ in their mask and rotary base only: each layer receives
  its own recorded keyword arguments, and `position_embeddings` asks the rotary module
  for the layer's type;
- the model needs its BOS token (`prepend_bos`).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from helpers.models.adapters import register
from helpers.models.adapters.base import LayerShape
from helpers.models.adapters.llama import LlamaFamilyAdapter
from helpers.models.sliced_layers import PostNormSlicedLayer


class Gemma3Adapter(LlamaFamilyAdapter):
    """Llama's module layout and projections; Gemma's norms, embedding scale, post-norm blocks and rotary call."""

    family = "gemma3"
    model_types = ("gemma3_text",)
    prepend_bos = True
    sliced_layer_class = PostNormSlicedLayer
    tiny_config = MappingProxyType({"head_dim": 16, "sliding_window": 8})  # a window shorter than test texts

    def embedding_scale(self, model: nn.Module) -> float:
        return float(model.config.hidden_size) ** 0.5

    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        return 1.0 + norm.weight.detach().double()

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        return layer.pre_feedforward_layernorm

    def output_norms(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.post_attention_layernorm, layer.post_feedforward_layernorm]

    def position_embeddings(self, backbone: nn.Module, layer: nn.Module, x: torch.Tensor, positions: torch.Tensor):
        return backbone.rotary_emb(x, positions, layer.self_attn.layer_type)

    def layer_shape(self, config: Any) -> LayerShape:
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        return LayerShape(
            attention_reads=q + 2 * kv,
            attention_writes=q,
            mlp_reads=2 * config.intermediate_size,
            mlp_writes=config.intermediate_size,
            attention_fixed=2 * config.head_dim,  # q and k norms
            norms=4,
            post_norms=True,
        )


register(Gemma3Adapter())
