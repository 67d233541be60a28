"""Make a saved sliced or pruned folder load with plain transformers (`trust_remote_code=True`).

At save time the lab writes `modeling_lab.py` into the folder and adds to its
config.json an `auto_map` entry naming that file's `LabCheckpoint` plus a
`lab_checkpoint` record of the layout (docs/method.md section 3). The file is
the template `helpers/models/modeling_lab.py` with its lab imports replaced by
the source of what they import, so it needs no `helpers`. Sliced folders of
families whose blocks hold `self_attn` and `mlp` modules (the adapter defaults:
Llama, Mistral, Qwen2, Gemma 3) are supported; others get a file that refuses
with a one-line reason.
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

from torch import nn

from helpers.models import modeling_lab
from helpers.models.adapters import get_adapter
from helpers.models.adapters.base import ModelAdapter

REMOTE_FILE = "modeling_lab.py"
AUTO_MAP = {"AutoModelForCausalLM": "modeling_lab.LabCheckpoint"}
BEGIN, END = "# >>> lab sources", "# <<< lab sources"


def remote_code() -> str:
    """The modeling file: the template with its block of lab imports replaced by the imported objects' source."""
    text = inspect.getsource(modeling_lab)
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    objects = [getattr(modeling_lab, a.name) for node in ast.parse(block.split("\n", 1)[1]).body for a in node.names]
    objects.sort(key=lambda obj: (obj.__module__, inspect.getsourcelines(obj)[1]))  # base classes first
    sources = [inspect.getsource(obj).rstrip() for obj in objects]
    return head.rstrip() + "\n\n\n" + "\n\n\n".join(sources) + "\n\n" + tail.split("\n", 1)[1].lstrip("\n")


def _path(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of `module` inside `model`."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _unsupported(adapter: ModelAdapter, model: nn.Module) -> str | None:
    """Why the modeling file cannot rebuild this family's sliced layers, or None."""
    custom = type(adapter).attention is not ModelAdapter.attention or type(adapter).mlp is not ModelAdapter.mlp
    if custom or adapter.position_tables(model):
        return (
            f"a sliced {adapter.family} model loads only with the lab (helpers.compression.checkpoints.load_model); "
            "plain transformers loading supports families whose blocks hold self_attn and mlp modules"
        )
    return None


def layout_spec(model: nn.Module, dims: list[int], tied: bool, final_dim: int, head_bias: bool) -> dict:
    """What `build_sliced` needs, read from the adapter: module paths, per-layer dims, last width, layout, eps."""
    adapter = get_adapter(model)
    block = adapter.layers(model)[0]
    return {
        "layers": _path(model, adapter.layers(model)),
        "embedding": _path(model, adapter.embedding(model)),
        "final_norm": _path(model, adapter.final_norm(model)),
        "head": _path(model, adapter.head(model)),
        "positions": [_path(model, table) for table in adapter.position_tables(model)],
        "inputs": [_path(block, linear) for linear in adapter.attention_inputs(block) + adapter.mlp_inputs(block)],
        "attention_output": _path(block, adapter.attention_output(block)),
        "mlp_output": _path(block, adapter.mlp_output(block)),
        "layer_class": adapter.sliced_layer_class.__name__,
        "dims": [int(k) for k in dims],
        "final_dim": int(final_dim),
        "tied": bool(tied),
        "eps": adapter.norm_eps(model),
        "head_bias": bool(head_bias),
    }


def sliced_spec(model: nn.Module) -> dict:
    """The `lab_checkpoint` record of a sliced model: its `layout_spec`, or why plain transformers cannot load it."""
    adapter, info = get_adapter(model), model.slicing_info
    reason = _unsupported(adapter, model)
    if reason is not None:
        return {"format": "unsupported", "reason": reason}
    head_bias = getattr(adapter.head(model), "bias", None) is not None
    final_dim = info.final_dim or info.hidden_size
    return {"format": "sliced", **layout_spec(model, info.dims, info.tied, final_dim, head_bias)}


def check_stored_layout(spec: dict, shapes: dict[str, list[int]], meta_file: str | Path) -> None:
    """Compare the layout `spec` (read from `meta_file`) with the shapes a weights file holds; an error names
    `meta_file` and the field that disagrees (dims, tied, final_dim) instead of a size-mismatch dump."""
    layers, n = spec["layers"], len(spec["dims"])
    stored_tied = f"{spec['embedding']}.proj.weight" in shapes  # RotatedEmbedding's d x d_0 map
    if stored_tied != spec["tied"]:
        raise ValueError(
            f"{meta_file}: field 'tied' is {str(spec['tied']).lower()} but the weights hold the "
            f"{'tied' if stored_tied else 'untied'} layout."
        )
    for i, kept in enumerate(spec["dims"]):
        stored = shapes.get(f"{layers}.{i}.attn_shortcut.weight", [kept])[0]
        if stored != kept:
            raise ValueError(
                f"{meta_file}: field 'dims' gives layer {i} {kept} dimensions but the weights hold {stored}."
            )
    stored_final = shapes.get(f"{layers}.{n - 1}.mlp_shortcut.weight", [spec["final_dim"]])[0]
    if stored_final != spec["final_dim"]:
        raise ValueError(
            f"{meta_file}: field 'final_dim' is {spec['final_dim']} but the weights' last residual "
            f"has {stored_final} dimensions."
        )


def pruned_spec(model: nn.Module, replacement: dict | None) -> dict:
    """What the modeling file needs to rebuild a pruned model: where the layers are, the replacement if any."""
    return {"format": "pruned", "layers": _path(model, get_adapter(model).layers(model)), "replacement": replacement}


def write_shareable(folder: Path, spec: dict) -> None:
    """Write `modeling_lab.py` into a saved folder and point its config.json at it (call before checksumming)."""
    (folder / REMOTE_FILE).write_text(remote_code())
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.update(auto_map=AUTO_MAP, lab_checkpoint=spec)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
