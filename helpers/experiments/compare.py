"""Every compression method at matched parameter counts, before and after recovery fine-tuning (notebook 05).

At each SP of `Settings.recover_sps`, every method removes about as many parameters as
constant slicing at that SP does: n = round(parameters slicing removes / parameters of one
layer) layers for ShortGPT and LLM-Streamline; the hybrid (the dynamic-slicing paper's future
work) removes the k = n // 2 layers with the lowest Block Influence, then slices the rest
dynamically by their recomputed LR at the slice fraction that brings the whole model to the
target (`allocation.layer_allocation`, the one size matching of every slicing row). Each variant
is built from a fresh copy of the `Lab`'s dense model and measured by `Lab.measure` (the sweep's
windows and questions, so that every row pairs with every other); constant and dynamic slicing
before recovery are the sweep's own cells. Then each variant gets the same recovery
(`recovery.recover`: LoRA on the same linear layers, the same rank, data and token budget) and
is measured again. LLM-Streamline's trained replacement gets that token budget and data too,
so that replacement and LoRA compare at equal cost. Every measurement is one cached cell;
each architecture is saved once for the speed step (`variant_folder`).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from helpers.analysis.block_scores import BlockScores, cached_block_scores
from helpers.analysis.redundancy import layer_redundancy
from helpers.compression.allocation import ModelShape, budget, dense_param_count, layer_allocation
from helpers.compression.checkpoints import load_model, save_pruned
from helpers.compression.depth import parameter_count, remove_layers
from helpers.compression.recovery import RecoverySettings, recover, recovery_data
from helpers.compression.replacement import prune_model
from helpers.compression.sliced_io import save_sliced
from helpers.compression.slicing import rotate_and_slice
from helpers.experiments.cells import Lab, cell_params, cell_result, speed_folder
from helpers.experiments.presets import Settings
from helpers.experiments.results import CellCache
from helpers.infra.integrity import code_fingerprint, imported_code
from helpers.infra.memory import peak_memory_mb, reset_peak_memory
from helpers.infra.progress import progress_bar
from helpers.infra.storage import DATA_DIR, cache_key, slug
from helpers.models.adapters import get_adapter

DEPTH_TABLE = DATA_DIR / "runs" / "depth_comparison"  # where the CLI and notebook 05 write the table (CSV + Markdown)
REFERENCE = "dynamic slicing"  # every row's paired differences are against this method at the same SP and recovery
REPLACEMENT = "LLM-Streamline + replacement"  # recovered by its own trained block instead of LoRA
NONE, LORA, TRAINED = "none", "LoRA", "replacement"  # how a row was recovered
BATCH = 4  # windows per forward in block scores, LR and PCA


@dataclass
class Context:
    """What every variant at every SP is built from, beyond the `Lab`: block scores and the recovery windows."""

    scores: BlockScores
    recovery: RecoverySettings
    train_ids: torch.Tensor
    val_ids: torch.Tensor


def context(lab: Lab, progress: bool = False) -> Context:
    """Block scores on the lab's calibration windows, and the recovery text's windows (disjoint from evaluation):
    the first windows that fill the token budget train every method, LoRA and the replacement alike."""
    s = lab.settings
    scores = cached_block_scores(
        s.model, s.calib_text, s.seqlen, s.calib_windows, BATCH, progress, model=lab.model, tokenizer=lab.tokenizer
    )
    recovery = s.recovery()
    train_ids, val_ids = recovery_data(lab.tokenizer, recovery)
    budget_windows = recovery.planned_steps * recovery.batch_size  # one epoch of exactly the budget, every method
    return Context(scores, recovery, train_ids[:budget_windows], val_ids)


def plan(model: nn.Module, sp: float) -> dict:
    """How many layers depth pruning removes (n) and the hybrid removes (k) to match constant slicing at `sp`."""
    shape = ModelShape.from_config(model.config)
    dense = dense_param_count(shape)["total"]
    target = budget(shape, sp)
    per_layer = parameter_count(get_adapter(model).layers(model)[0])
    n = max(1, round((dense - target) / per_layer))
    return dict(dense_params=dense, target_params=target, layer_params=per_layer, n=n, hybrid_k=max(1, n // 2))


Builder = Callable[[Lab, Context, float, float], tuple[nn.Module, dict]]


def _slicing_info(lab: Lab, sp: float, sb: float) -> dict:
    alloc = lab.allocation(sp, sb)
    return dict(dims=[int(d) for d in alloc.kept_dim], slice_fraction=alloc.sp, sb=sb)


def _constant(lab: Lab, ctx: Context, sp: float, sb: float) -> tuple[nn.Module, dict]:
    return lab.sliced(sp, sp), _slicing_info(lab, sp, sp)


def _dynamic(lab: Lab, ctx: Context, sp: float, sb: float) -> tuple[nn.Module, dict]:
    return lab.sliced(sp, sb), _slicing_info(lab, sp, sb)


def _depth(method: str) -> Builder:
    def build(lab: Lab, ctx: Context, sp: float, sb: float) -> tuple[nn.Module, dict]:
        model, info, _ = prune_model(lab.dense_copy(), ctx.scores, method, plan(lab.model, sp)["n"])
        return model, info

    return build


def _replacement(lab: Lab, ctx: Context, sp: float, sb: float) -> tuple[nn.Module, dict]:
    """LLM-Streamline with its trained FFN replacement, trained on the recovery windows for the recovery budget."""
    r = ctx.recovery
    device = next(lab.model.parameters()).device
    reset_peak_memory(device)
    start = time.perf_counter()
    model, info, history = prune_model(
        lab.dense_copy(),
        ctx.scores,
        "streamline",
        plan(lab.model, sp)["n"],
        "ffn",
        ctx.train_ids,
        ctx.val_ids,
        max_steps=r.planned_steps,
        batch_size=r.batch_size,
        seed=r.seed,
        progress=False,
    )
    steps = int(history["step"][-1]) if history["step"] else 0
    training = dict(
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(device),
        steps=steps,
        tokens=steps * r.batch_size * r.seqlen,
        trainable=int(sum(p.numel() for p in get_adapter(model).layers(model)[info["removed"][0]].parameters())),
    )
    return model, {**info, "training": training}


def _hybrid(lab: Lab, ctx: Context, sp: float, sb: float) -> tuple[nn.Module, dict]:
    """ShortGPT removes k layers, then dynamic slicing on the LR of the layers that remain, at the SP that brings
    the whole model to the planned count."""
    chosen = plan(lab.model, sp)
    removed = ctx.scores.choose("shortgpt", chosen["hybrid_k"])
    model = remove_layers(lab.dense_copy(), removed)
    lr = layer_redundancy(model, lab.calib, BATCH, progress=False)["lr"].to_numpy()
    alloc = layer_allocation(lr, sp, sb, ModelShape.from_config(model.config), target=chosen["target_params"])
    dims = [int(d) for d in alloc.kept_dim]
    rotate_and_slice(model, lab.calib, dims, batch_size=BATCH, progress=False)
    return model, dict(removed=removed, dims=dims, slice_fraction=alloc.sp)


METHODS: dict[str, Builder] = {  # the order of the table's rows
    "constant slicing": _constant,
    REFERENCE: _dynamic,
    "ShortGPT": _depth("shortgpt"),
    "LLM-Streamline": _depth("streamline"),
    "hybrid: ShortGPT + dynamic slicing": _hybrid,
}
SLICING = ("constant slicing", REFERENCE)  # their unrecovered rows are the sweep's cells
VARIANTS = (*METHODS, REPLACEMENT)


def build_variant(name: str, lab: Lab, ctx: Context, sp: float, sb: float) -> tuple[nn.Module, dict]:
    """A compressed copy of the lab's dense model for variant `name` (one of VARIANTS) at `sp`, and what was done."""
    builders = {**METHODS, REPLACEMENT: _replacement}
    if name not in builders:
        raise ValueError(f"Unknown variant {name!r}; use one of {', '.join(VARIANTS)}.")
    torch.manual_seed(lab.settings.seed)
    return builders[name](lab, ctx, sp, sb)


def _sweep_sb(name: str, sp: float, sb: float) -> float:
    return sp if name == "constant slicing" else sb


def variant_folder(settings: Settings, name: str, sp: float, sb: float) -> Path:
    """Where one architecture is saved for recovery and the speed step (slicing rows: the sweep's folder)."""
    if name in SLICING:
        return speed_folder(settings, sp, _sweep_sb(name, sp, sb))
    key = cache_key(**cell_params(settings, variant=name, sp=sp, sb=sb))
    return DATA_DIR / "pruned" / "reproduce" / f"{slug(settings.model)}-{slug(name)}-{key}"


def _saved(folder: Path) -> bool:
    return (folder / "slicing.json").exists() or (folder / "pruning.json").exists()


def _public(info: dict) -> dict:
    """What a builder did, without what training cost (a cell keeps that apart, as `training`)."""
    return {k: v for k, v in info.items() if k != "training"}


def _save(model: nn.Module, tokenizer, folder: Path, info: dict) -> None:
    if _saved(folder):
        return
    if "dims" in info:  # sliced (the hybrid too: its layers were removed first)
        save_sliced(model, tokenizer, folder)
    else:
        save_pruned(model, tokenizer, folder, _public(info))


def _load_or_build(lab: Lab, ctx: Context, name: str, sp: float, sb: float) -> tuple[nn.Module, dict]:
    """The variant's model, saved for the speed step; a slicing row is read back from the folder the sweep saved."""
    folder = variant_folder(lab.settings, name, sp, sb)
    if name in SLICING and _saved(folder):
        model, _ = load_model(str(folder), device="cpu")
        return model, _slicing_info(lab, sp, _sweep_sb(name, sp, sb))
    model, info = build_variant(name, lab, ctx, sp, sb)
    _save(model, lab.tokenizer, folder, info)
    return model, info


class _Variant:
    """One variant's model, built (or read back) on first use, so its unrecovered and recovered cells share it."""

    def __init__(self, lab: Lab, ctx: Context, name: str, sp: float, sb: float) -> None:
        self.lab, self.ctx, self.name, self.sp, self.sb = lab, ctx, name, sp, sb
        self.built: tuple[nn.Module, dict] | None = None

    def get(self) -> tuple[nn.Module, dict]:
        if self.built is None:
            self.built = _load_or_build(self.lab, self.ctx, self.name, self.sp, self.sb)
        return self.built

    def measured(self) -> dict:
        """Measure the variant as built; a trained replacement's cost goes with the cell as recovery's does."""
        model, info = self.get()
        return dict(self.lab.measure(model, select=False), info=_public(info), training=info.get("training"))

    def recovered(self) -> dict:
        """Recover the variant in place with the shared recipe, then measure it; training's cost goes with it."""
        model, info = self.get()
        ctx = self.ctx
        model, report = recover(
            model, self.lab.tokenizer, ctx.recovery, ctx.train_ids, ctx.val_ids, progress=False, teacher=self.lab.model
        )
        keep = ("steps", "tokens", "best_step", "val_loss_before", "val_loss_after", "seconds", "peak_memory_mb")
        training = {k: getattr(report, k) for k in keep} | {"trainable": report.trainable}
        return dict(self.lab.measure(model, select=False), info=_public(info), training=training)


def grid(lab: Lab, sbs: dict[float, float], progress: bool = True) -> dict[tuple[str, float, str], dict]:
    """Every variant at every SP of `recover_sps`, before and after recovery: {(name, SP, recovery): cell}.

    `sbs` gives dynamic slicing's base slice at each SP (the sweep's choice). Cells are cached; a model
    built for an unrecovered cell is recovered in the same pass (recovery changes it in place, after measuring).
    """
    s = lab.settings
    cache, sweep_cache = CellCache("depth_compare"), CellCache("sweep")
    code = code_fingerprint(*imported_code(__name__, leaves=(Settings.__module__,)))
    ctx = context(lab, progress)
    recipe = asdict(ctx.recovery)
    cells: dict[tuple[str, float, str], dict] = {}
    jobs = [(name, sp) for sp in s.recover_sps for name in VARIANTS]
    for name, sp in progress_bar(jobs, desc="methods x SP", unit="variant", disable=not progress):
        sb = sbs[sp]
        key = dict(cell_params(s, variant=name, sp=sp, sb=sb), code=code, plan=plan(lab.model, sp), recovery=recipe)
        variant = _Variant(lab, ctx, name, sp, sb)
        if name in SLICING:  # the sweep's cell: the same model, windows and questions
            cells[name, sp, NONE] = dict(cell_result(lab, sweep_cache, sp, _sweep_sb(name, sp, sb)), info={})
        elif name == REPLACEMENT:
            cells[name, sp, TRAINED] = cache.get_or_compute(key, variant.measured)
        else:
            cells[name, sp, NONE] = cache.get_or_compute(dict(key, recovery=None), variant.measured)
        if name != REPLACEMENT:
            cells[name, sp, LORA] = cache.get_or_compute(dict(key, recovered=LORA), variant.recovered)
        del variant
        gc.collect()
    return cells


def ensure_saved(lab: Lab, sbs: dict[float, float]) -> dict[str, Path]:
    """Every architecture of the grid, by label, saved for the speed step (recovery keeps the architecture);
    a folder that is missing (its cells came from the cache) is built again."""
    s, ctx, out = lab.settings, None, {}
    for sp in s.recover_sps:
        for name in VARIANTS:
            folder = variant_folder(s, name, sp, sbs[sp])
            if not _saved(folder):
                ctx = ctx or context(lab)
                _load_or_build(lab, ctx, name, sp, sbs[sp])
            out[f"{name} SP={sp:g}"] = folder
    return out
