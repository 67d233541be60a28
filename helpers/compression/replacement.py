"""LLM-Streamline's replacement: a small network trained to stand in for a removed block of layers.

The block l..l+n-1 maps x_l to x_{l+n}. `capture_block_pairs` writes those
(input, output) pairs for calibration windows to disk, one shard per batch,
so training streams them and never holds a corpus of hidden states in RAM.
`train_replacement` fits a feed-forward network, a SwiGLU block or one decoder
layer (a copy of a pruned one, run with the model's own causal mask and
rotary embeddings) with MSE, AdamW and early stopping on held-out windows,
and reports the identity map's MSE (skipping the block) on the same windows
as the baseline to beat. `streamline` puts the trained module into the model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from helpers.analysis.block_scores import BlockScores
from helpers.analysis.capture import layer_hooks
from helpers.compression.depth import remove_layers, renumber_layers
from helpers.infra.integrity import discard, tensor_fingerprint
from helpers.infra.progress import progress_bar
from helpers.infra.storage import CACHE_DIR, atomic_path, cache_key
from helpers.models.adapters import get_adapter
from helpers.models.hooks import layer_output
from helpers.models.pruned_layers import ReplacementBlock, build_replacement

KINDS = ("ffn", "swiglu", "layer")

REPLACEMENT_STEPS = 150  # training steps of a replacement block: the gallery's depth comparison


def _check_block(model: nn.Module, start: int, n: int) -> None:
    total = len(get_adapter(model).layers(model))
    if n < 1 or start < 0 or start + n > total:
        raise ValueError(f"Block start={start}, n={n} does not fit a model with {total} layers.")


def capture_block_pairs(
    model: nn.Module,
    input_ids: torch.Tensor,
    start: int,
    n: int,
    folder: str | Path,
    batch_size: int = 4,
    progress: bool = True,
) -> Path:
    """Write (x_start, x_{start+n}) for every window, one `torch.save` shard per batch, as one atomic folder."""
    _check_block(model, start, n)
    folder = Path(folder)
    if folder.exists():
        problem = _pairs_problem(folder, input_ids, batch_size, model.config.hidden_size)
        if problem is None:
            return folder
        discard(folder, problem)
    backbone = get_adapter(model).backbone(model)
    device = next(model.parameters()).device
    pair: dict[str, torch.Tensor] = {}

    def keep(index: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        if index == start:
            pair["x_in"] = x_in.detach().float().cpu()
        if index == start + n - 1:
            pair["x_out"] = x_out.detach().float().cpu()

    with atomic_path(folder, kind="block-pairs") as tmp:
        tmp.mkdir()
        with torch.inference_mode(), layer_hooks(model, keep):
            for k, first in enumerate(
                progress_bar(range(0, len(input_ids), batch_size), desc="block pairs", disable=not progress)
            ):
                backbone(input_ids=input_ids[first : first + batch_size].to(device), use_cache=False)
                torch.save(dict(pair), tmp / f"pairs_{k:05d}.pt")
                pair.clear()
    return folder


def _pairs_problem(folder: Path, input_ids: torch.Tensor, batch_size: int, hidden_size: int) -> str | None:
    """Why a cached shard folder cannot be used (wrong shard count, unreadable, wrong shape), or None."""
    shards = sorted(folder.glob("pairs_*.pt"))
    expected = math.ceil(len(input_ids) / batch_size)
    if len(shards) != expected:
        return f"{len(shards)} shards, expected {expected}"
    for k, shard in enumerate(shards):
        rows = min(batch_size, len(input_ids) - k * batch_size)
        shape = (rows, input_ids.shape[1], hidden_size)
        try:
            pair = torch.load(shard, mmap=True, weights_only=True)  # mapped: checks without reading the data
            if any(tuple(pair[key].shape) != shape for key in ("x_in", "x_out")):
                return f"{shard.name} does not hold two {shape} tensors"
        except Exception as err:  # any unreadable shard: recompute the folder
            return f"{shard.name}: {type(err).__name__}: {err}"
    return None


def iter_pairs(folder: str | Path) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream (x_in, x_out) batches from a shard folder, one shard in memory at a time."""
    shards = sorted(Path(folder).glob("pairs_*.pt"))
    if not shards:
        raise FileNotFoundError(f"No hidden-state shards in {folder}; run capture_block_pairs first.")
    for shard in shards:
        pair = torch.load(shard)
        yield pair["x_in"], pair["x_out"]


class _LayerRunner(nn.Module):
    """Calls a decoder layer on hidden states with the backbone's position embeddings and causal mask."""

    def __init__(self, layer: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.adapter = get_adapter(model)
        self.backbone = [self.adapter.backbone(model)]  # a list: not a submodule, so not trained or saved
        self.config = model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=x, attention_mask=None, past_key_values=None, position_ids=positions
        )
        rotary = self.adapter.position_embeddings(self.backbone[0], self.layer, x, positions)
        out = self.layer(x, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        return layer_output(out)


def _mse(module: nn.Module, folder: Path, device: torch.device) -> float:
    """Mean squared error of `module` (or of the identity map when None) over a shard folder."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x_in, x_out in iter_pairs(folder):
            x_in, x_out = x_in.to(device), x_out.to(device)
            pred = x_in if module is None else module(x_in)
            total += float((pred - x_out).pow(2).sum(dtype=torch.float64))
            count += x_out.numel()
    return total / count


def make_replacement(
    model: nn.Module, kind: str, start: int, n: int, hidden: int | None = None, init_from: int | None = None
) -> nn.Module:
    """An untrained replacement for block start..start+n-1: ffn/swiglu block, or a copy of one pruned layer."""
    if kind not in KINDS:
        raise ValueError(f"Unknown replacement {kind!r}; use one of {', '.join(KINDS)}.")
    _check_block(model, start, n)
    config = model.config
    if kind == "layer":
        source = start if init_from is None else init_from
        if not start <= source < start + n:
            raise ValueError(f"init_from={source} must be one of the pruned layers {start}..{start + n - 1}.")
        return copy.deepcopy(get_adapter(model).layers(model)[source])
    return build_replacement(
        kind, config.hidden_size, hidden or config.intermediate_size, dtype=next(model.parameters()).dtype
    )


def train_replacement(
    model: nn.Module,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    start: int,
    n: int,
    kind: str = "ffn",
    hidden: int | None = None,
    init_from: int | None = None,
    lr: float | None = None,
    max_steps: int = REPLACEMENT_STEPS,
    eval_every: int = 20,
    patience: int = 5,
    weight_decay: float = 0.0,
    batch_size: int = 4,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """Train a replacement for block start..start+n-1 on `train_ids`, early-stopped on `val_ids` windows.

    Returns (best module, history) with history keys step, train_loss,
    val_step, val_loss, identity_mse, best_val_mse, best_step, stopped_early.
    """
    if train_ids.ndim != 2 or val_ids.ndim != 2 or len(train_ids) == 0 or len(val_ids) == 0:
        raise ValueError("train_ids and val_ids must be non-empty (windows, seqlen) tensors.")
    if max_steps < 1 or eval_every < 1 or patience < 1:
        raise ValueError("max_steps, eval_every and patience must be at least 1.")
    module = make_replacement(model, kind, start, n, hidden, init_from)
    train_dir, val_dir = _cached_pairs(model, train_ids, val_ids, start, n, batch_size, cache_dir, progress)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    module.to(device).train()
    runner = _LayerRunner(module, model) if kind == "layer" else module
    module.requires_grad_(True)
    optimiser = torch.optim.AdamW(
        module.parameters(), lr=lr or (1e-4 if kind == "layer" else 1e-3), weight_decay=weight_decay
    )
    history = dict(step=[], train_loss=[], val_step=[], val_loss=[], kind=kind, start=start, n=n, stopped_early=False)
    history["identity_mse"] = _mse(None, val_dir, device)
    stopper = _EarlyStopping(module, runner, val_dir, device, history, patience)
    _fit(runner, optimiser, train_dir, device, stopper, max_steps, eval_every, progress)
    module.load_state_dict(stopper.best_state)
    module.eval().requires_grad_(False)
    history.update(best_val_mse=stopper.best_val, best_step=stopper.best_step)
    if not math.isfinite(stopper.best_val):
        raise RuntimeError("Replacement training diverged (validation MSE is not finite); lower the learning rate.")
    return module, history


def _cached_pairs(
    model: nn.Module,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    start: int,
    n: int,
    batch_size: int,
    cache_dir: str | Path | None,
    progress: bool,
) -> tuple[Path, Path]:
    """The training and validation (x_in, x_out) shard folders, under a key of model, block and windows."""
    key = cache_key(
        model=str(getattr(model, "name_or_path", "")),
        weights=tensor_fingerprint(model),
        start=start,
        n=n,
        train=train_ids.tolist(),
        val=val_ids.tolist(),
        batch=batch_size,
    )
    root = Path(cache_dir) if cache_dir else CACHE_DIR / "streamline" / key
    train_dir = capture_block_pairs(model, train_ids, start, n, root / "train", batch_size, progress)
    val_dir = capture_block_pairs(model, val_ids, start, n, root / "val", batch_size, progress)
    return train_dir, val_dir


class _EarlyStopping:
    """Validates on the held-out shards, keeps the best state, and stops after `patience` checks without gain."""

    def __init__(
        self, module: nn.Module, runner: nn.Module, val_dir: Path, device: torch.device, history: dict, patience: int
    ) -> None:
        self.module, self.runner, self.val_dir, self.device = module, runner, val_dir, device
        self.history, self.patience = history, patience
        self.best_val, self.best_step, self.best_state, self.waited = math.inf, 0, None, 0
        self.check(0)  # the untrained module is the first candidate

    def check(self, step: int) -> bool:
        """Validate at `step` and record it; True when training should stop."""
        self.module.eval()
        val = _mse(self.runner, self.val_dir, self.device)
        self.module.train()
        self.history["val_step"].append(step)
        self.history["val_loss"].append(val)
        if val < self.best_val or self.best_state is None:
            self.best_val, self.best_step, self.waited = val, step, 0
            self.best_state = copy.deepcopy(self.module.state_dict())
            return False
        self.waited += 1
        self.history["stopped_early"] = self.waited >= self.patience
        return self.history["stopped_early"]


def _fit(
    runner: nn.Module,
    optimiser: torch.optim.Optimizer,
    train_dir: Path,
    device: torch.device,
    stopper: _EarlyStopping,
    max_steps: int,
    eval_every: int,
    progress: bool,
) -> None:
    """Minimise the MSE between `runner(x_in)` and x_out over the training shards, epoch after epoch."""
    history, step = stopper.history, 0
    bar = progress_bar(total=max_steps, desc=f"train {history['kind']}", disable=not progress)
    while step < max_steps and not history["stopped_early"]:
        for x_in, x_out in iter_pairs(train_dir):
            loss = (runner(x_in.to(device)) - x_out.to(device)).pow(2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            history["step"].append(step)
            history["train_loss"].append(loss.item())
            bar.update(1)
            if step % eval_every == 0 or step == max_steps:
                stop = stopper.check(step)
                bar.set_postfix(val=f"{history['val_loss'][-1]:.4g}", identity=f"{history['identity_mse']:.4g}")
                if stop:
                    break
            if step >= max_steps:
                break
    bar.close()


def streamline(model: nn.Module, start: int, n: int, module: nn.Module | None = None) -> nn.Module:
    """Remove block start..start+n-1 in place; put `module` (if given) where the block was."""
    _check_block(model, start, n)
    if module is None:
        return remove_layers(model, range(start, start + n))
    layers = get_adapter(model).layers(model)
    layers[start] = module.to(next(model.parameters()).device)
    remove_layers(model, range(start + 1, start + n))
    return renumber_layers(model)


def replacement_info(module: nn.Module | None, kind: str, start: int) -> dict | None:
    """What `pruning.json` records about a replacement, enough for `load_pruned` to rebuild it."""
    if module is None or kind == "none":
        return None
    hidden = module.up_proj.out_features if isinstance(module, ReplacementBlock) else None
    return dict(kind=kind, position=start, hidden=hidden)


def prune_model(
    model: nn.Module,
    scores: BlockScores,
    method: str,
    n: int,
    replacement: str = "none",
    train_ids: torch.Tensor | None = None,
    val_ids: torch.Tensor | None = None,
    **train_kwargs,
) -> tuple[nn.Module, dict, dict | None]:
    """Remove the n layers `method` picks (in place); with a replacement, train it first and insert it.

    Returns (model, info for pruning.json, training history or None).
    """
    layers = scores.choose(method, n)
    info = dict(method=method, n=n, removed=layers, replacement=None, n_layers_before=scores.n_layers)
    if replacement == "none":
        return remove_layers(model, layers), info, None
    if layers != list(range(layers[0], layers[0] + n)):
        raise ValueError(
            f"A replacement needs a contiguous block, but {method} chose {layers}; use gromov or streamline."
        )
    if train_ids is None or val_ids is None:
        raise ValueError("Training a replacement needs train_ids and val_ids (calibration windows).")
    module, history = train_replacement(model, train_ids, val_ids, layers[0], n, kind=replacement, **train_kwargs)
    info["replacement"] = replacement_info(module, replacement, layers[0])
    info["identity_mse"], info["val_mse"] = history["identity_mse"], history["best_val_mse"]
    return streamline(model, layers[0], n, module), info, history
