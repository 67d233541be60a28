"""Perplexity with the convention of docs/method.md section 5.

The text is joined once, tokenised once (a BOS only where the model family
wants one, see helpers.infra.textdata), cut into non-overlapping windows of `seqlen`
tokens, the tail dropped; perplexity = exp(mean NLL over every predicted token),
i.e. seqlen - 1 predictions per window (the first token of a window has no
context; with a BOS, every text token of the window is predicted).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from helpers.evaluation.stats import Interval, perplexity_interval
from helpers.infra.progress import progress_bar
from helpers.infra.textdata import load_windows


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and what it was measured on."""

    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    bos: bool = False  # whether every window starts with the BOS token
    window_nll: tuple[float, ...] = ()  # NLL sum of each window (nats): what the bootstrap resamples
    window_tokens: tuple[int, ...] = ()  # predicted tokens of each window

    def as_dict(self) -> dict:
        return asdict(self)

    def interval(self) -> Interval:
        """Perplexity with its 95% bootstrap interval over windows (helpers.evaluation.stats)."""
        return perplexity_interval(self.window_nll, self.window_tokens)


def perplexity_on_ids(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "perplexity"
) -> PerplexityResult:
    """exp(mean next-token NLL) over windows `input_ids` (n, seqlen), batched."""
    device = next(model.parameters()).device

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits

    return perplexity_of(logits_of, input_ids, getattr(model.config, "bos_token_id", None), batch_size, progress, desc)


def perplexity_of(
    logits_of, input_ids: torch.Tensor, bos_token: int | None, batch_size: int, progress: bool, desc: str
) -> PerplexityResult:
    """Perplexity of windows `input_ids` from `logits_of(batch)`, called once per batch of `batch_size`, in order."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (windows, seqlen >= 2), got shape {tuple(input_ids.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    window_nll: list[float] = []
    starts = range(0, input_ids.shape[0], batch_size)
    with torch.no_grad():
        for start in progress_bar(starts, desc=desc, unit="batch", disable=not progress):
            ids = input_ids[start : start + batch_size]
            logits = logits_of(ids)[:, :-1].float()
            targets = ids[:, 1:].to(logits.device)
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            window_nll += nll.double().sum(1).tolist()
    count = input_ids.shape[0] * (input_ids.shape[1] - 1)
    mean = math.fsum(window_nll) / count
    tokens = (input_ids.shape[1] - 1,) * input_ids.shape[0]
    bos = bos_token is not None and bool((input_ids[:, 0] == bos_token).all())
    return PerplexityResult(
        math.exp(mean), mean, count, input_ids.shape[0], input_ids.shape[1], bos, tuple(window_nll), tokens
    )


def perplexity(
    model: nn.Module,
    tokenizer,
    source: str,
    seqlen: int = 512,
    n_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity on a named text or .txt file (`n_windows=None`: every full window of the text)."""
    ids = load_windows(tokenizer, source, seqlen, n_windows)
    return perplexity_on_ids(model, ids, batch_size, progress, desc=f"perplexity {source}")
