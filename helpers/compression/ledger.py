"""Where a model's parameters are: embeddings, head, attention, MLP, shortcut matrices, norms, per layer.

Counts real tensors: every unique parameter once (a table shared by the
embeddings and the head counts once, under embeddings). Works on dense,
sliced and pruned models of every family alike, via the family adapter. The
post-norm construction's d x k maps (Gemma 3, docs/method.md section 3) are
their own part, so its cost is visible.
"""

from __future__ import annotations

import copy

import pandas as pd
from torch import nn

from helpers.compression.allocation import ModelShape, constant_dims
from helpers.compression.slicing import rotate_and_slice, untie_sliced
from helpers.models.adapters import get_adapter

PARTS = ("embeddings", "head", "attention", "mlp", "shortcuts", "post_norm_maps", "norms", "replacement", "other")


def _owners(model: nn.Module) -> dict[int, tuple[str, int, str]]:
    """Map id(parameter) -> (block, layer, part); the first claim wins."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    owners: dict[int, tuple[str, int, str]] = {}

    def claim(module: nn.Module, block: str, layer: int, part: str) -> None:
        for param in module.parameters():
            owners.setdefault(id(param), (block, layer, part))

    claim(adapter.embedding(model), "embeddings", -1, "embeddings")
    for positions in adapter.position_tables(model):
        claim(positions, "embeddings", -1, "embeddings")
    for index, layer in enumerate(layers):
        block = f"layer {index}"
        if not adapter.is_decoder_layer(layer):  # e.g. an LLM-Streamline replacement block
            claim(layer, block, index, "replacement")
            continue
        claim(adapter.attention(layer), block, index, "attention")
        claim(adapter.mlp(layer), block, index, "mlp")
        for name, module in layer.named_children():
            if "shortcut" in name:
                claim(module, block, index, "shortcuts")
            elif name.endswith("_map"):
                claim(module, block, index, "post_norm_maps")
            elif "norm" in name:
                claim(module, block, index, "norms")
        claim(layer, block, index, "other")
    claim(adapter.final_norm(model), "head", len(layers), "norms")
    claim(adapter.head(model), "head", len(layers), "head")
    return owners


def parameter_ledger(model: nn.Module) -> pd.DataFrame:
    """One row per (block, part): columns block, layer (-1 = embeddings, L = head side), part, params."""
    owners = _owners(model)
    rows: dict[tuple[str, int, str], int] = {}
    for _name, param in model.named_parameters():  # named_parameters yields a shared tensor once
        key = owners.get(id(param), ("other", -2, "other"))
        rows[key] = rows.get(key, 0) + param.numel()
    table = pd.DataFrame(
        [(b, layer, p, n) for (b, layer, p), n in rows.items()], columns=["block", "layer", "part", "params"]
    )
    return table.sort_values(["layer", "part"], kind="stable").reset_index(drop=True)


def ledger_totals(ledger: pd.DataFrame) -> dict[str, int]:
    """Totals per part (every part in PARTS, zero when absent) plus "total"."""
    sums = ledger.groupby("part")["params"].sum()
    totals = {part: int(sums.get(part, 0)) for part in PARTS}
    totals["total"] = int(ledger["params"].sum())
    return totals


def ledger_by_layer(ledger: pd.DataFrame) -> pd.DataFrame:
    """Wide table: one row per block (embeddings, layer 0..L-1, head), one column per part."""
    wide = ledger.pivot_table(index=["layer", "block"], columns="part", values="params", aggfunc="sum", fill_value=0)
    wide = wide.reindex(columns=[p for p in PARTS if p in wide.columns])
    return wide.reset_index().drop(columns="layer").set_index("block")


def compression(params: int, dense_params: int) -> float:
    """Fraction of parameters removed against the dense model as it ships (negative = it grew)."""
    if dense_params <= 0:
        raise ValueError("dense_params must be positive.")
    return 1.0 - params / dense_params


def layout_ledger(
    model: nn.Module, calib_ids, fractions: list[float], reuse: dict[float, nn.Module] | None = None
) -> pd.DataFrame:
    """Totals of the dense model and of constant slicings at `fractions`, tied and untied; `removed` vs dense.

    `reuse` maps a fraction to a model already sliced (tied) at it, so that it is not sliced twice.
    """
    dense = ledger_totals(parameter_ledger(model))
    rows = [{"slice": 0.0, "layout": "dense", **dense}]
    for fraction in fractions:
        tied = (reuse or {}).get(fraction)
        if tied is None:
            tied = copy.deepcopy(model)
            rotate_and_slice(
                tied, calib_ids, constant_dims(ModelShape.from_config(tied.config), fraction), progress=False
            )
        untied = untie_sliced(copy.deepcopy(tied))
        for layout, sliced in (("untied", untied), ("tied", tied)):
            rows.append({"slice": fraction, "layout": layout, **ledger_totals(parameter_ledger(sliced))})
    table = pd.DataFrame(rows)
    table["removed"] = [f"{compression(n, dense['total']):+.1%}" for n in table["total"]]
    return table
