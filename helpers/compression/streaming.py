"""Streamed slicing: a model bigger than memory sliced one decoder layer at a time (docs/streaming.md).

The same recipe as `helpers.compression.slicing.rotate_and_slice`, step by
step, on a model skeleton whose weights stay on the meta device until needed:
1. the token (and position) tables and the final norm are read; they give the
   layers' keyword arguments and the first layer's calibration inputs, whose
   PCA is the first basis; the tables go back to meta;
2. each decoder layer is read from the safetensors shards in the working dtype,
   made rotation-invariant (`invariant_layer`), sliced (`slice_layer`, on
   `device`: a GPU holds one layer at a time), written to the output file and
   dropped before the next is read;
3. the head, then the embeddings, are read, folded and rotated (`invariant_ends`,
   `finish_head`, `finish_embedding`) and written.
The output is the folder `save_sliced` writes, so `load_sliced` reads it.
The peak memory is the largest stage, predicted by `stream_memory` before any
weight is read, and a run that does not fit is refused with the numbers.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from helpers.compression.sliced_io import WEIGHTS_FILE, build_sliced_structure, write_folder_files
from helpers.compression.slicing import (
    DAMPING,
    ActivationStore,
    Calibration,
    SlicingInfo,
    centre_tables,
    check_inputs,
    choose_layout,
    finish_embedding,
    finish_head,
    first_basis,
    invariant_ends,
    invariant_layer,
    record_layer_kwargs,
    slice_layer,
    split_batches,
)
from helpers.infra.memory import release_freed_memory, return_large_blocks
from helpers.infra.progress import progress_bar
from helpers.infra.shards import CheckpointReader, ShardWriter
from helpers.infra.storage import atomic_path
from helpers.models.adapters import ModelAdapter, get_adapter
from helpers.models.loading import pick_device

GIB = 2**30
RUNTIME_BYTES = int(0.65 * GIB)  # Python, torch, transformers and allocator slack (measured: 0.5-0.65 GiB)


class DoesNotFitError(MemoryError):
    """A streamed run whose predicted peak memory exceeds what the machine has free."""


@dataclass(frozen=True)
class StreamMemory:
    """Predicted peak memory of a streamed slicing run, in bytes, term by term (docs/streaming.md).

    The stages run one after the other, so the peak is the runtime plus the
    largest stage: the ends (a vocabulary table and its folded or rotated copy)
    or one layer (its weights in the working dtype, the float64 copy of its
    largest matrix, one layer's calibration activations and the d x d float64
    covariance with its eigenvectors). On a GPU, the layer stage is on the GPU.
    """

    table: int  # V x d in the working dtype
    layer: int  # one decoder layer's weights in the working dtype
    layer_float64: int  # the float64 copies of the layer's largest matrix while it is folded and rotated
    activations: int  # calibration activations held while a layer is sliced
    covariance: int  # d x d float64 covariance, eigenvectors and their reordering
    runtime: int = RUNTIME_BYTES

    def layer_stage(self) -> int:
        return self.layer + self.layer_float64 + self.activations + self.covariance

    def ends_stage(self) -> int:
        return max(2 * self.table, self.table + self.activations + self.covariance)

    def host_peak(self, on_gpu: bool = False) -> int:
        """Peak resident memory on the host; with a GPU the layer stage leaves only its activations there."""
        layer = self.activations + self.layer if on_gpu else self.layer_stage()
        return self.runtime + max(self.ends_stage(), layer)

    def describe(self, on_gpu: bool = False) -> str:
        """The formula with this model's numbers, one line per term."""
        gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        lines = [
            f"  runtime (Python, torch)                  {gib(self.runtime)}",
            f"  vocabulary table V x d                    {gib(self.table)}",
            f"  one layer's weights                       {gib(self.layer)}",
            f"  float64 copies of its largest matrix      {gib(self.layer_float64)}",
            f"  one layer's calibration activations       {gib(self.activations)}",
            f"  d x d float64 covariance + eigenvectors   {gib(self.covariance)}",
            f"  peak = runtime + max(2 x table, layer + float64 + activations + covariance): "
            f"{gib(self.host_peak(on_gpu))}" + (" on the host" if on_gpu else ""),
        ]
        if on_gpu:
            lines.append(f"  on the GPU: {gib(self.layer_stage())}")
        return "\n".join(lines)


def stream_memory(
    config,
    n_windows: int,
    seqlen: int,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    on_disk: bool = False,
) -> StreamMemory:
    """Predict the terms of a streamed run's peak memory from the config alone (no weight is read)."""
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    adapter = get_adapter(config)
    layer = adapter.layers(skeleton)[0]
    size = torch.empty((), dtype=dtype).element_size()
    d = config.hidden_size
    largest = max(p.numel() for p in layer.parameters())
    widest = max(max(p.shape) for p in layer.parameters())  # the MLP's inner width
    batch_tokens = min(batch_size, n_windows) * seqlen
    held = (batch_tokens if on_disk else n_windows * seqlen) * d * size * 2  # the store and its successor
    per_batch = batch_tokens * (3 * widest + config.num_attention_heads * seqlen) * 4  # MLP inner, attention scores
    return StreamMemory(
        table=adapter.embedding(skeleton).weight.numel() * size,
        layer=sum(p.numel() for p in layer.parameters()) * size,
        layer_float64=2 * largest * 8,
        activations=held + per_batch,
        covariance=3 * d * d * 8,
    )


def check_fits(memory: StreamMemory, device: torch.device, limit: int | None = None) -> None:
    """Raise DoesNotFitError (with the numbers) when the predicted peak exceeds the free memory or `limit` bytes."""
    on_gpu = device.type == "cuda"
    free = psutil.virtual_memory().available if limit is None else limit
    if memory.host_peak(on_gpu) > free:
        raise DoesNotFitError(
            f"Streamed slicing needs about {memory.host_peak(on_gpu) / GIB:.2f} GiB of host memory, "
            f"{free / GIB:.2f} GiB is available:\n{memory.describe(on_gpu)}\n"
            "Keep activations on disk (--offload-dir), use fewer calibration tokens per batch, or free memory."
        )
    if on_gpu:
        gpu_free = torch.cuda.mem_get_info(device)[0]
        if memory.layer_stage() > gpu_free:
            raise DoesNotFitError(
                f"One layer's slicing needs about {memory.layer_stage() / GIB:.2f} GiB on {device}, "
                f"{gpu_free / GIB:.2f} GiB is free:\n{memory.describe(on_gpu)}"
            )


# ---------------------------------------------------------------------------------------------
# The skeleton and its weights
# ---------------------------------------------------------------------------------------------


def _path(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of `module` inside `model` (the prefix of its weights in the checkpoint)."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def materialise(model: nn.Module, module: nn.Module, reader: CheckpointReader, dtype: torch.dtype, alias=None):
    """Read `module`'s weights from the checkpoint in `dtype`, in place of its meta tensors.

    `alias` names the module whose stored weights to read instead (a tied head reads the embedding's).
    """
    prefix = _path(model, alias or module)
    state = {name: reader.read(f"{prefix}.{name}").to(dtype) for name in module.state_dict()}
    module.load_state_dict(state, assign=True, strict=True)
    for param in module.parameters():
        param.requires_grad_(False)


def to_meta(module: nn.Module) -> None:
    """Drop a module's weights (it keeps its shapes); the memory goes back to the system."""
    module.to("meta")
    release_freed_memory()


class _PassThrough(nn.Module):
    """Stands in for a decoder layer while the backbone runs for kwargs and first inputs: returns its input."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def pass_through_layers(model: nn.Module, adapter: ModelAdapter):
    """Every decoder layer replaced by `_PassThrough` for the duration (the real, meta ones put back after)."""
    layers = list(adapter.layers(model))
    for index in range(len(layers)):
        adapter.set_layer(model, index, _PassThrough())
    try:
        yield
    finally:
        for index, layer in enumerate(layers):
            adapter.set_layer(model, index, layer)


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary frequencies are real)."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config leaves a meta head untied; the layout choice reads the tie
    return model.eval()


def _output_layout(config, dims: list[int], tied: bool, final_dim: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """Name -> (dtype, shape) of every tensor of the sliced model, shared tensors once, and their aliases."""
    with torch.device("meta"):
        sliced = AutoModelForCausalLM.from_config(config, dtype=dtype)
        build_sliced_structure(sliced, dims, tied, final_dim)
    groups: dict[int, list[str]] = {}
    tensors = sliced.state_dict(keep_vars=True)
    for name, tensor in tensors.items():
        groups.setdefault(id(tensor), []).append(name)
    specs, aliases = {}, {}
    for names in groups.values():
        kept = sorted(names)[0]  # the name safetensors' save_model keeps
        specs[kept] = (dtype, tuple(tensors[kept].shape))
        aliases.update({name: kept for name in names if name != kept})
    return specs, aliases


def _write_real(model: nn.Module, writer: ShardWriter) -> None:
    """Write every tensor of `model` that is not on the meta device and not written yet."""
    for name, tensor in model.state_dict().items():
        if name in writer.pending and not tensor.is_meta:
            writer.write(name, tensor)


# ---------------------------------------------------------------------------------------------
# The streamed recipe
# ---------------------------------------------------------------------------------------------


def stream_slice(
    source: str | Path,
    out: str | Path,
    input_ids: torch.Tensor,
    dims: Sequence[int],
    tokenizer=None,
    tied: bool | None = None,
    batch_size: int = 8,
    damping: float = DAMPING,
    device: str | torch.device | None = None,
    progress: bool = True,
    offload_dir: str | Path | None = None,
    final_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    memory_limit: int | None = None,
) -> SlicingInfo:
    """Slice the checkpoint folder `source` into the sliced folder `out`, one decoder layer in memory at a time.

    Arguments as `rotate_and_slice`'s; `dtype` is the working dtype (the
    weights are converted as they are read), `memory_limit` (bytes) replaces
    the machine's available memory in the fit check made before any weight is read.
    """
    config = AutoConfig.from_pretrained(source)
    adapter = get_adapter(config)
    dims, final_dim = check_inputs(config, input_ids, dims, final_dim)
    device = pick_device(device)
    memory = stream_memory(config, *input_ids.shape, batch_size, dtype, on_disk=offload_dir is not None)
    check_fits(memory, device, memory_limit)
    return_large_blocks()  # freed layers go back to the system at once: the peak is what is live
    reader = CheckpointReader(source)
    model = skeleton(config, dtype)
    tied = choose_layout(adapter, model, tied)
    info = SlicingInfo(dims=dims, tied=tied, hidden_size=config.hidden_size, final_dim=final_dim)
    with contextlib.ExitStack() as stack:
        store = None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="activations-", dir=offload_dir)))
        tmp = stack.enter_context(atomic_path(Path(out), kind="sliced"))
        tmp.mkdir(parents=True)
        specs, aliases = _output_layout(config, dims, tied, final_dim, dtype)
        writer = ShardWriter(tmp / WEIGHTS_FILE, specs, {"format": "pt", **aliases})
        calib = Calibration(
            ActivationStore(store), torch.eye(config.hidden_size, dtype=torch.float64), device, damping, info
        )
        with torch.no_grad():
            basis_0, kwargs, final_scale = _first_stage(model, adapter, reader, input_ids, batch_size, calib, dtype)
            _layer_stage(model, adapter, reader, calib, kwargs, final_dim, writer, dtype, progress)
            _ends_stage(model, adapter, reader, basis_0, final_scale, calib.basis, tied, writer, dtype)
        writer.close()
        model.slicing_info = info
        write_folder_files(model, tokenizer, tmp)
    return info


def _first_stage(model, adapter, reader, input_ids, batch_size, calib, dtype):
    """Tables and final norm read; layer kwargs recorded and the first basis found; the tables dropped again."""
    tables = [adapter.embedding(model), *adapter.position_tables(model)]
    for module in [*tables, adapter.final_norm(model)]:
        materialise(model, module, reader, dtype)
    final_scale = adapter.norm_scale(adapter.final_norm(model)).double().clone()
    with pass_through_layers(model, adapter):
        kwargs = record_layer_kwargs(model, input_ids[:1])
        centre_tables(model, adapter)  # what make_rotation_invariant does before the first basis
        basis_0 = first_basis(model, calib, split_batches(input_ids, batch_size), calib.info.dims[0])
    for module in [adapter.embedding(model), *adapter.position_tables(model)]:
        to_meta(module)
    return basis_0, kwargs, final_scale


def _layer_stage(model, adapter, reader, calib, kwargs, final_dim, writer, dtype, progress) -> None:
    """Each decoder layer read, made invariant, sliced, written and dropped, in order."""
    d, eps = model.config.hidden_size, adapter.norm_eps(model)
    dims = calib.info.dims
    for i in progress_bar(range(len(dims)), desc="slice (streamed)", unit="layer", disable=not progress):
        dense = adapter.layers(model)[i]
        materialise(model, dense, reader, dtype)
        layer = invariant_layer(adapter, dense, d, eps)
        adapter.set_layer(model, i, layer)
        slice_layer(adapter, layer, i, dims[i + 1] if i + 1 < len(dims) else final_dim, calib, kwargs[i])
        _write_real(model, writer)
        to_meta(layer)


def _ends_stage(model, adapter, reader, basis_0, final_scale, last_basis, tied, writer, dtype) -> None:
    """The head folded and rotated, written and dropped; then the embeddings rotated and written."""
    table = adapter.embedding(model)
    if tied:  # the tied layout's head is the table itself: read it once
        materialise(model, table, reader, dtype)
        adapter.head(model).weight = table.weight
    else:
        head = adapter.head(model)
        stored = head if f"{_path(model, head)}.weight" in reader else table  # a tied checkpoint stores one table
        materialise(model, head, reader, dtype, alias=stored)
    invariant_ends(model, adapter)
    finish_head(model, adapter, table if tied else None, final_scale, last_basis)
    if not tied:
        _write_real(model, writer)
        to_meta(adapter.head(model))
        materialise(model, table, reader, dtype)
    for positions in adapter.position_tables(model):
        materialise(model, positions, reader, dtype)
    centre_tables(model, adapter)
    finish_embedding(model, adapter, table, basis_0, tied)
    _write_real(model, writer)
