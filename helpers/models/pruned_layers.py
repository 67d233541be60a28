"""The module a depth-pruned model may hold in place of a removed block: LLM-Streamline's replacement.

Family-free and self-contained (torch only), so that a pruned folder's modeling
file can carry it (helpers.models.shareable). Training it is helpers.compression.replacement.
"""

from __future__ import annotations

import torch
from torch import nn


class ReplacementBlock(nn.Module):
    """x + down(act(up(norm(x)))): a pre-norm residual feed-forward block, zero-initialised output.

    Starts as the identity map (skipping the block) and learns the difference.
    Accepts and ignores a decoder layer's keyword arguments, so it can sit in
    the model's list of layers.
    """

    def __init__(self, kind: str, hidden_size: int, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        if kind not in ("ffn", "swiglu"):
            raise ValueError(f"A ReplacementBlock is 'ffn' or 'swiglu', got {kind!r}.")
        self.kind = kind
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.up_proj = nn.Linear(hidden_size, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden_size, hidden, bias=False) if kind == "swiglu" else None
        self.down_proj = nn.Linear(hidden, hidden_size, bias=False)
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = hidden_states
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        if self.gate_proj is None:
            inner = nn.functional.gelu(self.up_proj(normed))
        else:
            inner = nn.functional.silu(self.gate_proj(normed)) * self.up_proj(normed)
        return x + self.down_proj(inner)


def build_replacement(kind: str, hidden_size: int, hidden: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh feed-forward ('ffn') or SwiGLU ('swiglu') replacement block."""
    return ReplacementBlock(kind, hidden_size, hidden).to(dtype)
