"""OPT adapter: SliceGPT's own main family (LayerNorm with bias, learned positions, ReLU MLP).

Layout `model.model.decoder.{embed_tokens, embed_positions, layers, final_layer_norm}` +
`model.lm_head`; pre-norm blocks (`do_layer_norm_before`, every size but 350m) with
`self_attn.{q,k,v,out}_proj` and `fc1`, `fc2` on the layer itself. What differs from
Llama (docs/method.md section 3): LayerNorm subtracts the mean, so folding first makes
the residual stream mean-free (`centres_residual`: embeddings, positions and every
output projection are centred), after which LayerNorm equals a weightless RMS norm and
its scale and bias fold into the readers; the learned position table is rotated with
the token table; the final norm's bias becomes a bias of the (untied) head.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from torch import nn

from helpers.models.adapters import UnsupportedArchitectureError, register
from helpers.models.adapters.base import LayerShape, ModelAdapter


class OPTMLP(nn.Module):
    """OPT's fc1 -> activation -> fc2, as one module (OPT keeps them on the decoder layer)."""

    def __init__(self, fc1: nn.Linear, activation: nn.Module, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1, self.activation, self.fc2 = fc1, activation, fc2

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


def _mlp_owner(layer: nn.Module) -> nn.Module:
    """Where fc1 and fc2 live: the dense layer itself, or the `mlp` of a sliced one."""
    return layer.mlp if hasattr(layer, "mlp") else layer


class OPTAdapter(ModelAdapter):
    family = "opt"
    model_types = ("opt",)
    centres_residual = True
    tiny_config = MappingProxyType({"ffn_dim": 96, "word_embed_proj_dim": 64})  # the lab needs projection dim == d

    def _check(self, config: Any) -> None:
        if not config.do_layer_norm_before or config.word_embed_proj_dim != config.hidden_size:
            raise UnsupportedArchitectureError(
                "Only pre-norm OPT models with word_embed_proj_dim == hidden_size are supported (not opt-350m)."
            )

    def backbone(self, model: nn.Module) -> nn.Module:
        self._check(model.config)
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def embedding(self, model: nn.Module) -> nn.Module:
        return model.model.decoder.embed_tokens

    def set_embedding(self, model: nn.Module, module: nn.Module) -> None:
        model.model.decoder.embed_tokens = module

    def position_tables(self, model: nn.Module) -> list[nn.Embedding]:
        return [model.model.decoder.embed_positions]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.decoder.final_layer_norm

    def set_final_norm(self, model: nn.Module, module: nn.Module) -> None:
        model.model.decoder.final_layer_norm = module

    def head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def set_head(self, model: nn.Module, module: nn.Module) -> None:
        model.lm_head = module

    def norm_eps(self, model: nn.Module) -> float:
        return float(self.final_norm(model).eps)

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn_layer_norm

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        return layer.final_layer_norm

    def is_decoder_layer(self, layer: nn.Module) -> bool:
        return hasattr(layer, "self_attn") and hasattr(_mlp_owner(layer), "fc1")

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp if hasattr(layer, "mlp") else OPTMLP(layer.fc1, layer.activation_fn, layer.fc2)

    def attention_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        attn = layer.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    def attention_output(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attn.out_proj

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [_mlp_owner(layer).fc1]

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        return _mlp_owner(layer).fc2

    def layer_shape(self, config: Any) -> LayerShape:
        self._check(config)
        d, ffn, bias = config.hidden_size, config.ffn_dim, bool(config.enable_bias)
        return LayerShape(
            attention_reads=3 * d,
            attention_writes=d,
            mlp_reads=ffn,
            mlp_writes=ffn,
            attention_fixed=bias * 3 * d,
            mlp_fixed=bias * ffn,
            attention_writer_bias=bias,
            mlp_writer_bias=bias,
            norm_bias=True,
        )

    def position_rows(self, config: Any) -> int:
        return config.max_position_embeddings + 2  # OPT offsets positions by 2

    def final_norm_params(self, config: Any) -> int:
        return 2 * config.hidden_size


register(OPTAdapter())
