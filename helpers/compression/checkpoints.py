"""Saved checkpoint formats: which loader a folder needs, and the pruned-model format.

A folder written by `helpers.compression.sliced_io.save_sliced` holds a
`slicing.json`, one written by `save_pruned` a `pruning.json`; `load_model`
reads the marker and dispatches, and anything else is an uncompressed model
for `helpers.models.loading.load_dense`. This module sits above the loaders it
dispatches to, so none of them imports it back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from helpers.compression.depth import renumber_layers
from helpers.compression.sliced_io import SLICING_FILE, load_sliced
from helpers.infra.integrity import CHECKSUM_FIELD, IntegrityError, folder_checksums, read_metadata, verify_checksums
from helpers.infra.storage import atomic_path, write_json_atomic
from helpers.models.adapters import get_adapter
from helpers.models.loading import (
    DEFAULT_MODEL,
    from_pretrained_strict,
    load_dense,
    pick_device,
    resolve_model,
    with_bos,
)
from helpers.models.pruned_layers import build_replacement
from helpers.models.shareable import pruned_spec, write_shareable

PRUNING_FILE = "pruning.json"


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, object]:
    """Load `(model, tokenizer)` in eval mode on `device`: a sliced or pruned folder, or any model `load_dense` takes.

    The tokenizer carries the family's BOS decision (`prepend_bos`, read by helpers.infra.textdata).
    """
    folder = Path(resolve_model(name))
    if (folder / SLICING_FILE).exists():
        model, tokenizer = load_sliced(folder, device=pick_device(device), dtype=dtype)
    elif (folder / PRUNING_FILE).exists():
        model, tokenizer = load_pruned(folder, device=pick_device(device), dtype=dtype)
    else:
        return load_dense(name, device, dtype)
    return model, with_bos(model, tokenizer)


def save_pruned(model: nn.Module, tokenizer, folder: str | Path, info: dict) -> Path:
    """Save a pruned model (weights, tokenizer, `pruning.json` with `info`) as one atomic folder."""
    folder = Path(folder)
    with atomic_path(folder, kind="pruned") as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_shareable(tmp, pruned_spec(model, info.get("replacement")))  # plain transformers loads it too
        write_json_atomic(tmp / PRUNING_FILE, {**info, CHECKSUM_FIELD: folder_checksums(tmp)})  # verified on load
    return folder


def load_pruned(folder: str | Path, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
    """Load `(model, tokenizer)` saved by `save_pruned`, rebuilding a trained replacement if there is one."""
    folder = Path(folder)
    info = read_metadata(folder / PRUNING_FILE, {}, {"replacement": "dict|null", CHECKSUM_FIELD: "dict"})
    verify_checksums(folder, PRUNING_FILE, info.get(CHECKSUM_FIELD, {}))
    replacement = info.get("replacement") or {}
    if replacement.get("kind") in ("ffn", "swiglu") and not all(
        isinstance(replacement.get(k), int) for k in ("position", "hidden")
    ):
        raise IntegrityError(f"{folder / PRUNING_FILE}: field 'replacement' needs integer 'position' and 'hidden'.")
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    if replacement.get("kind") in ("ffn", "swiglu"):
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        layers = get_adapter(model).layers(model)
        layers[replacement["position"]] = build_replacement(
            replacement["kind"], config.hidden_size, replacement["hidden"], dtype=dtype
        )
        renumber_layers(model)
        state = {}
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(load_file(shard))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {get_adapter(config).head_weight_name} if config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"{folder} does not match its pruning.json: missing {missing}, unexpected {unexpected}.")
        model.tie_weights()
    else:
        model = from_pretrained_strict(str(folder), dtype)
        renumber_layers(model)
    model.to(pick_device(device)).eval()
    model.name_or_path = str(folder)
    return model, tokenizer
