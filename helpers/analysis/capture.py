"""Hook-based capture of decoder-layer inputs and outputs, streamed over batches.

`layer_hooks` registers a forward pre-hook and a forward hook on every decoder
layer and hands each layer's raw input and raw output to a callback, so the
last layer's output is seen before the final norm. `stream_statistics` runs a
corpus through the model in batches and feeds every batch to a set of
`LayerStatistic` accumulators (LR, PCA covariance, block similarity...);
nothing but their running sums outlives a batch, so memory does not grow with
the number of windows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from helpers.infra.progress import progress_bar
from helpers.models.adapters import get_adapter
from helpers.models.hooks import forward_hooks, layer_input, layer_output

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class LayerStatistic:
    """Accumulates a per-layer quantity from (layer input, layer output, token mask)."""

    def update(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        """Consume one batch: `x_in`, `x_out` are (batch, tokens, d); `mask` is (batch, tokens) bool."""
        raise NotImplementedError


@contextlib.contextmanager
def layer_hooks(model: nn.Module, callback: LayerCallback) -> Iterator[None]:
    """While active, every forward of decoder layer i calls `callback(i, x_in, x_out)` with raw tensors."""
    inputs: dict[int, torch.Tensor] = {}

    def pre(index: int, args: tuple, kwargs: dict) -> None:
        inputs[index] = layer_input(args, kwargs)

    def post(index: int, _args: tuple, _kwargs: dict, output: torch.Tensor | tuple) -> None:
        callback(index, inputs.pop(index), layer_output(output))

    try:
        with forward_hooks(get_adapter(model).layers(model), pre=pre, post=post):
            yield
    finally:
        inputs.clear()


def counted_tokens(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Which positions count in per-layer statistics (LR means): all but the BOS token, where the family prepends one.

    A prepended BOS is an attention sink: its hidden state is huge and nearly
    the same in every window, so it would dominate the covariance and say
    nothing about the text (docs/method.md, BOS convention).
    """
    bos = model.config.bos_token_id if get_adapter(model).prepend_bos else None
    if bos is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return input_ids != bos


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def stream_statistics(
    model: nn.Module,
    input_ids: torch.Tensor,
    statistics: Sequence[LayerStatistic],
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
    desc: str = "capture",
) -> Sequence[LayerStatistic]:
    """Run `input_ids` (n, seqlen) through the model's backbone in batches, feeding every statistic.

    Tokens where `attention_mask` is 0 (padding) and BOS positions
    (`counted_tokens`) are excluded via the mask each statistic receives.
    The LM head is not run: only hidden states matter.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (windows, seqlen), got shape {tuple(input_ids.shape)}.")
    backbone = get_adapter(model).backbone(model)
    device = _device(model)
    mask_all = counted_tokens(model, input_ids)
    if attention_mask is not None:
        mask_all &= attention_mask.bool()
    batch_mask: torch.Tensor | None = None

    def feed(index: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        for statistic in statistics:
            statistic.update(index, x_in, x_out, batch_mask)

    starts = range(0, input_ids.shape[0], batch_size)
    with torch.inference_mode(), layer_hooks(model, feed):
        for start in progress_bar(starts, desc=desc, unit="batch", disable=not progress):
            ids = input_ids[start : start + batch_size].to(device)
            batch_mask = mask_all[start : start + batch_size].to(device)
            am = None if attention_mask is None else attention_mask[start : start + batch_size].long().to(device)
            backbone(input_ids=ids, attention_mask=am, use_cache=False)
    return statistics


def collect_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """All raw residual-stream states for a small batch: [x_0 (embeddings), x_1, ..., x_L].

    x_L is the last layer's raw output (no final norm), unlike
    `output_hidden_states[-1]`. Keeps everything in memory: for inspection only.
    """
    states: dict[int, torch.Tensor] = {}

    def keep(index: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        if index == 0:
            states[0] = x_in.detach().float().cpu()
        states[index + 1] = x_out.detach().float().cpu()

    with torch.inference_mode(), layer_hooks(model, keep):
        get_adapter(model).backbone(model)(input_ids=input_ids.to(_device(model)), use_cache=False)
    return [states[i] for i in range(len(states))]
