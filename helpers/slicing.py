"""SliceGPT-style rotate-and-slice with per-layer dimensions (METHOD.md section 3).

Steps: (1) `make_rotation_invariant` folds every RMS norm's scale into the
linear layers that read from it, unties the head and leaves weightless RMS
norms, so outputs are unchanged; (2) `rotate_and_slice` walks the layers in
order, computes a PCA basis (float64, damped) at each residual boundary on
calibration activations produced by the already-sliced earlier layers, rotates
the weights into it and deletes the low-variance directions. Consecutive
bases are joined by shortcut matrices, rectangular when the kept dimensions
differ, which is what lets every layer keep its own dimension d_i.

Conventions (helpers/adapters, sliced_shape contract): x is a row vector and
`nn.Linear` computes x W^T; layer i keeps d_i dimensions at its attention and
MLP inputs, its MLP writes d_{i+1}, and d_L = d (the head reads the full
width; the last basis is the identity). With `tied=True` the model keeps one
V x d embedding table shared by input and output, plus a d x d_0 input matrix
and the final norm's d-vector scale, instead of a second V x d_0 table.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from helpers.adapters import ModelAdapter, get_adapter
from helpers.integrity import (
    CHECKSUM_FIELD,
    check_calibration_tokens,
    folder_checksums,
    read_metadata,
    verify_checksums,
)
from helpers.storage import atomic_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the tied head stores the final norm's scale as a d-vector, not a d x d matrix
SLICING_SCHEMA = {"format_version": "int", "hidden_size": "int", "dims": "ints", "tied": "bool"}
DAMPING = 0.01  # fraction of the mean eigenvalue added to the covariance diagonal


class WeightlessRMSNorm(nn.Module):
    """x / sqrt(sum(x^2) / dim + eps): an RMS norm with no scale, dividing by the ORIGINAL width.

    After slicing, x has fewer coordinates than `dim`, but its squared norm is
    (almost) that of the unsliced vector, so dividing by the original width
    keeps the scale the folded weights expect.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        scale = torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) / self.dim + self.eps)
        return (x32 * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class SlicedDecoderLayer(nn.Module):
    """A pre-norm decoder layer whose residual stream changes basis (and width) through two shortcuts.

    x (d_in) -> h = attn_shortcut(x) + attention(norm(x))         (d_in)
    h        -> y = mlp_shortcut(h) + mlp(norm(h))                 (d_out)
    The attention and MLP modules are the model's own (with re-shaped weights),
    so rotary embeddings, masks and the KV cache work unchanged.
    """

    def __init__(self, attention: nn.Module, mlp: nn.Module, d_in: int, d_out: int, hidden_size: int, eps: float):
        super().__init__()
        self.input_layernorm = WeightlessRMSNorm(hidden_size, eps)
        self.self_attn = attention
        self.attn_shortcut = nn.Linear(d_in, d_in, bias=False)
        self.post_attention_layernorm = WeightlessRMSNorm(hidden_size, eps)
        self.mlp = mlp
        self.mlp_shortcut = nn.Linear(d_in, d_out, bias=False)

    def attention_half(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        return self.attn_shortcut(hidden_states) + (out[0] if isinstance(out, tuple) else out)

    def mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp_shortcut(hidden_states) + self.mlp(self.post_attention_layernorm(hidden_states))

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.mlp_half(self.attention_half(hidden_states, **kwargs))


class RotatedEmbedding(nn.Module):
    """Tied layout, input side: look up the shared V x d table, then project to the first basis (d -> d_0)."""

    def __init__(self, table: nn.Embedding, d_0: int) -> None:
        super().__init__()
        self.table = table
        self.proj = nn.Linear(table.embedding_dim, d_0, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(input_ids))


class TiedHead(nn.Module):
    """Tied layout, output side: the final norm's scale (a d-vector), then the shared table.

    The last basis is the identity, so mapping back to the table's coordinates
    is exactly diag(scale): a per-coordinate product, not a d x d matmul.
    """

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table  # the same module as RotatedEmbedding.table: one set of parameters
        self.scale = nn.Parameter(torch.ones(table.embedding_dim, dtype=table.weight.dtype), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden_states * self.scale, self.table.weight)


@dataclass
class SlicingInfo:
    """What `rotate_and_slice` did: per-layer dims, layout, and the PCA spectra for inspection."""

    dims: list[int]
    tied: bool
    hidden_size: int
    eigenvalues: dict[str, np.ndarray] = field(default_factory=dict)  # boundary name -> eigenvalues, descending

    def kept_variance(self) -> dict[str, float]:
        """Fraction of each boundary's (damped) variance held by the kept directions."""
        kept = {}
        for name, values in self.eigenvalues.items():
            layer = int(name.split("_")[-1])
            dim = self.dims[layer]
            kept[name] = float(values[:dim].sum() / values.sum())
        return kept


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


# ---------------------------------------------------------------------------------------------
# Weight surgery helpers
# ---------------------------------------------------------------------------------------------


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give `linear` a new weight (out x in) and optionally bias, keeping its dtype and device."""
    ref = linear.weight
    linear.weight = nn.Parameter(weight.to(ref.dtype).to(ref.device), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(ref.dtype).to(ref.device), requires_grad=False)


def _rotate_input(linear: nn.Linear, basis: torch.Tensor) -> None:
    """The linear layer now reads coordinates in `basis` (d x k): W -> W Q."""
    _set_linear(linear, linear.weight.double() @ basis.to(linear.weight.device))


def _rotate_output(linear: nn.Linear, basis: torch.Tensor) -> None:
    """The linear layer now writes coordinates in `basis` (d x k): W -> Q^T W, b -> b Q."""
    basis = basis.to(linear.weight.device)
    bias = None if linear.bias is None else linear.bias.double() @ basis
    _set_linear(linear, basis.T @ linear.weight.double(), bias)


def _fold_scale(linears: Sequence[nn.Linear], scale: torch.Tensor) -> None:
    """Fold a norm's per-coordinate scale into the layers reading from it: W -> W diag(g)."""
    for linear in linears:
        _set_linear(linear, linear.weight.double() * scale.double().to(linear.weight.device))


def make_rotation_invariant(model: nn.Module) -> nn.Module:
    """Fold norm scales into adjacent linears, untie the head, use weightless RMS norms (in place).

    The model's outputs do not change (up to float error). Raises
    UnsupportedArchitectureError for families without an adapter.
    """
    adapter = get_adapter(model)
    d, eps = model.config.hidden_size, adapter.norm_eps(model)
    with torch.no_grad():
        for layer in adapter.layers(model):
            _fold_scale(adapter.attention_inputs(layer), adapter.input_norm(layer).weight)
            _fold_scale(adapter.mlp_inputs(layer), adapter.post_attention_norm(layer).weight)
            adapter.set_norms(layer, WeightlessRMSNorm(d, eps), WeightlessRMSNorm(d, eps))
        head = adapter.head(model)
        folded = head.weight.double() * adapter.final_norm(model).weight.double()
        new_head = nn.Linear(d, folded.shape[0], bias=False, device=head.weight.device, dtype=head.weight.dtype)
        _set_linear(new_head, folded)
        adapter.set_head(model, new_head)
        adapter.set_final_norm(model, WeightlessRMSNorm(d, eps))
    model.config.tie_word_embeddings = False
    return model


# ---------------------------------------------------------------------------------------------
# PCA and the sequential loop
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


def principal_basis(
    chunks: Iterable[torch.Tensor], device: torch.device, damping: float = DAMPING
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns, float64) and eigenvalues of sum X^T X over all tokens, largest first.

    The covariance is uncentred, accumulated in float64, and damped by
    `damping` x its mean diagonal so that near-zero directions stay well defined.
    """
    cov = None
    for chunk in chunks:
        x = chunk.to(device).reshape(-1, chunk.shape[-1]).double()
        cov = x.T @ x if cov is None else cov + x.T @ x
    dim = cov.shape[0]
    cov += damping * cov.diagonal().mean() * torch.eye(dim, dtype=torch.float64, device=device)
    values, vectors = _eigh(cov)
    order = torch.argsort(values, descending=True)
    return vectors[:, order], values[order]


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(item, device) for item in obj)
    if isinstance(obj, dict):
        return {key: _to_device(value, device) for key, value in obj.items()}
    return obj


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
    from helpers.allocation import kept_dims

    config = getattr(model_or_config, "config", model_or_config)
    if not 0 <= slice_fraction < 1:
        raise ValueError(f"slice_fraction must be in [0, 1), got {slice_fraction}.")
    fs = np.full(config.num_hidden_layers, slice_fraction)
    return [int(d) for d in kept_dims(fs, config.hidden_size, multiple)]


def _batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]


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
) -> SlicingInfo:
    """Slice `model` in place so that layer i keeps `dims[i]` residual dimensions; return what was done.

    `input_ids` (windows, seqlen) are the calibration windows. The model stays
    on the CPU; only the current layer and its activations go to `device`
    (CUDA when present). `tied=None` keeps one embedding table when the model
    ships with tied embeddings. Constant slicing is `dims = [k] * n_layers`.
    `offload_dir` keeps the calibration activations in files there (deleted
    afterwards) instead of memory, one batch at a time.
    """
    if offload_dir is None:
        return _rotate_and_slice(model, input_ids, dims, tied, batch_size, damping, device, progress, None)
    Path(offload_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="activations-", dir=offload_dir) as folder:
        return _rotate_and_slice(model, input_ids, dims, tied, batch_size, damping, device, progress, Path(folder))


def _rotate_and_slice(
    model: nn.Module,
    input_ids: torch.Tensor,
    dims: Sequence[int],
    tied: bool | None,
    batch_size: int,
    damping: float,
    device: str | torch.device | None,
    progress: bool,
    store: Path | None,
) -> SlicingInfo:
    from helpers.models import pick_device

    adapter = get_adapter(model)
    config = model.config
    d, n_layers = config.hidden_size, config.num_hidden_layers
    dims = check_dims(dims, n_layers, d)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (windows, seqlen), got shape {tuple(input_ids.shape)}.")
    check_calibration_tokens(input_ids.numel(), d, allow_few=True)  # a loud warning; the CLI refuses
    ships_tied = adapter.tied(model)
    tied = ships_tied if tied is None else bool(tied)
    if tied and not ships_tied:
        raise ValueError("tied=True needs a model whose embeddings are tied; use tied=False for this model.")
    device = pick_device(device)
    model.cpu().eval()
    eps = adapter.norm_eps(model)
    info = SlicingInfo(dims=dims, tied=tied, hidden_size=d)

    layer_kwargs = _record_layer_kwargs(model, input_ids[:1])
    table = adapter.embedding(model)
    final_scale = adapter.final_norm(model).weight.detach().double().clone()
    make_rotation_invariant(model)

    with torch.no_grad():
        xs = ActivationStore(store)
        for ids in _batches(input_ids, batch_size):
            xs.append(table(ids))
    basis, values = principal_basis(xs, device, damping)
    info.eigenvalues["attn_0"] = values.cpu().numpy()
    first_basis = basis[:, : dims[0]].cpu()
    xs = xs.map(lambda x: (x.double() @ first_basis).to(x.dtype))
    basis_in = first_basis

    for i in tqdm(range(n_layers), desc="slice", unit="layer", disable=not progress):
        layer = adapter.layers(model)[i]
        d_in = dims[i]
        d_out = dims[i + 1] if i + 1 < n_layers else d
        kwargs = _to_device(layer_kwargs[i], device)
        sliced = SlicedDecoderLayer(adapter.attention(layer), adapter.mlp(layer), d_in, d_out, d, eps)
        sliced.to(device=device, dtype=table.weight.dtype)
        with torch.no_grad():
            # attention half, written in the original basis while we measure its output
            for linear in adapter.attention_inputs(layer):
                _rotate_input(linear, basis_in)
            _set_linear(sliced.attn_shortcut, basis_in)
            hs = xs.map(lambda x, layer=sliced, kw=kwargs: layer.attention_half(x.to(device), **kw).cpu())
            basis, values = principal_basis(hs, device, damping)
            info.eigenvalues[f"mlp_{i}"] = values.cpu().numpy()
            basis_mid = basis[:, :d_in].cpu()
            _rotate_output(adapter.attention_output(layer), basis_mid)
            _set_linear(sliced.attn_shortcut, basis_mid.T @ basis_in)
            xs = hs.map(lambda h, q=basis_mid: (h.double() @ q).to(h.dtype))

            # MLP half, same pattern
            for linear in adapter.mlp_inputs(layer):
                _rotate_input(linear, basis_mid)
            _set_linear(sliced.mlp_shortcut, basis_mid)
            ys = xs.map(lambda x, layer=sliced: layer.mlp_half(x.to(device)).cpu())
            if i + 1 < n_layers:
                basis, values = principal_basis(ys, device, damping)
                info.eigenvalues[f"attn_{i + 1}"] = values.cpu().numpy()
                basis_out = basis[:, :d_out].cpu()
            else:
                basis_out = torch.eye(d, dtype=torch.float64)
            _rotate_output(adapter.mlp_output(layer), basis_out)
            _set_linear(sliced.mlp_shortcut, basis_out.T @ basis_mid)
            xs = ys.map(lambda y, q=basis_out: (y.double() @ q).to(y.dtype))
            basis_in = basis_out
        sliced.cpu()
        adapter.set_layer(model, i, sliced)
        del hs, ys

    with torch.no_grad():
        _finish_ends(model, adapter, table, first_basis, final_scale, tied)
    model.slicing_info = info
    return info


def _finish_ends(
    model: nn.Module,
    adapter: ModelAdapter,
    table: nn.Embedding,
    first_basis: torch.Tensor,
    final_scale: torch.Tensor,
    tied: bool,
) -> None:
    """Embeddings into the first basis; head reading the last layer's (identity-basis) output."""
    if tied:
        embedding = RotatedEmbedding(table, first_basis.shape[1]).to(table.weight.dtype)
        _set_linear(embedding.proj, first_basis.T)
        head = TiedHead(table)
        head.scale.copy_(final_scale.to(head.scale.dtype))
        adapter.set_embedding(model, embedding)
        adapter.set_head(model, head)
    else:
        weight = table.weight.double() @ first_basis
        embedding = nn.Embedding(weight.shape[0], weight.shape[1], dtype=table.weight.dtype)
        embedding.weight = nn.Parameter(weight.to(table.weight.dtype), requires_grad=False)
        adapter.set_embedding(model, embedding)  # the head was already folded and untied


def untie_sliced(model: nn.Module) -> nn.Module:
    """Turn a tied sliced model into SliceGPT's untied layout (V x d_0 table, V x d head), in place.

    Same outputs (up to float error), more parameters: this is what slicing
    without the tied option stores, and lets one slicing run show both layouts.
    """
    adapter = get_adapter(model)
    embedding, head = adapter.embedding(model), adapter.head(model)
    if not isinstance(embedding, RotatedEmbedding) or not isinstance(head, TiedHead):
        raise ValueError("untie_sliced needs a model sliced with the tied layout.")
    table = embedding.table.weight.double()
    dtype = embedding.table.weight.dtype
    with torch.no_grad():
        new_embedding = nn.Embedding(table.shape[0], embedding.proj.out_features, dtype=dtype)
        new_embedding.weight = nn.Parameter((table @ embedding.proj.weight.double().T).to(dtype), requires_grad=False)
        new_head = nn.Linear(table.shape[1], table.shape[0], bias=False, dtype=dtype)
        _set_linear(new_head, table * head.scale.double())
    adapter.set_embedding(model, new_embedding.to(table.device))
    adapter.set_head(model, new_head)
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


def _build_sliced_structure(model: nn.Module, dims: Sequence[int], tied: bool) -> None:
    """Turn a freshly built dense model into an (uninitialised) sliced one with the right shapes."""
    adapter = get_adapter(model)
    d, eps = model.config.hidden_size, adapter.norm_eps(model)
    n_layers = len(adapter.layers(model))

    def resize(linear: nn.Linear, n_in: int | None = None, n_out: int | None = None) -> None:
        n_in, n_out = n_in or linear.in_features, n_out or linear.out_features
        bias = None if linear.bias is None else torch.zeros(n_out)
        _set_linear(linear, torch.zeros(n_out, n_in), bias)

    for i, layer in enumerate(adapter.layers(model)):
        d_in, d_out = dims[i], dims[i + 1] if i + 1 < n_layers else d
        for linear in adapter.attention_inputs(layer) + adapter.mlp_inputs(layer):
            resize(linear, n_in=d_in)
        resize(adapter.attention_output(layer), n_out=d_in)
        resize(adapter.mlp_output(layer), n_out=d_out)
        adapter.set_layer(
            model, i, SlicedDecoderLayer(adapter.attention(layer), adapter.mlp(layer), d_in, d_out, d, eps)
        )
    table = adapter.embedding(model)
    vocab = table.num_embeddings
    adapter.set_final_norm(model, WeightlessRMSNorm(d, eps))
    if tied:
        adapter.set_embedding(model, RotatedEmbedding(table, dims[0]))
        adapter.set_head(model, TiedHead(adapter.embedding(model).table))
    else:
        adapter.set_embedding(model, nn.Embedding(vocab, dims[0]))
        adapter.set_head(model, nn.Linear(d, vocab, bias=False))
    model.config.tie_word_embeddings = False


def save_sliced(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Write a sliced model to `folder`: model.safetensors, config.json, slicing.json, tokenizer files.

    The folder appears only when everything is written (helpers.storage.atomic_path).
    """
    from safetensors.torch import save_model

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
        meta = {
            "format_version": FORMAT_VERSION,
            "model_type": model.config.model_type,
            "hidden_size": info.hidden_size,
            "dims": info.dims,
            "tied": info.tied,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            CHECKSUM_FIELD: folder_checksums(tmp),  # verified on load
        }
        (tmp / "slicing.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_sliced(
    folder: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """Reload a folder written by `save_sliced` as `(model, tokenizer)`, in eval mode on `device`."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from helpers.models import pick_device

    folder = Path(folder)
    meta_path = folder / "slicing.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} has no slicing.json: not a sliced model saved by save_sliced.")
    meta = read_metadata(meta_path, SLICING_SCHEMA, {CHECKSUM_FIELD: "dict"})
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{folder} uses slicing format {meta['format_version']}; expected {FORMAT_VERSION}.")
    verify_checksums(folder, "slicing.json", meta.get(CHECKSUM_FIELD, {}))
    config = AutoConfig.from_pretrained(folder)
    get_adapter(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dims = check_dims(meta["dims"], config.num_hidden_layers, config.hidden_size)
    _build_sliced_structure(model, dims, meta["tied"])
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=True)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the sliced layout (missing {missing}, extra {unexpected}).")
    model.slicing_info = SlicingInfo(dims=dims, tied=meta["tied"], hidden_size=config.hidden_size)
    model.to(device=pick_device(device), dtype=dtype).eval()
    model.name_or_path = str(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tokenizer


def allocation_dims(lr: Sequence[float], sp: float, sb: float, hidden_size: int, fs_max: float = 0.95) -> list[int]:
    """Per-layer kept dimensions for (SP, SB) from LR scores, via helpers.allocation (METHOD.md section 2)."""
    from helpers import allocation

    result = allocation.allocate(np.asarray(lr, dtype=np.float64), sp, sb, hidden_size=hidden_size, fs_max=fs_max)
    return [int(v) for v in allocation.kept_dims(np.asarray(result.fs), hidden_size)]


def sb_values(sp: float, step: float = 0.02) -> list[float]:
    """SB from SP down to 0 in steps of `step` (the paper's sweep), SP first, 0 last."""
    if not 0 < step <= 1 or not 0 <= sp < 1:
        raise ValueError(f"Need 0 <= sp < 1 and 0 < step <= 1; got sp={sp}, step={step}.")
    values = [abs(round(sp - k * step, 6)) for k in range(int(sp / step + 1e-9) + 1)]
    return values if values[-1] == 0 else [*values, 0.0]


def sb_sweep(
    model: nn.Module,
    lr: Sequence[float],
    sp: float,
    calib_ids: torch.Tensor,
    select_ids: torch.Tensor,
    step: float = 0.02,
    eval_ids: torch.Tensor | None = None,
    tied: bool | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Slice a copy of the dense `model` for every SB in `sb_values(sp, step)`; perplexity on `select_ids`.

    Returns columns sb, mean_slice (realised), params, perplexity, best (the
    lowest perplexity: the paper's selection rule) and, with `eval_ids`,
    eval_perplexity. `select_ids` should come from a text other than the one
    used for the final evaluation.
    """
    import copy

    from helpers.evaluation import perplexity_on_ids
    from helpers.ledger import ledger_totals, parameter_ledger

    d = model.config.hidden_size
    rows = []
    for sb in tqdm(sb_values(sp, step), desc=f"SB sweep (SP={sp})", unit="SB", disable=not progress):
        dims = allocation_dims(lr, sp, sb, d)
        sliced = copy.deepcopy(model)
        rotate_and_slice(sliced, calib_ids, dims, tied=tied, batch_size=batch_size, progress=False)
        ppl = perplexity_on_ids(sliced, select_ids, batch_size=batch_size, progress=False).perplexity
        params = ledger_totals(parameter_ledger(sliced))["total"]
        rows.append({"sb": sb, "mean_slice": 1 - float(np.mean(dims)) / d, "params": params, "perplexity": ppl})
        if eval_ids is not None:
            rows[-1]["eval_perplexity"] = perplexity_on_ids(sliced, eval_ids, batch_size, progress=False).perplexity
        del sliced
    table = pd.DataFrame(rows)
    table["best"] = table["perplexity"] == table["perplexity"].min()
    return table


def constant_vs_dynamic(sweeps: dict[float, pd.DataFrame]) -> pd.DataFrame:
    """From `sb_sweep` tables keyed by SP: the constant row (SB = SP) and the selected dynamic row of each.

    The dynamic row is the sweep's `best` (lowest perplexity on the selection text); columns method, sp,
    sb, mean_slice, params and perplexity (the held-out `eval_perplexity`).
    """
    rows = []
    for sp, table in sweeps.items():
        for method, row in (("constant", table[table["sb"] == sp].iloc[0]), ("dynamic", table[table["best"]].iloc[0])):
            rows.append({"method": method, "sp": sp, **row[["sb", "mean_slice", "params", "eval_perplexity"]]})
    return pd.DataFrame(rows).rename(columns={"eval_perplexity": "perplexity"})
