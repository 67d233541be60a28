"""Save and reload sliced models: the folder format written by `save_sliced` and read by `load_sliced`.

A sliced folder holds model.safetensors, config.json, slicing.json (per-layer
dims, layout, checksums), the tokenizer files and modeling_lab.py (plain
transformers loads it too). The slicing recipe itself is helpers.compression.slicing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helpers.compression.slicing import SlicingInfo, check_dims
from helpers.infra.integrity import (
    CHECKSUM_FIELD,
    folder_checksums,
    read_metadata,
    safetensors_shapes,
    verify_checksums,
)
from helpers.infra.storage import atomic_path
from helpers.models.adapters import get_adapter
from helpers.models.loading import pick_device
from helpers.models.shareable import check_stored_layout, layout_spec, sliced_spec, write_shareable
from helpers.models.sliced_layers import build_sliced

SLICING_FILE = "slicing.json"  # marks a folder written by save_sliced
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2  # 2: the tied head stores the final norm's scale as a d-vector, not a d x d matrix
SLICING_SCHEMA = {"format_version": "int", "hidden_size": "int", "dims": "ints", "tied": "bool"}
SLICING_OPTIONAL = {"final_dim": "int"}  # absent in folders saved before the option: the full width


def build_sliced_structure(model: nn.Module, dims: Sequence[int], tied: bool, final_dim: int) -> dict:
    """Turn a freshly built dense model into an (uninitialised) sliced one with the right shapes; return its spec.

    The same `build_sliced` the modeling file saved for plain transformers runs, with the adapter's own layers.
    """
    adapter = get_adapter(model)
    d, eps = model.config.hidden_size, adapter.norm_eps(model)
    head_bias = adapter.norm_bias(adapter.final_norm(model)) is not None  # folded into the head (LayerNorm)
    spec = layout_spec(model, list(dims), tied, final_dim, head_bias)
    build_sliced(model, spec, lambda block, d_in, d_out: adapter.sliced_layer(block, d_in, d_out, d, eps))
    return spec


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
        save_model(model, str(tmp / WEIGHTS_FILE))
        write_folder_files(model, tokenizer, tmp, extra)
    return folder


def write_folder_files(model: nn.Module, tokenizer, tmp: Path, extra: dict | None = None) -> None:
    """Everything of a sliced folder but the weights (written first): config, tokenizer, modeling file, slicing.json."""
    info: SlicingInfo = model.slicing_info
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


def load_sliced(
    folder: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """Reload a folder written by `save_sliced` as `(model, tokenizer)`, in eval mode on `device`."""
    folder = Path(folder)
    model = sliced_skeleton(folder, lambda config: AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the sliced layout (missing {missing}, extra {unexpected}).")
    model.to(device=pick_device(device), dtype=dtype).eval()
    model.name_or_path = str(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tokenizer


def sliced_skeleton(folder: Path, build) -> nn.Module:
    """The sliced structure a folder's slicing.json describes (checksums verified), weights not yet loaded.

    `build(config)` makes the dense model to restructure: real, or with its weights on the meta device.
    """
    meta_path = folder / SLICING_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} has no slicing.json: not a sliced model saved by save_sliced.")
    meta = read_metadata(meta_path, SLICING_SCHEMA, {CHECKSUM_FIELD: "dict", **SLICING_OPTIONAL})
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{folder} uses slicing format {meta['format_version']}; expected {FORMAT_VERSION}.")
    verify_checksums(folder, SLICING_FILE, meta.get(CHECKSUM_FIELD, {}))
    config = AutoConfig.from_pretrained(folder)
    get_adapter(config)
    model = build(config)
    dims = check_dims(meta["dims"], config.num_hidden_layers, config.hidden_size)
    final_dim = check_dims([meta.get("final_dim", config.hidden_size)], 1, config.hidden_size)[0]
    with torch.device(next(model.parameters()).device):
        spec = build_sliced_structure(model, dims, meta["tied"], final_dim)
    check_stored_layout(spec, safetensors_shapes(folder / WEIGHTS_FILE), meta_path)
    model.slicing_info = SlicingInfo(dims=dims, tied=meta["tied"], hidden_size=config.hidden_size, final_dim=final_dim)
    return model
