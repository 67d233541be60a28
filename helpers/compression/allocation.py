"""From Layer Redundancy to per-layer slice fractions (SP, SB), kept dimensions and parameter counts.

docs/method.md section 2: SLR_i = (SP - SB) * n_i / mean(n), FS_i = SB + SLR_i, where n is
the min-max normalised LR score. Unlike the reference code, every FS_i stays inside
[0, FS_max] while the mean stays exactly SP (what clipping removes is spread over the
layers that still have room, keeping the order by LR), and the kept dimensions are
rounded to a multiple so that the realised mean slice is as close to SP as possible.
Pure NumPy: no model is needed. The parameter formulas take each family's per-layer
shape from its adapter (one shape for the allocation and for the real sliced model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from transformers import AutoConfig

from helpers.analysis.redundancy import normalise
from helpers.models.adapters import get_adapter
from helpers.models.adapters.base import LayerShape
from helpers.models.loading import resolve_model

DEFAULT_FS_MAX = 0.95
DEFAULT_MULTIPLE = 8


def _frozen(values: Any) -> np.ndarray:
    arr = np.array(values, dtype=np.float64)
    arr.flags.writeable = False
    return arr


def normalised_scores(lr: np.ndarray) -> np.ndarray:
    """Min-max normalised LR (1 = most redundant) with errors that say what to do."""
    lr = np.asarray(lr, dtype=np.float64)
    if lr.ndim != 1 or lr.size < 2:
        raise ValueError(f"Need a 1-D vector of at least 2 LR scores (one per layer), got shape {lr.shape}.")
    if not np.all(np.isfinite(lr)):
        bad = np.flatnonzero(~np.isfinite(lr)).tolist()
        raise ValueError(f"LR scores of layers {bad} are NaN or inf; recompute LR (helpers lr) on valid text.")
    if lr.max() == lr.min():
        raise ValueError(
            f"All {lr.size} LR scores equal {lr[0]:.6g}, so the normalised score is undefined and dynamic "
            "slicing has nothing to rank by. Recompute LR on more calibration text, or use constant slicing "
            "(SB = SP) with kept_dims(np.full(n_layers, SP), hidden_size)."
        )
    return normalise(lr)


def check_request(sp: float, sb: float, fs_max: float = DEFAULT_FS_MAX) -> None:
    """Raise ValueError unless 0 <= SB <= SP < FS_max <= 1 (all finite)."""
    for name, value in (("SP", sp), ("SB", sb), ("FS_max", fs_max)):
        if not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if not 0 < fs_max <= 1:
        raise ValueError(f"FS_max must be in (0, 1], got {fs_max}; 0.95 keeps at least 5% of every layer.")
    if not 0 <= sp < fs_max:
        raise ValueError(f"SP (mean slice) must be in [0, FS_max={fs_max}), got {sp}; e.g. SP=0.3 removes 30%.")
    if not 0 <= sb <= sp:
        raise ValueError(f"SB (base slice) must be in [0, SP={sp}], got {sb}; SB = SP is constant slicing.")


def slice_fractions(lr_norm: np.ndarray, sp: float, sb: float, fs_max: float = DEFAULT_FS_MAX) -> np.ndarray:
    """FS_i = SB + c * n_i with c chosen so that mean(FS) = SP exactly and every FS_i <= FS_max.

    Without clipping c = (SP - SB) / mean(n) (the paper's formula). When some layers would
    exceed FS_max they are set to FS_max and c is solved again on the others (water filling),
    so the order by n is kept and the mean is still SP. Raises ValueError when no c can reach SP.
    """
    check_request(sp, sb, fs_max)
    n = np.asarray(lr_norm, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or not np.all(np.isfinite(n)) or n.min() < 0 or n.max() > 1:
        raise ValueError("Normalised LR scores must be a non-empty 1-D vector in [0, 1]; use normalised_scores(lr).")
    n_layers = n.size
    if sp == sb:
        return np.full(n_layers, float(sp))
    positive = n > 0
    reachable = (fs_max * positive.sum() + sb * (~positive).sum()) / n_layers
    if not positive.any() or sp > reachable:
        raise ValueError(
            f"SP={sp} is out of reach: with SB={sb} and FS_max={fs_max} the mean slice can be at most "
            f"{reachable:.4f} for these scores ({(~positive).sum()} of {n_layers} layers have score 0 and stay "
            "at SB). Lower SP, raise SB, or raise FS_max."
        )
    order = np.argsort(-n, kind="stable")  # most redundant first
    total = n_layers * sp
    for k in range(n_layers):  # k layers (the k most redundant) clipped at FS_max
        rest = order[k:]
        scale = (total - k * fs_max - rest.size * sb) / n[rest].sum()
        if sb + scale * n[order[k]] <= fs_max * (1 + 1e-12):  # tolerance: SP exactly at the reachable limit
            fs = np.minimum(sb + scale * n, fs_max)
            fs[order[:k]] = fs_max
            return fs
    raise AssertionError("unreachable: feasibility was checked above")


def kept_dims(fs: np.ndarray, hidden_size: int, multiple: int = DEFAULT_MULTIPLE) -> np.ndarray:
    """Kept dimension per layer: a multiple of `multiple` in [multiple, d] (or d itself).

    Each layer rounds its exact target (1 - FS_i) * d down or up; the layers with the largest
    remainders round up, as many as bring the total (hence the realised mean slice) closest
    to the exact total. Layers with equal FS may therefore differ by one multiple, except when
    every FS is equal: that is constant slicing, and it rounds every layer down exactly as
    SliceGPT does, so that SB = SP reproduces SliceGPT.
    """
    fs = np.asarray(fs, dtype=np.float64)
    if not isinstance(hidden_size, (int, np.integer)) or hidden_size < 1:
        raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}.")
    if not isinstance(multiple, (int, np.integer)) or not 1 <= multiple <= hidden_size:
        raise ValueError(f"multiple must be an integer in [1, hidden_size={hidden_size}], got {multiple!r}.")
    if fs.ndim != 1 or not np.all(np.isfinite(fs)) or fs.min() < 0 or fs.max() > 1:
        raise ValueError("Slice fractions must be a 1-D vector in [0, 1].")
    exact = (1.0 - fs) * hidden_size
    low = np.clip(np.floor(exact / multiple + 1e-9) * multiple, multiple, hidden_size)
    if np.all(fs == fs[0]):
        return low.astype(np.int64)
    high = np.clip(np.ceil(exact / multiple) * multiple, multiple, hidden_size)
    high = np.maximum(high, low)
    step = high - low
    remainder = np.divide(exact - low, step, out=np.zeros_like(exact), where=step > 0)
    gap = exact.sum() - low.sum()  # how much rounding up should add in total
    kept = low.copy()
    added = 0.0
    for i in np.lexsort((fs, -remainder)):  # largest remainder first; on ties the smaller slice
        if step[i] > 0 and abs(gap - added - step[i]) < abs(gap - added):
            kept[i] = high[i]
            added += step[i]
    return kept.astype(np.int64)


@dataclass(frozen=True)
class ModelShape:
    """What a model's parameter count depends on; the per-layer formula comes from its family's adapter."""

    vocab_size: int
    hidden_size: int
    n_layers: int
    tied_embeddings: bool
    layer: LayerShape
    position_rows: int = 0  # learned position tables (OPT)
    final_norm: int = 0  # parameters of the final norm
    family: str = ""

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the shape from a Hugging Face config of a supported family (no weights needed)."""
        adapter = get_adapter(config)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            n_layers=config.num_hidden_layers,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            layer=adapter.layer_shape(config),
            position_rows=adapter.position_rows(config),
            final_norm=adapter.final_norm_params(config),
            family=adapter.family,
        )

    @classmethod
    def from_pretrained(cls, name: str) -> ModelShape:
        """Shape of a model by short name, folder or hub id, reading only its config.json."""
        return cls.from_config(AutoConfig.from_pretrained(resolve_model(name)))


def _with_total(parts: dict[str, int]) -> dict[str, int]:
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def dense_param_count(shape: ModelShape) -> dict[str, int]:
    """Parameters of the model as shipped, by part: embeddings, head, attention, mlp, shortcuts, norms, total."""
    d, s, ly = shape.hidden_size, shape, shape.layer
    attention = d * (ly.attention_reads + ly.attention_writes) + ly.attention_writer_bias * d + ly.attention_fixed
    mlp = d * (ly.mlp_reads + ly.mlp_writes) + ly.mlp_writer_bias * d + ly.mlp_fixed
    return _with_total(
        {
            "embeddings": (s.vocab_size + s.position_rows) * d,
            "head": 0 if s.tied_embeddings else s.vocab_size * d,
            "attention": s.n_layers * attention,
            "mlp": s.n_layers * mlp,
            "shortcuts": 0,
            "post_norm_maps": 0,
            "norms": s.n_layers * ly.norms * d * (1 + ly.norm_bias) + s.final_norm,
        }
    )


def sliced_param_count(
    shape: ModelShape, dims: np.ndarray, tied: bool | None = None, final_dim: int | None = None
) -> dict[str, int]:
    """Parameters of the model sliced to kept dimensions `dims` (one per layer), same parts as dense.

    Tied layout (tied=None follows the shape): the shared V x d table plus a d x d_0 input map
    count as embeddings, the final norm's d-vector scale as head. Untied: V x d_0 embeddings, V x d head
    (plus a V bias when a LayerNorm's bias was folded into it). Post-norm blocks keep their
    output projections at width d and add a d x d_i and a d x d_{i+1} map. A sliced last residual
    (`final_dim` < d) gives the head its own V x final_dim matrix in either layout.
    """
    s, d, ly = shape, shape.hidden_size, shape.layer
    final = d if final_dim is None else int(final_dim)
    if not 1 <= final <= d:
        raise ValueError(f"final_dim must be in [1, {d}], got {final_dim}.")
    dims = np.asarray(dims)
    if dims.shape != (s.n_layers,) or not np.issubdtype(dims.dtype, np.integer) or dims.min() < 1 or dims.max() > d:
        raise ValueError(f"dims must be {s.n_layers} integers in [1, {d}] (one per layer), got {dims!r}.")
    tied = s.tied_embeddings if tied is None else tied
    dims_in = dims.astype(np.int64)
    dims_out = np.append(dims_in[1:], final)  # the last layer's MLP writes what the head reads
    # what the writers write into: the sliced basis, or full d followed by a map in post-norm blocks
    full = np.full(s.n_layers, d)
    written_attn, written_mlp = (full, full) if ly.post_norms else (dims_in, dims_out)
    attention = ly.attention_reads * dims_in.sum()
    attention += (ly.attention_writes + ly.attention_writer_bias) * written_attn.sum()
    mlp = ly.mlp_reads * dims_in.sum() + (ly.mlp_writes + ly.mlp_writer_bias) * written_mlp.sum()
    attention, mlp = attention + s.n_layers * ly.attention_fixed, mlp + s.n_layers * ly.mlp_fixed
    if tied:
        embeddings, head = s.vocab_size * d + d * dims_in[0], d
    else:
        embeddings, head = s.vocab_size * dims_in[0], s.vocab_size * (d + ly.norm_bias)
    if final < d:  # the head's own V x final_dim matrix replaces the tied scale or the V x d head
        head = s.vocab_size * (final + (0 if tied else ly.norm_bias))
    return _with_total(
        {
            "embeddings": embeddings + s.position_rows * dims_in[0],
            "head": head,
            "attention": attention,
            "mlp": mlp,
            "shortcuts": (dims_in * dims_in).sum() + (dims_in * dims_out).sum(),
            "post_norm_maps": ly.post_norms * d * (dims_in.sum() + dims_out.sum()),
            "norms": 0,
        }
    )


def param_summary(shape: ModelShape, dims: np.ndarray, tied: bool | None = None) -> dict[str, float]:
    """Dense vs sliced totals and the fraction removed, overall and without embeddings and head."""
    dense, sliced = dense_param_count(shape), sliced_param_count(shape, dims, tied)

    def body(parts: dict[str, int]) -> int:
        return parts["total"] - parts["embeddings"] - parts["head"]

    return {
        "dense": dense["total"],
        "sliced": sliced["total"],
        "removed_fraction": 1 - sliced["total"] / dense["total"],
        "dense_body": body(dense),
        "sliced_body": body(sliced),
        "removed_fraction_body": 1 - body(sliced) / body(dense),
        "embeddings_and_head_dense": dense["embeddings"] + dense["head"],
        "embeddings_and_head_sliced": sliced["embeddings"] + sliced["head"],
    }


@dataclass(frozen=True)
class Allocation:
    """One (SP, SB) allocation: scores, per-layer fractions before rounding, and kept dimensions."""

    lr: np.ndarray  # raw LR scores
    lr_norm: np.ndarray  # min-max normalised, 1 = most redundant
    slr: np.ndarray  # slice from redundancy, FS - SB (after clipping)
    fs: np.ndarray  # final slice fraction, mean exactly SP
    kept_dim: np.ndarray  # integer kept dimension per layer
    sp: float
    sb: float
    hidden_size: int
    fs_max: float = DEFAULT_FS_MAX
    multiple: int = DEFAULT_MULTIPLE
    n_clipped: int = field(default=0)  # layers held at FS_max

    @property
    def realised_fs(self) -> np.ndarray:
        """Slice fraction each layer actually gets after rounding: 1 - kept_dim / d."""
        return 1.0 - self.kept_dim / self.hidden_size

    @property
    def realised_mean(self) -> float:
        """Mean realised slice fraction (report this, not the requested SP)."""
        return float(1.0 - self.kept_dim.mean() / self.hidden_size)


def allocate(
    lr: np.ndarray,
    sp: float,
    sb: float,
    hidden_size: int,
    fs_max: float = DEFAULT_FS_MAX,
    multiple: int = DEFAULT_MULTIPLE,
) -> Allocation:
    """Allocate slice fractions and kept dimensions from raw LR scores (normalised here)."""
    lr = np.asarray(lr, dtype=np.float64)
    lr_norm = normalised_scores(lr)
    fs = slice_fractions(lr_norm, sp, sb, fs_max)
    kept = kept_dims(fs, hidden_size, multiple)
    kept.flags.writeable = False
    return Allocation(
        lr=_frozen(lr),
        lr_norm=_frozen(lr_norm),
        slr=_frozen(fs - sb),
        fs=_frozen(fs),
        kept_dim=kept,
        sp=float(sp),
        sb=float(sb),
        hidden_size=int(hidden_size),
        fs_max=float(fs_max),
        multiple=int(multiple),
        n_clipped=int(np.sum(np.isclose(fs, fs_max)) if sp > sb else 0),
    )


def allocation_table(alloc: Allocation) -> pd.DataFrame:
    """The allocation as a table: layer, lr_norm, slr, fs, kept_dim."""
    return pd.DataFrame(
        {
            "layer": np.arange(alloc.fs.size),
            "lr_norm": alloc.lr_norm,
            "slr": alloc.slr,
            "fs": alloc.fs,
            "kept_dim": alloc.kept_dim,
        }
    )


def savings_table(lr: np.ndarray, sps: list[float], sb: float, shape: ModelShape) -> pd.DataFrame:
    """One row per SP (SB capped at SP): realised mean slice and what the sliced model's parameter count saves."""
    rows = []
    for sp in sps:
        alloc = allocate(lr, sp, min(sb, sp), shape.hidden_size)
        counts = param_summary(shape, alloc.kept_dim)
        rows.append(
            {
                "SP": sp,
                "realised mean slice": round(alloc.realised_mean, 4),
                "parameters": counts["sliced"],
                "removed (all)": f"{counts['removed_fraction']:.1%}",
                "removed (layers only)": f"{counts['removed_fraction_body']:.1%}",
            }
        )
    return pd.DataFrame(rows)


def read_lr_csv(path: str) -> np.ndarray:
    """LR scores from a CSV written by `helpers lr` (column `lr`, ordered by `layer`)."""
    try:
        table = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not an LR table ({' '.join(str(err).split())}); write one with: "
            f"python -m helpers lr --out {path}"
        ) from None
    if "lr" not in table.columns:
        raise ValueError(f"{path} has no 'lr' column; write one with: python -m helpers lr --out {path}")
    if "layer" in table.columns:
        table = table.sort_values("layer")
    lr = pd.to_numeric(table["lr"], errors="coerce").to_numpy(dtype=np.float64)
    if lr.size == 0 or not np.all(np.isfinite(lr)):
        raise ValueError(f"{path}: column 'lr' is empty or has non-numeric, NaN or infinite values; recompute it.")
    return lr


def params(shape: ModelShape, dims: np.ndarray) -> int:
    """Parameter count of the model sliced to `dims` (`sliced_param_count`'s total)."""
    return int(sliced_param_count(shape, np.asarray(dims, dtype=np.int64))["total"])


def constant_dims(shape: ModelShape, sp: float, multiple: int = DEFAULT_MULTIPLE) -> np.ndarray:
    """SliceGPT's constant slicing: every layer keeps (1 - SP) d rounded down to a multiple."""
    if not 0 <= sp < 1:
        raise ValueError(f"SP must be in [0, 1), got {sp}.")
    return kept_dims(np.full(shape.n_layers, float(sp)), shape.hidden_size, multiple)


def budget(shape: ModelShape, sp: float, multiple: int = DEFAULT_MULTIPLE) -> int:
    """The parameter count a matched allocation holds at `sp`: constant slicing's realised count."""
    return params(shape, constant_dims(shape, sp, multiple))


def rounding_step(shape: ModelShape, dims: np.ndarray, multiple: int = DEFAULT_MULTIPLE) -> int:
    """The largest change in parameter count from moving one layer's kept dimension by one multiple."""
    dims = np.asarray(dims, dtype=np.int64)
    base, steps = params(shape, dims), []
    for i in range(dims.size):
        for delta in (-multiple, multiple):
            moved = dims.copy()
            moved[i] += delta
            if multiple <= moved[i] <= shape.hidden_size:
                steps.append(abs(params(shape, moved) - base))
    return max(steps)


def matched_sp(
    lr: np.ndarray,
    target_params: int,
    sb: float,
    shape: ModelShape,
    fs_max: float = DEFAULT_FS_MAX,
    multiple: int = DEFAULT_MULTIPLE,
    rel_tol: float = 1e-3,
) -> float:
    """The SP whose (SP, SB) allocation has the parameter count nearest `target_params` (matched-size rows).

    Constant slicing rounds every layer down and so removes more than SP asks; the dynamic row that
    it is compared with is sliced at this SP instead of the nominal one, so both hold the same count
    (within `rel_tol`, or within one rounding step where a small model's step is coarser than that).
    """
    lr = np.asarray(lr, dtype=np.float64)

    def dims(sp: float) -> np.ndarray:
        return allocate(lr, sp, sb, shape.hidden_size, fs_max, multiple).kept_dim

    def gap(sp: float) -> float:
        try:
            return params(shape, dims(sp)) - int(target_params)
        except ValueError:  # SP out of reach for these scores: count it as slicing too much
            return -np.inf

    low, high = sb + 1e-9, fs_max - 1e-9  # the count falls as SP grows: bisect on its sign
    if gap(low) < 0 or gap(high) > 0:
        raise ValueError(f"No SP in ({sb}, {fs_max}) reaches {target_params} parameters with SB={sb}.")
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if gap(mid) > 0 else (low, mid)
    best = min((low, high), key=lambda sp: abs(gap(sp)))
    if abs(gap(best)) > max(rel_tol * target_params, rounding_step(shape, dims(best), multiple)):
        raise ValueError(f"No reachable SP with SB={sb} comes within {rel_tol:.1%} of {target_params} parameters.")
    return best


SIZES = ("matched", "nominal")  # the two size conventions of `layer_allocation`


def layer_allocation(
    scores: np.ndarray,
    sp: float,
    sb: float,
    shape: ModelShape,
    size: str = "matched",
    target: int | None = None,
    fs_max: float = DEFAULT_FS_MAX,
    multiple: int = DEFAULT_MULTIPLE,
) -> Allocation:
    """The one way from per-layer scores (higher = slice more) to kept dimensions: the SP/SB formula at a size.

    "matched" (every command's default and the gallery's) slices at the SP whose parameter count equals
    `target`, by default constant slicing's count at `sp` (which rounds every layer down, so it removes more
    than SP asks): dynamic and constant rows then hold the same count. SB = SP is constant slicing, its own
    budget. "nominal" slices at `sp` itself: the realised mean slice is as close to SP as the rounding allows.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}.")
    if size == "nominal" or (target is None and np.isclose(sb, sp)):
        return allocate(scores, sp, sb, shape.hidden_size, fs_max, multiple)
    target = budget(shape, sp, multiple) if target is None else target
    matched = matched_sp(scores, target, sb, shape, fs_max, multiple)
    return allocate(scores, matched, sb, shape.hidden_size, fs_max, multiple)
