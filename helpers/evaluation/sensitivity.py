"""Per-layer scores that need the model: PCA spectra, gradient sensitivity, measured sensitivity.

docs/method.md section 6. Slicing layer i to k dimensions restricts the residual stream entering it,
x_i, to its top k principal directions (uncentred PCA over every calibration token, as the slicer
computes it): the perturbation is dx = -x U U^T, with U the trailing d - k eigenvectors.
- `gradient_sensitivity`: the first-order Taylor estimate of the loss change from that perturbation,
  summed per token in absolute value, sum_t |g_t . dx_t| with g_t = dL/dx_t on calibration windows.
- `measured_sensitivity`: the perplexity increase when only that projection is applied (a forward
  pre-hook on layer i of the dense model; no rotation pass), on held-out windows.
The two measure the same perturbation: one predicts it, the other runs it. The PCA inside layer i
(its MLP input) is not perturbed by either, which keeps them one forward pass per layer.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from helpers.analysis.capture import LayerStatistic, stream_statistics
from helpers.compression.slicing import DAMPING, rotate_and_slice
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.models.adapters import get_adapter
from helpers.models.hooks import forward_hooks, layer_input, with_layer_input

GRADIENT_WINDOWS = 8  # calibration windows the gradient pass sees (drawn with the seed)
MEASURE_WINDOWS = 4  # held-out windows each single-layer perplexity is measured on


class SecondMoment(LayerStatistic):
    """Running sum of x^T x (float64) of every layer's input over all tokens, as the slicer's PCA counts them."""

    def __init__(self, n_layers: int, d: int) -> None:
        self.sums = torch.zeros(n_layers, d, d, dtype=torch.float64)

    def update(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        x = x_in.reshape(-1, x_in.shape[-1]).double().cpu()
        self.sums[layer] += x.T @ x


def input_bases(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer, the eigenvectors (columns, largest eigenvalue first) of its damped input second moment."""
    d = model.config.hidden_size
    stat = SecondMoment(len(get_adapter(model).layers(model)), d)
    stream_statistics(model, input_ids, [stat], batch_size, progress=False, desc="PCA")
    bases = []
    for cov in stat.sums:
        cov = cov + DAMPING * cov.diagonal().mean() * torch.eye(d, dtype=torch.float64)
        values, vectors = torch.linalg.eigh(cov)
        bases.append(vectors[:, torch.argsort(values, descending=True)])
    return bases


def full_spectra(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> dict[str, np.ndarray]:
    """The slicer's eigenvalues at every boundary (attn_i, mlp_i) from one rotation pass keeping every dimension."""
    d, n = model.config.hidden_size, model.config.num_hidden_layers
    info = rotate_and_slice(copy.deepcopy(model), input_ids, [d] * n, batch_size=batch_size, progress=False)
    return info.eigenvalues


def spectral_scores(spectra: dict[str, np.ndarray], keep: int, n_layers: int) -> np.ndarray:
    """Per layer, the mean fraction of PCA energy its boundaries keep at `keep` dimensions (higher = more redundant)."""
    scores = np.zeros(n_layers)
    for name, values in spectra.items():
        scores[int(name.split("_")[-1])] += np.sum(values[:keep]) / np.sum(values) / 2
    return scores


def pick_windows(input_ids: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` windows drawn without replacement with `seed` (all of them when there are no more than `n`)."""
    if input_ids.shape[0] <= n:
        return input_ids
    order = torch.randperm(input_ids.shape[0], generator=torch.Generator().manual_seed(seed))
    return input_ids[order[:n].sort().values]


def _window_gradients(model: nn.Module, window: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's input for one window, with dL/dx in `.grad` (L: mean next-token NLL)."""
    layers = get_adapter(model).layers(model)
    states: list[torch.Tensor] = [torch.empty(0)] * len(layers)

    def hook(index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = layer_input(args, kwargs)
        if index == 0:  # a leaf, so that every later layer's input carries a gradient
            hidden = hidden.detach().requires_grad_(True)
        hidden.retain_grad()
        states[index] = hidden
        return with_layer_input(args, kwargs, hidden)

    with forward_hooks(layers, pre=hook), torch.enable_grad():
        model(input_ids=window, labels=window, use_cache=False).loss.backward()
    return states


def gradient_sensitivity(
    model: nn.Module, input_ids: torch.Tensor, keep: int, bases: list[torch.Tensor], seed: int = 0
) -> np.ndarray:
    """Per layer, sum_t |g_t . dx_t| / windows: the first-order loss change from cutting x_i to `keep` directions."""
    ids = pick_windows(input_ids, GRADIENT_WINDOWS, seed)
    trailing = [basis[:, keep:].float() for basis in bases]
    scores = np.zeros(len(bases))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:  # only the activations need gradients
            p.requires_grad_(False)
        for window in ids.split(1):
            for index, x in enumerate(_window_gradients(model, window)):
                dx = -(x.detach() @ trailing[index]) @ trailing[index].T
                scores[index] += float((x.grad * dx).sum(-1).abs().sum())
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return scores / ids.shape[0]


@contextlib.contextmanager
def projected_input(model: nn.Module, layer: int, basis: torch.Tensor) -> Iterator[None]:
    """While active, layer `layer` sees its input projected onto the columns of `basis` (x U U^T)."""
    u = basis.float()

    def hook(_index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = layer_input(args, kwargs)
        return with_layer_input(args, kwargs, ((hidden.float() @ u) @ u.T).to(hidden.dtype))

    with forward_hooks(get_adapter(model).layers(model)[layer : layer + 1], pre=hook):
        yield


def measured_sensitivity(
    model: nn.Module, input_ids: torch.Tensor, keep: int, bases: list[torch.Tensor], seed: int = 0
) -> np.ndarray:
    """Per layer, perplexity with only x_i cut to `keep` principal directions minus the dense perplexity."""
    ids = pick_windows(input_ids, MEASURE_WINDOWS, seed)
    dense = perplexity_on_ids(model, ids, progress=False).perplexity
    scores = []
    for index, basis in enumerate(bases):
        with projected_input(model, index, basis[:, :keep]):
            scores.append(perplexity_on_ids(model, ids, progress=False).perplexity - dense)
    return np.array(scores)
