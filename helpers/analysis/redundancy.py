"""Layer Redundancy (LR): mean token cosine between each decoder layer's input and output.

LR_i = mean over calibration tokens t of cos(x_i[t], x_{i+1}[t]); ShortGPT's
Block Influence is BI_i = 1 - LR_i; the normalised score min-max scales LR to
[0, 1] (1 = most redundant). See docs/method.md section 1 (BOS positions are left out).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import AutoConfig

from helpers.analysis import capture
from helpers.analysis.capture import LayerStatistic, stream_statistics
from helpers.infra.integrity import code_fingerprint, discard, sha256_text, weights_fingerprint
from helpers.infra.storage import CACHE_DIR, cache_key, slug, write_csv_atomic
from helpers.infra.textdata import load_text, token_windows
from helpers.models.adapters import get_adapter
from helpers.models.loading import load_dense, resolve_model

NAN_COSINE = 0.5  # the reference code counts a NaN cosine (a zero vector) as 0.5


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine along the last dim in float32, O(tokens x d); 0.5 where a vector is zero."""
    a, b = a.float(), b.float()
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cos = dot / norms
    return torch.where(norms > 0, cos, torch.full_like(cos, NAN_COSINE))


class TokenCosineSum(LayerStatistic):
    """Running sum and count of cos(x_in, x_out) over unmasked tokens, per layer."""

    def __init__(self, n_layers: int) -> None:
        self.sums = torch.zeros(n_layers, dtype=torch.float64)
        self.counts = torch.zeros(n_layers, dtype=torch.long)

    def update(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        cos = token_cosine(x_in, x_out)[mask]
        self.sums[layer] += cos.sum(dtype=torch.float64).cpu()
        self.counts[layer] += cos.numel()

    def mean(self) -> np.ndarray:
        return (self.sums / self.counts.clamp(min=1)).numpy()


def normalise(lr: np.ndarray) -> np.ndarray:
    """Min-max scale LR to [0, 1]; an error when the scores are constant or not finite."""
    lr = np.asarray(lr, dtype=np.float64)
    if not np.all(np.isfinite(lr)):
        raise ValueError("LR scores contain NaN or inf; recompute them on valid text.")
    spread = lr.max() - lr.min()
    if spread <= 0:
        raise ValueError("All LR scores are equal, so the normalised score is undefined.")
    return (lr - lr.min()) / spread


def lr_table(lr: np.ndarray) -> pd.DataFrame:
    """The LR table: columns layer, lr, bi, lr_norm (layer counted from 0)."""
    lr = np.asarray(lr, dtype=np.float64)
    return pd.DataFrame({"layer": np.arange(len(lr)), "lr": lr, "bi": 1.0 - lr, "lr_norm": normalise(lr)})


def layer_redundancy(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Stream `input_ids` through the model and return the LR table."""
    stat = TokenCosineSum(len(get_adapter(model).layers(model)))
    stream_statistics(model, input_ids, [stat], batch_size, attention_mask, progress, desc="LR")
    return lr_table(stat.mean())


def lr_cache_path(model_name: str, text: str, seqlen: int, n_windows: int) -> Path:
    """Where the LR table for these settings is cached: keyed by text content, weights, settings and code."""
    key = cache_key(
        text=sha256_text(load_text(text)),
        weights=weights_fingerprint(resolve_model(model_name)),
        code=code_fingerprint(sys.modules[__name__], capture),
        seqlen=seqlen,
        windows=n_windows,
    )
    name = f"{slug(model_name)}__{slug(Path(text).stem if Path(text).suffix else text)}"
    return CACHE_DIR / "lr" / f"{name}__L{seqlen}__N{n_windows}__{key}.csv"


def read_lr_cache(path: Path, n_layers: int) -> pd.DataFrame | None:
    """A cached LR table if it is complete and finite with `n_layers` rows; a bad one is reported and removed."""
    try:
        table = pd.read_csv(path)
        if list(table.columns) != ["layer", "lr", "bi", "lr_norm"] or table["layer"].tolist() != list(range(n_layers)):
            raise ValueError(f"expected columns layer, lr, bi, lr_norm and {n_layers} layers")
        if not np.all(np.isfinite(table[["lr", "bi", "lr_norm"]].to_numpy(dtype=np.float64))):
            raise ValueError("non-finite values")
        return table
    except (OSError, ValueError, pd.errors.ParserError) as err:
        discard(path, str(err))
        return None


def cached_layer_redundancy(
    model_name: str,
    text: str,
    seqlen: int,
    n_windows: int,
    batch_size: int = 8,
    progress: bool = True,
    loaded: tuple[nn.Module, object] | None = None,
) -> pd.DataFrame:
    """LR table for (model, text, seqlen, windows), computed once and cached on disk atomically.

    Every read is validated (columns, layer count, finite values); a bad entry is
    removed and recomputed. Pass `loaded=(model, tokenizer)` to reuse a model
    already in memory (it must be `model_name`).
    """
    corpus = load_text(text)  # a bad text name fails before the model loads
    path = lr_cache_path(model_name, text, seqlen, n_windows)
    if path.exists():
        table = read_lr_cache(path, AutoConfig.from_pretrained(resolve_model(model_name)).num_hidden_layers)
        if table is not None:
            return table
    model, tokenizer = loaded or load_dense(model_name)
    ids = token_windows(tokenizer, corpus, seqlen, n_windows)
    table = layer_redundancy(model, ids, batch_size, progress=progress)
    write_csv_atomic(table, path)
    return table


def token_cosine_map(states: list[torch.Tensor]) -> np.ndarray:
    """cos(x_i[t], x_{i+1}[t]) for one window: an array (layers, tokens) from `collect_hidden_states` output."""
    return np.stack([token_cosine(states[i][0], states[i + 1][0]).numpy() for i in range(len(states) - 1)])


def state_norms(states: list[torch.Tensor]) -> pd.DataFrame:
    """Median and max token L2 norm of every residual state x_0..x_L (shows the huge-activation layers)."""
    norms = [s[0].norm(dim=-1) for s in states]
    return pd.DataFrame(
        {
            "state": np.arange(len(states)),
            "median": [n.median().item() for n in norms],
            "max": [n.max().item() for n in norms],
        }
    )
