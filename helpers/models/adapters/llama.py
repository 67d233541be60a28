"""Llama-family adapter: Llama, Mistral, Qwen2 (and SmolLM2, which is a Llama).

These share the layout `model.model.{embed_tokens, layers, norm}` + `model.lm_head`,
pre-norm RMSNorm blocks with `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`.
Qwen2 differs only in its q/k/v biases.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from helpers.models.adapters import register
from helpers.models.adapters.base import LayerShape, ModelAdapter


class LlamaFamilyAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral")

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def embedding(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    def set_embedding(self, model: nn.Module, module: nn.Module) -> None:
        model.model.embed_tokens = module

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def set_final_norm(self, model: nn.Module, module: nn.Module) -> None:
        model.model.norm = module

    def head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def set_head(self, model: nn.Module, module: nn.Module) -> None:
        model.lm_head = module

    def attention_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        attn = layer.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    def attention_output(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attn.o_proj

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj

    def layer_shape(self, config: Any) -> LayerShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        q, kv = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        inter = config.intermediate_size
        attention_bias = bool(getattr(config, "attention_bias", False))
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        return LayerShape(
            attention_reads=q + 2 * kv,
            attention_writes=q,
            mlp_reads=2 * inter,
            mlp_writes=inter,
            attention_fixed=attention_bias * (q + 2 * kv),
            mlp_fixed=mlp_bias * 2 * inter,
            attention_writer_bias=attention_bias,
            mlp_writer_bias=mlp_bias,
        )


class Qwen2Adapter(LlamaFamilyAdapter):
    family = "qwen2"
    model_types = ("qwen2",)

    def layer_shape(self, config: Any) -> LayerShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        q, kv = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        inter = config.intermediate_size
        return LayerShape(
            attention_reads=q + 2 * kv,
            attention_writes=q,
            mlp_reads=2 * inter,
            mlp_writes=inter,
            attention_fixed=q + 2 * kv,  # q/k/v biases
        )


register(LlamaFamilyAdapter())
register(Qwen2Adapter())
