"""Evaluate a model bigger than memory: the forward pass one decoder layer at a time (docs/streaming.md).

The ends (embeddings, final norm, head) are read once; the windows' hidden
states pass through layer 1 (read, run on `device` over every batch, dropped),
then layer 2, and so on, kept in memory or on disk between layers; the model's
own forward then turns the last hidden states into logits, so logit soft-capping
and the like apply as usual. Dense checkpoint folders and sliced folders both
work. Peak memory: the ends + one layer + the windows' hidden states.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from helpers.compression.sliced_io import SLICING_FILE, sliced_skeleton
from helpers.compression.slicing import (
    ActivationStore,
    first_layer_inputs,
    record_layer_kwargs,
    split_batches,
    to_device,
)
from helpers.compression.streaming import materialise, pass_through_layers, skeleton, to_meta
from helpers.evaluation.perplexity import PerplexityResult, perplexity_of
from helpers.infra.memory import return_large_blocks
from helpers.infra.progress import progress_bar
from helpers.infra.shards import CheckpointReader
from helpers.models.adapters import get_adapter
from helpers.models.loading import pick_device


def open_streamed(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, CheckpointReader]:
    """A dense or sliced checkpoint folder as a skeleton on the meta device, ends read, and its weight reader."""
    folder = Path(folder)
    reader = CheckpointReader(folder)
    if (folder / SLICING_FILE).exists():
        model = sliced_skeleton(folder, lambda config: skeleton(config, dtype))
    else:
        model = skeleton(AutoConfig.from_pretrained(folder), dtype)
    layers = _name(model, get_adapter(model).layers(model)) + "."
    for name, _ in list(model.named_parameters()):  # shared parameters once
        if not name.startswith(layers):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, nn.Parameter(reader.read(name).to(dtype), requires_grad=False))
    if model.config.tie_word_embeddings:
        model.tie_weights()  # the head shares the table just read
    return model.eval(), reader


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def streamed_logits(
    folder: str | Path,
    input_ids: torch.Tensor,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    offload_dir: str | Path | None = None,
    progress: bool = True,
):
    """Yield the logits of each batch of `input_ids` (windows, seqlen), computed one layer at a time."""
    return_large_blocks()
    device = pick_device(device)
    model, reader = open_streamed(folder, dtype)
    adapter = get_adapter(model)
    batches = split_batches(input_ids, batch_size)
    with contextlib.ExitStack() as stack:
        store = None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="activations-", dir=offload_dir)))
        xs = ActivationStore(store)
        with torch.no_grad(), pass_through_layers(model, adapter):
            kwargs = {len(ids): record_layer_kwargs(model, ids) for ids in batches}
            first_layer_inputs(model, batches, xs)
        layers = adapter.layers(model)
        for i in progress_bar(range(len(layers)), desc="forward (streamed)", unit="layer", disable=not progress):
            layer = layers[i]
            materialise(model, layer, reader, dtype)
            layer.to(device)
            with torch.no_grad():
                xs = xs.map(
                    lambda x, i=i, layer=layer: layer(x.to(device), **to_device(kwargs[len(x)][i], device)).cpu()
                )
            to_meta(layer)
        with torch.no_grad(), pass_through_layers(model, adapter):
            for ids, hidden in zip(batches, xs, strict=True):
                yield _logits_from(model, adapter, ids, hidden)


def _logits_from(model: nn.Module, adapter, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own forward with pass-through layers, the last layer's output put in place of the first's input."""

    def replace(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = adapter.layers(model)[0].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()


def streamed_perplexity(
    folder: str | Path,
    input_ids: torch.Tensor,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    offload_dir: str | Path | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of windows `input_ids` under the checkpoint folder `folder`, one layer in memory at a time."""
    batches = streamed_logits(folder, input_ids, batch_size, device, dtype, offload_dir, progress)
    bos_token = getattr(AutoConfig.from_pretrained(folder), "bos_token_id", None)
    return perplexity_of(
        lambda _ids: next(batches), input_ids, bos_token, batch_size, progress, "perplexity (streamed)"
    )
