"""SliceGPT-style rotate-and-slice with per-layer dimensions (docs/method.md section 3).

The recipe, one named step each:
1. `make_rotation_invariant`: fold every norm's scale (and LayerNorm bias)
   into the linear layers that read from it, centre the residual stream for
   LayerNorm families, untie the head, and turn every block into its family's
   sliced layer at full width (identity shortcuts, weightless RMS norms), so
   outputs are unchanged;
2. `first_basis`: PCA of the first layer's inputs;
3. for each layer in order (`slice_layer`): `slice_attention_half` then
   `slice_mlp_half`, each computing a PCA basis (float64, damped) of the half's
   output on calibration activations produced by the already-sliced earlier
   layers, making the half write into it and joining the bases by a shortcut
   matrix, rectangular when the kept dimensions differ;
4. `finish_ends`: the embeddings into the first basis, the head reading the
   last layer's output (the identity basis, or with `final_dim` its PCA basis), tied or untied.

Conventions (helpers/sliced_layers): x is a row vector and `nn.Linear`
computes x W^T; layer i keeps d_i dimensions at its attention and MLP inputs,
its MLP writes d_{i+1}, and d_L = d (the head reads the full width; the last
basis is the identity) unless `final_dim` slices the last residual too: then the
head is a V x d_L matrix of its own (fewer multiply-adds per generated token,
more parameters in the tied layout). With `tied=True` the model keeps one V x d embedding
table shared by input and output, plus a d x d_0 input matrix and the final
norm's d-vector scale, instead of a second V x d_0 table. Everything family-specific
(which norms, their scales, pre- or post-norm blocks, embedding scale,
position tables) comes from the adapter (helpers/adapters).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helpers.compression import allocation
from helpers.compression.allocation import kept_dims
from helpers.infra.integrity import (
    CHECKSUM_FIELD,
    check_calibration_tokens,
    folder_checksums,
    read_metadata,
    verify_checksums,
)
from helpers.infra.memory import release_freed_memory
from helpers.infra.storage import atomic_path
from helpers.models.adapters import ModelAdapter, get_adapter
from helpers.models.loading import pick_device
from helpers.models.shareable import sliced_spec, write_shareable
from helpers.models.sliced_layers import (
    RotatedEmbedding,
    TiedHead,
    WeightlessRMSNorm,
    rotate_input,
    rotate_output,
    set_linear,
)

log = logging.getLogger(__name__)

SLICING_FILE = "slicing.json"  # marks a folder written by save_sliced
FORMAT_VERSION = 2  # 2: the tied head stores the final norm's scale as a d-vector, not a d x d matrix
SLICING_SCHEMA = {"format_version": "int", "hidden_size": "int", "dims": "ints", "tied": "bool"}
SLICING_OPTIONAL = {"final_dim": "int"}  # absent in folders saved before the option: the full width
DAMPING = 0.01  # fraction of the mean eigenvalue added to the covariance diagonal


@dataclass
class SlicingInfo:
    """What `rotate_and_slice` did: per-layer dims, layout, and the PCA spectra for inspection."""

    dims: list[int]
    tied: bool
    hidden_size: int
    final_dim: int | None = None  # the last residual's width (what the head reads); None: hidden_size
    eigenvalues: dict[str, np.ndarray] = field(default_factory=dict)  # boundary name -> eigenvalues, descending

    def kept_variance(self) -> dict[str, float]:
        """Fraction of each boundary's (damped) variance held by the kept directions."""
        kept = {}
        widths = [*self.dims, self.final_dim or self.hidden_size]  # boundary L is the head's input
        for name, values in self.eigenvalues.items():
            dim = widths[int(name.split("_")[-1])]
            kept[name] = float(values[:dim].sum() / values.sum())
        return kept


# ---------------------------------------------------------------------------------------------
# Step 1: rotation invariance
# ---------------------------------------------------------------------------------------------


def _fold_norm(adapter: ModelAdapter, norm: nn.Module, readers: Sequence[nn.Linear]) -> None:
    """Fold a norm's scale g and bias beta into the layers reading from it: W -> W diag(g), b -> b + W beta."""
    scale = adapter.norm_scale(norm).double()
    shift = adapter.norm_bias(norm)
    for linear in readers:
        weight = linear.weight.double()
        bias = None
        if shift is not None:
            bias = weight @ shift.double().to(weight.device)
            bias = bias if linear.bias is None else bias + linear.bias.double()
        set_linear(linear, weight * scale.to(weight.device), bias)


def _centre_output(linear: nn.Linear) -> None:
    """Make a layer that writes the residual stream write mean-free vectors: W -> W - mean over outputs."""
    weight = linear.weight.double()
    bias = None if linear.bias is None else linear.bias.double() - linear.bias.double().mean()
    set_linear(linear, weight - weight.mean(0, keepdim=True), bias)


def _centre_table(table: nn.Embedding) -> None:
    """Subtract each row's mean (LayerNorm families: embeddings write mean-free vectors)."""
    weight = table.weight.detach()
    table.weight = nn.Parameter(weight - weight.mean(-1, keepdim=True), requires_grad=False)


def _invariant_layer(adapter: ModelAdapter, layer: nn.Module, d: int, eps: float) -> nn.Module:
    """The family's sliced layer at full width: folded readers, identity shortcuts, output-norm scales in maps."""
    _fold_norm(adapter, adapter.input_norm(layer), adapter.attention_inputs(layer))
    _fold_norm(adapter, adapter.post_attention_norm(layer), adapter.mlp_inputs(layer))
    if adapter.centres_residual:
        _centre_output(adapter.attention_output(layer))
        _centre_output(adapter.mlp_output(layer))
    sliced = adapter.sliced_layer(layer, d, d, d, eps).to(adapter.attention_output(layer).weight.device)
    eye = torch.eye(d, dtype=torch.float64)
    set_linear(sliced.attn_shortcut, eye)
    set_linear(sliced.mlp_shortcut, eye)
    for norm, output_map in zip(adapter.output_norms(layer), sliced.output_maps(), strict=True):
        set_linear(output_map, torch.diag(adapter.norm_scale(norm).double()))
    return sliced


def _fold_final_norm(model: nn.Module, adapter: ModelAdapter) -> None:
    """Fold the final norm into a new, untied head: W -> W diag(g), bias W beta (LayerNorm)."""
    head, norm = adapter.head(model), adapter.final_norm(model)
    shift = adapter.norm_bias(norm)
    folded = head.weight.double() * adapter.norm_scale(norm).double()
    new_head = nn.Linear(
        folded.shape[1], folded.shape[0], bias=shift is not None, device=head.weight.device, dtype=head.weight.dtype
    )
    set_linear(new_head, folded, None if shift is None else head.weight.double() @ shift.double())
    adapter.set_head(model, new_head)


def make_rotation_invariant(model: nn.Module) -> nn.Module:
    """Fold norms into adjacent linears, untie the head, use the family's sliced layers at full width (in place).

    The model's outputs do not change (up to float error). Raises
    UnsupportedArchitectureError for families without an adapter.
    """
    adapter = get_adapter(model)
    d, eps = model.config.hidden_size, adapter.norm_eps(model)
    with torch.no_grad():
        for index, layer in enumerate(list(adapter.layers(model))):
            adapter.set_layer(model, index, _invariant_layer(adapter, layer, d, eps))
        _fold_final_norm(model, adapter)
        adapter.set_final_norm(model, WeightlessRMSNorm(d, eps))
        if adapter.centres_residual:
            for table in [adapter.embedding(model), *adapter.position_tables(model)]:
                _centre_table(table)
    model.config.tie_word_embeddings = False
    return model


# ---------------------------------------------------------------------------------------------
# PCA
# ---------------------------------------------------------------------------------------------


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition; on CPU single-threaded for small matrices.

    LAPACK gains nothing from threads at d ~ 1000, and on a busy CPU the
    thread pool's contention made a 576 x 576 eigh 10x slower than one thread.
    """
    if matrix.device.type != "cpu" or matrix.shape[0] > 2048:
        return torch.linalg.eigh(matrix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrix)
    finally:
        torch.set_num_threads(threads)


def gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """x^T x from its block rows on and above the diagonal, mirrored below.

    The matrix is symmetric, so 4 column blocks need 10 of the 16 block products
    of a full x.T @ x; every entry is still one dot product over all rows.
    """
    d = x.shape[1]
    edges = [d * i // blocks for i in range(blocks + 1)]
    out = x.new_empty(d, d)
    for lo, hi in itertools.pairwise(edges):
        rows = x[:, lo:hi].T @ x[:, lo:]
        out[lo:hi, lo:] = rows
        out[lo:, lo:hi] = rows.T
    return out


def principal_basis(
    chunks: Iterable[torch.Tensor], device: torch.device, damping: float = DAMPING
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns, float64) and eigenvalues of sum X^T X over all tokens, largest first.

    The covariance is uncentred, accumulated in float64, and damped by
    `damping` x its mean diagonal so that near-zero directions stay well defined.
    Every token counts, a BOS included: the sliced model must carry the BOS
    state (an attention sink) forward (docs/method.md section 3).
    """
    cov = None
    for chunk in chunks:
        x = chunk.to(device).reshape(-1, chunk.shape[-1]).double()
        cov = gram(x) if cov is None else cov + gram(x)
    dim = cov.shape[0]
    cov += damping * cov.diagonal().mean() * torch.eye(dim, dtype=torch.float64, device=device)
    values, vectors = _eigh(cov)
    order = torch.argsort(values, descending=True)
    return vectors[:, order], values[order]


# ---------------------------------------------------------------------------------------------
# The sequential loop
# ---------------------------------------------------------------------------------------------


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(item, device) for item in obj)
    if isinstance(obj, dict):
        return {key: _to_device(value, device) for key, value in obj.items()}
    return obj


class _StopForward(Exception):
    """Raised by a hook once it has what it needs."""


def _record_layer_kwargs(model: nn.Module, input_ids: torch.Tensor) -> list[dict]:
    """Run one window and keep each layer's keyword arguments (mask, rotary embeddings, positions)."""
    adapter = get_adapter(model)
    recorded: list[dict] = [{} for _ in adapter.layers(model)]
    handles = []
    for index, layer in enumerate(adapter.layers(model)):

        def hook(_module, _args, kwargs, index=index):
            recorded[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            adapter.backbone(model)(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def _first_layer_inputs(model: nn.Module, batches: Sequence[torch.Tensor], inputs: ActivationStore) -> None:
    """Append to `inputs` what the first decoder layer receives (scaled embeddings plus any learned positions)."""
    adapter = get_adapter(model)

    def hook(_module, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _StopForward

    handle = adapter.layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                with contextlib.suppress(_StopForward):
                    adapter.backbone(model)(input_ids=ids, use_cache=False)
    finally:
        handle.remove()


def check_dims(dims: Sequence[int], n_layers: int, hidden_size: int) -> list[int]:
    """Validate per-layer kept dimensions: one per layer, each in [1, d]."""
    dims = [int(v) for v in dims]
    if len(dims) != n_layers:
        raise ValueError(f"dims must have one entry per layer ({n_layers}), got {len(dims)}.")
    bad = [v for v in dims if not 1 <= v <= hidden_size]
    if bad:
        raise ValueError(f"Every kept dimension must be in [1, {hidden_size}]; got {bad}.")
    return dims


def constant_dims(model_or_config, slice_fraction: float, multiple: int = 8) -> list[int]:
    """One dimension for every layer: (1 - slice) x d rounded down to a multiple of `multiple` (SliceGPT)."""
    config = getattr(model_or_config, "config", model_or_config)
    if not 0 <= slice_fraction < 1:
        raise ValueError(f"slice_fraction must be in [0, 1), got {slice_fraction}.")
    fs = np.full(config.num_hidden_layers, slice_fraction)
    return [int(d) for d in kept_dims(fs, config.hidden_size, multiple)]


def _batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]


class ActivationStore:
    """Calibration activations, one tensor per batch: in memory, or one file per batch under `folder`.

    On disk only one batch is in memory at a time, so peak memory stays flat
    however many calibration tokens there are (a 7B model's 64 x 2048 set).
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.items: list = []

    def append(self, x: torch.Tensor) -> None:
        if self.folder is None:
            self.items.append(x)
            return
        path = self.folder / f"{id(self)}-{len(self.items)}.pt"
        torch.save(x.contiguous(), path)
        self.items.append(path)

    def __iter__(self):
        for item in self.items:
            yield item if self.folder is None else torch.load(item)

    def map(self, func) -> ActivationStore:
        """A new store holding `func(x)` for every batch; this one's files are deleted."""
        out = ActivationStore(self.folder)
        for x in self:
            out.append(func(x))
        if self.folder is not None:
            for path in self.items:
                path.unlink()
        self.items = []
        return out


@dataclass
class _Calibration:
    """The state the sequential loop carries from one residual boundary to the next."""

    xs: ActivationStore  # calibration activations in the current basis, one chunk per batch
    basis: torch.Tensor  # d x k: the current basis, in original coordinates
    device: torch.device
    damping: float
    info: SlicingInfo

    def pca(self, chunks: ActivationStore, name: str, keep: int) -> torch.Tensor:
        """The top `keep` principal directions of `chunks` (original basis); spectrum kept under `name`."""
        basis, values = principal_basis(chunks, self.device, self.damping)
        self.info.eigenvalues[name] = values.cpu().numpy()
        return basis[:, :keep].cpu()

    def move_to(self, outputs: ActivationStore, basis: torch.Tensor) -> None:
        """The next boundary: activations `outputs` (original basis) expressed in `basis`.

        A float32 product, as SliceGPT rotates its stored inputs: the float64 one
        cost 1.8x the time and the result is rounded to the activations' dtype anyway.
        """
        basis32 = basis.float()
        self.xs = outputs.map(lambda y: (y.float() @ basis32).to(y.dtype))
        self.basis = basis


def first_basis(model: nn.Module, calib: _Calibration, batches: Sequence[torch.Tensor], d_0: int) -> torch.Tensor:
    """Step 2: the PCA basis of the first layer's inputs; the calibration moves into it."""
    inputs = ActivationStore(calib.xs.folder)
    _first_layer_inputs(model, batches, inputs)
    basis = calib.pca(inputs, "attn_0", d_0)
    calib.move_to(inputs, basis)
    return basis


def _writers(adapter: ModelAdapter, layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The two linear layers of a (sliced) layer that write the residual stream."""
    return layer.residual_writers(adapter.attention_output(layer), adapter.mlp_output(layer))


def slice_attention_half(
    adapter: ModelAdapter, layer: nn.Module, index: int, calib: _Calibration, kwargs: dict
) -> None:
    """Attention reads the current basis; its output (measured in the original basis) goes into its PCA basis."""
    basis_in = calib.basis
    for linear in adapter.attention_inputs(layer):
        rotate_input(linear, basis_in)
    set_linear(layer.attn_shortcut, basis_in)  # for now the half writes original coordinates
    outputs = calib.xs.map(lambda x: layer.attention_half(x.to(calib.device), **kwargs).cpu())
    basis_mid = calib.pca(outputs, f"mlp_{index}", basis_in.shape[1])
    rotate_output(_writers(adapter, layer)[0], basis_mid)
    set_linear(layer.attn_shortcut, basis_mid.T @ basis_in)
    calib.move_to(outputs, basis_mid)


def slice_mlp_half(adapter: ModelAdapter, layer: nn.Module, index: int, d_out: int, calib: _Calibration) -> None:
    """Same pattern for the MLP; after the last layer the basis is the identity unless `final_dim` slices it."""
    basis_mid = calib.basis
    for linear in adapter.mlp_inputs(layer):
        rotate_input(linear, basis_mid)
    set_linear(layer.mlp_shortcut, basis_mid)
    outputs = calib.xs.map(lambda x: layer.mlp_half(x.to(calib.device)).cpu())
    last = index + 1 == len(calib.info.dims)
    if last and d_out == calib.basis.shape[0]:
        basis_out = torch.eye(d_out, dtype=torch.float64)
    else:
        basis_out = calib.pca(outputs, f"{'head' if last else 'attn'}_{index + 1}", d_out)
    rotate_output(_writers(adapter, layer)[1], basis_out)
    set_linear(layer.mlp_shortcut, basis_out.T @ basis_mid)
    calib.move_to(outputs, basis_out)


def slice_layer(adapter: ModelAdapter, layer: nn.Module, index: int, d_out: int, calib: _Calibration, kwargs: dict):
    """Step 3 for one (full-width, folded) layer: slice its two halves on the accelerator, then back to the CPU."""
    dtype = adapter.attention_output(layer).weight.dtype
    layer.to(device=calib.device, dtype=dtype)
    with torch.no_grad():
        slice_attention_half(adapter, layer, index, calib, _to_device(kwargs, calib.device))
        slice_mlp_half(adapter, layer, index, d_out, calib)
    layer.cpu()


def finish_ends(
    model: nn.Module,
    adapter: ModelAdapter,
    table: nn.Module,
    basis: torch.Tensor,
    final_scale: torch.Tensor,
    tied: bool,
    last_basis: torch.Tensor,
) -> None:
    """Step 4: embeddings (and learned positions) into the first basis; the head reads the last basis.

    Tied: the original (scaled) embedding module stays as the shared table,
    followed by a d x d_0 projection; the head maps back through the final
    norm's scale (a d-vector) and reads the same table. Untied: a V x d_0 table
    with the embedding scale folded in; the head was folded and untied in step 1.
    A sliced last basis Q_L (d x d_L, `final_dim`) gives the head its own
    V x d_L matrix, W Q_L, in either layout (tied: W = table x scale).
    """
    dtype = table.weight.dtype
    sliced_head = last_basis.shape[1] < last_basis.shape[0]
    for positions in adapter.position_tables(model):
        positions.weight = nn.Parameter((positions.weight.double() @ basis).to(dtype), requires_grad=False)
    if tied:
        embedding = RotatedEmbedding(table, basis.shape[1]).to(dtype)
        set_linear(embedding.proj, basis.T)
        head = TiedHead(table)
        head.scale.copy_(final_scale.to(head.scale.dtype))
        if sliced_head:
            head = nn.Linear(last_basis.shape[1], table.num_embeddings, bias=False, dtype=dtype)
            set_linear(head, (table.weight.double() * final_scale) @ last_basis)
        adapter.set_embedding(model, embedding)
        adapter.set_head(model, head)
        return
    if sliced_head:
        rotate_input(adapter.head(model), last_basis)
    weight = adapter.embedding_scale(model) * table.weight.double() @ basis
    embedding = nn.Embedding(weight.shape[0], weight.shape[1], dtype=dtype)
    embedding.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    adapter.set_embedding(model, embedding)


def _layout(adapter: ModelAdapter, model: nn.Module, tied: bool | None) -> bool:
    """Whether to keep one shared table: the model's own choice unless asked, where the family allows it."""
    ships_tied = adapter.tied(model)
    if tied is None:
        return ships_tied and not adapter.centres_residual
    if tied and not ships_tied:
        raise ValueError("tied=True needs a model whose embeddings are tied; use tied=False for this model.")
    if tied and adapter.centres_residual:
        raise ValueError(f"The tied layout is not available for {adapter.family} (LayerNorm); use tied=False.")
    return bool(tied)


def rotate_and_slice(
    model: nn.Module,
    input_ids: torch.Tensor,
    dims: Sequence[int],
    tied: bool | None = None,
    batch_size: int = 8,
    damping: float = DAMPING,
    device: str | torch.device | None = None,
    progress: bool = True,
    offload_dir: str | Path | None = None,
    final_dim: int | None = None,
) -> SlicingInfo:
    """Slice `model` in place so that layer i keeps `dims[i]` residual dimensions; return what was done.

    `input_ids` (windows, seqlen) are the calibration windows (every token,
    a BOS included, counts in the PCA). The model stays
    on the CPU; only the current layer and its activations go to `device`
    (CUDA when present). `tied=None` keeps one embedding table when the model
    ships with tied embeddings. Constant slicing is `dims = [k] * n_layers`.
    `offload_dir` keeps the calibration activations in files there (deleted
    afterwards) instead of memory, one batch at a time. `final_dim` also
    slices the last layer's output (PCA, like every other boundary), so the
    head reads `final_dim` coordinates through a V x final_dim matrix of its own.
    """
    args = (model, input_ids, dims, tied, batch_size, damping, device, progress, final_dim)
    if offload_dir is None:
        return _rotate_and_slice(*args, None)
    Path(offload_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="activations-", dir=offload_dir) as folder:
        return _rotate_and_slice(*args, Path(folder))


def _rotate_and_slice(
    model: nn.Module,
    input_ids: torch.Tensor,
    dims: Sequence[int],
    tied: bool | None,
    batch_size: int,
    damping: float,
    device: str | torch.device | None,
    progress: bool,
    final_dim: int | None,
    store: Path | None,
) -> SlicingInfo:
    adapter = get_adapter(model)
    d, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    dims = check_dims(dims, n_layers, d)
    final_dim = check_dims([final_dim or d], 1, d)[0]
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (windows, seqlen), got shape {tuple(input_ids.shape)}.")
    check_calibration_tokens(input_ids.numel(), d, allow_few=True)  # a loud warning; the CLI refuses
    tied = _layout(adapter, model, tied)
    model.cpu().eval()
    info = SlicingInfo(dims=dims, tied=tied, hidden_size=d, final_dim=final_dim)
    batches = _batches(input_ids, batch_size)
    layer_kwargs = _record_layer_kwargs(model, input_ids[:1])
    table = adapter.embedding(model)
    final_scale = adapter.norm_scale(adapter.final_norm(model)).double().clone()

    make_rotation_invariant(model)
    calib = _Calibration(ActivationStore(store), torch.eye(d, dtype=torch.float64), pick_device(device), damping, info)
    basis_0 = first_basis(model, calib, batches, dims[0])
    for i in tqdm(range(n_layers), desc="slice", unit="layer", disable=not progress):
        d_out = dims[i + 1] if i + 1 < n_layers else final_dim
        slice_layer(adapter, adapter.layers(model)[i], i, d_out, calib, layer_kwargs[i])
        release_freed_memory()  # else glibc keeps each layer's freed activations and the resident set creeps up
    with torch.no_grad():
        finish_ends(model, adapter, table, basis_0, final_scale, tied, calib.basis)
    model.slicing_info = info
    return info


def untie_sliced(model: nn.Module) -> nn.Module:
    """Turn a tied sliced model into SliceGPT's untied layout (V x d_0 table, V x d head), in place.

    Same outputs (up to float error), more parameters: this is what slicing
    without the tied option stores, and lets one slicing run show both layouts.
    """
    adapter = get_adapter(model)
    embedding, head = adapter.embedding(model), adapter.head(model)
    if not isinstance(embedding, RotatedEmbedding):
        raise ValueError("untie_sliced needs a model sliced with the tied layout.")
    table = embedding.table.weight.double()
    dtype = embedding.table.weight.dtype
    with torch.no_grad():
        new_embedding = nn.Embedding(table.shape[0], embedding.proj.out_features, dtype=dtype)
        rows = adapter.embedding_scale(model) * table @ embedding.proj.weight.double().T  # the table module's scale
        new_embedding.weight = nn.Parameter(rows.to(dtype), requires_grad=False)
        if isinstance(head, TiedHead):  # a sliced head (final_dim) is its own matrix already
            new_head = nn.Linear(table.shape[1], table.shape[0], bias=False, dtype=dtype)
            set_linear(new_head, table * head.scale.double())
            adapter.set_head(model, new_head.to(table.device))
    adapter.set_embedding(model, new_embedding.to(table.device))
    model.slicing_info.tied = False
    return model


def slice_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    dims: Sequence[int] | None = None,
    slice_fraction: float | None = None,
    **kwargs,
) -> SlicingInfo:
    """`rotate_and_slice` with either explicit per-layer `dims` or one constant `slice_fraction`."""
    if (dims is None) == (slice_fraction is None):
        raise ValueError("Give exactly one of dims (per-layer) or slice_fraction (constant).")
    if dims is None:
        dims = constant_dims(model, slice_fraction)
    return rotate_and_slice(model, input_ids, dims, **kwargs)


# ---------------------------------------------------------------------------------------------
# Save and reload
# ---------------------------------------------------------------------------------------------


def _build_sliced_structure(model: nn.Module, dims: Sequence[int], tied: bool, final_dim: int) -> None:
    """Turn a freshly built dense model into an (uninitialised) sliced one with the right shapes."""
    adapter = get_adapter(model)
    d, eps = model.config.hidden_size, adapter.norm_eps(model)
    n_layers = len(adapter.layers(model))

    def resize(linear: nn.Linear, n_in: int | None = None, n_out: int | None = None) -> None:
        n_in, n_out = n_in or linear.in_features, n_out or linear.out_features
        bias = None if linear.bias is None else torch.zeros(n_out)
        set_linear(linear, torch.zeros(n_out, n_in), bias)

    for i, layer in enumerate(list(adapter.layers(model))):
        d_in, d_out = dims[i], dims[i + 1] if i + 1 < n_layers else final_dim
        for linear in adapter.attention_inputs(layer) + adapter.mlp_inputs(layer):
            resize(linear, n_in=d_in)
        sliced = adapter.sliced_layer(layer, d_in, d_out, d, eps)
        attention_writer, mlp_writer = _writers(adapter, sliced)
        resize(attention_writer, n_out=d_in)
        resize(mlp_writer, n_out=d_out)
        adapter.set_layer(model, i, sliced)
    table = adapter.embedding(model)
    vocab = table.num_embeddings
    head_bias = adapter.norm_bias(adapter.final_norm(model)) is not None  # folded into the head (LayerNorm)
    for positions in adapter.position_tables(model):
        positions.weight = nn.Parameter(torch.zeros(positions.num_embeddings, dims[0]), requires_grad=False)
    adapter.set_final_norm(model, WeightlessRMSNorm(d, eps))
    if tied:
        adapter.set_embedding(model, RotatedEmbedding(table, dims[0]))
        adapter.set_head(model, TiedHead(adapter.embedding(model).table))
    else:
        adapter.set_embedding(model, nn.Embedding(vocab, dims[0]))
    if not tied or final_dim < d:
        adapter.set_head(model, nn.Linear(final_dim, vocab, bias=head_bias))
    model.config.tie_word_embeddings = False


def save_sliced(model: nn.Module, tokenizer, folder: str | Path, extra: dict | None = None) -> Path:
    """Write a sliced model to `folder`: model.safetensors, config.json, slicing.json, tokenizer files, modeling_lab.py.

    `extra` adds fields to slicing.json (e.g. the recovery recipe). The folder appears only when
    everything is written (helpers.infra.storage.atomic_path).
    """
    info: SlicingInfo | None = getattr(model, "slicing_info", None)
    if info is None:
        raise ValueError("This model has not been sliced (no slicing_info); run rotate_and_slice first.")
    folder = Path(folder)
    with atomic_path(folder, kind="sliced") as tmp:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_shareable(tmp, sliced_spec(model))  # plain transformers loads it too (trust_remote_code=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "model_type": model.config.model_type,
            "hidden_size": info.hidden_size,
            "dims": info.dims,
            "tied": info.tied,
            "final_dim": info.final_dim or info.hidden_size,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **(extra or {}),
            CHECKSUM_FIELD: folder_checksums(tmp),  # verified on load
        }
        (tmp / SLICING_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_sliced(
    folder: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """Reload a folder written by `save_sliced` as `(model, tokenizer)`, in eval mode on `device`."""
    folder = Path(folder)
    meta_path = folder / SLICING_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} has no slicing.json: not a sliced model saved by save_sliced.")
    meta = read_metadata(meta_path, SLICING_SCHEMA, {CHECKSUM_FIELD: "dict", **SLICING_OPTIONAL})
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{folder} uses slicing format {meta['format_version']}; expected {FORMAT_VERSION}.")
    verify_checksums(folder, SLICING_FILE, meta.get(CHECKSUM_FIELD, {}))
    config = AutoConfig.from_pretrained(folder)
    get_adapter(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dims = check_dims(meta["dims"], config.num_hidden_layers, config.hidden_size)
    final_dim = check_dims([meta.get("final_dim", config.hidden_size)], 1, config.hidden_size)[0]
    _build_sliced_structure(model, dims, meta["tied"], final_dim)
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the sliced layout (missing {missing}, extra {unexpected}).")
    model.slicing_info = SlicingInfo(dims=dims, tied=meta["tied"], hidden_size=config.hidden_size, final_dim=final_dim)
    model.to(device=pick_device(device), dtype=dtype).eval()
    model.name_or_path = str(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tokenizer


def allocation_dims(
    lr: Sequence[float],
    sp: float,
    sb: float,
    hidden_size: int,
    fs_max: float | None = None,
    multiple: int | None = None,
) -> list[int]:
    """Per-layer kept dimensions for (SP, SB) from LR scores: `allocation.allocate(...).kept_dim` as a list."""
    result = allocation.allocate(
        np.asarray(lr, dtype=np.float64),
        sp,
        sb,
        hidden_size=hidden_size,
        fs_max=allocation.DEFAULT_FS_MAX if fs_max is None else fs_max,
        multiple=allocation.DEFAULT_MULTIPLE if multiple is None else multiple,
    )
    return [int(v) for v in result.kept_dim]
