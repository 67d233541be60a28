"""Recovery fine-tuning: LoRA adapters (through `peft`) trained with the language-model loss, then merged.

A sliced, depth-pruned or hybrid model loses quality that a short fine-tune
partly restores (SliceGPT's "recovery fine-tuning"). `recover` adds low-rank
adapters to the named linear layers (optionally the sliced model's shortcut
matrices), trains them with AdamW and a warm-up + linear schedule on
calibration-text windows, validates every few steps on held-back windows of
the same text, keeps the best adapters and merges them into the weights, so
the model keeps its layout and parameter count. The training text must share
no token span with the evaluation texts (`shared_spans`). `recover_folder`
does the same for a saved folder and saves the result as an ordinary lab
folder, the recipe recorded in its metadata. Recipe and defaults: docs/method.md.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from helpers.compression.checkpoints import PRUNING_FILE, load_model, save_pruned
from helpers.compression.depth import parameter_count
from helpers.compression.sliced_io import SLICING_FILE, save_sliced
from helpers.infra.integrity import CHECKSUM_FIELD
from helpers.infra.memory import peak_memory_mb, reset_peak_memory
from helpers.infra.progress import progress_bar
from helpers.infra.textdata import CALIB_TEXT, GUTENBERG_BOOKS, load_text, token_windows
from helpers.models.loading import with_bos

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORTCUT_TARGETS = ("attn_shortcut", "mlp_shortcut")  # the sliced layers' residual basis changes
HELD_OUT_TEXTS = tuple(book for book in GUTENBERG_BOOKS if book != CALIB_TEXT)  # the lab's evaluation books
BETAS = (0.9, 0.95)  # AdamW, as SliceGPT's recovery fine-tuning
WEIGHT_DECAY = 0.01
SPAN = 32  # tokens: two texts that share a run this long share text
LOSSES = ("lm", "distill")
AUTOCASTS = ("bfloat16", "float16", "float32")  # training precisions; float32 turns autocast off


class NotCompressedError(ValueError):
    """Raised for a dense model: recovery is for models the lab has sliced or pruned."""


@dataclass(frozen=True)
class RecoverySettings:
    """The recovery recipe; every field is a `recover` command option (docs/method.md, recovery)."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    lr: float = 2e-4
    tokens: int = 65_536  # training-token budget; training stops when it is spent (or at `steps`)
    steps: int | None = None  # optimiser steps at most (None: what the token budget allows)
    batch_size: int = 4  # windows per step
    seqlen: int = 256
    val_windows: int = 8  # the text's last windows, never trained on
    eval_every: int = 8  # steps between validations
    patience: int = 5  # validations without improvement before stopping
    warmup: float = 0.1  # fraction of the planned steps with a rising learning rate
    targets: tuple[str, ...] = LINEAR_TARGETS
    shortcuts: bool = False  # also adapt the sliced layers' shortcut matrices
    autocast: str = "bfloat16"  # the training forward's precision (torch.autocast); "float32" turns it off
    loss: str = "lm"  # "lm": next-token cross-entropy; "distill": KL divergence from a dense teacher's predictions
    text: str = CALIB_TEXT
    held_out: tuple[str, ...] = HELD_OUT_TEXTS
    seed: int = 0

    def __post_init__(self) -> None:
        positive = dict(
            rank=self.rank,
            tokens=self.tokens,
            batch_size=self.batch_size,
            val_windows=self.val_windows,
            eval_every=self.eval_every,
            patience=self.patience,
        )
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}.")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2, got {self.seqlen}.")
        if not (self.alpha > 0 and self.lr > 0 and 0 <= self.dropout < 1 and 0 <= self.warmup < 1):
            raise ValueError("alpha and lr must be positive, dropout and warmup fractions in [0, 1).")
        if self.tokens < self.batch_size * self.seqlen:
            raise ValueError(
                f"A token budget of {self.tokens} does not fill one step of {self.batch_size} x {self.seqlen} tokens."
            )
        if not self.targets:
            raise ValueError("targets is empty; name the linear layers to adapt, e.g. q_proj,v_proj.")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}.")
        if self.autocast not in AUTOCASTS:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCASTS)}, got {self.autocast!r}.")

    @property
    def planned_steps(self) -> int:
        """Optimiser steps the budget allows (fewer if early stopping ends training)."""
        budget = self.tokens // (self.batch_size * self.seqlen)
        return budget if self.steps is None else min(budget, self.steps)

    @property
    def modules(self) -> tuple[str, ...]:
        """The module names LoRA adapts."""
        return self.targets + (SHORTCUT_TARGETS if self.shortcuts else ())


@dataclass
class RecoveryReport:
    """What one recovery run did: the recipe, the losses it saw and what it cost."""

    settings: dict
    steps: int  # optimiser steps taken
    tokens: int  # training tokens seen
    best_step: int  # step of the restored adapters (0: training never beat the untouched model)
    val_loss_before: float
    val_loss_after: float
    stopped_early: bool
    seconds: float
    peak_memory_mb: float
    adapted: int  # linear layers that got adapters
    trainable: int  # LoRA parameters trained (merged away afterwards)
    train_windows: int
    history: dict = field(default_factory=dict)  # step, train_loss, val_step, val_loss


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a plain list of names: the module's name is a target or ends in "." + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def check_targets(shapes: dict[str, tuple[int, int]], targets: tuple[str, ...], rank: int) -> None:
    """Every target names at least one linear layer and the rank fits each layer's smaller side.

    `shapes` maps a linear layer's module name to its weight's (out, in).
    """
    for target in targets:
        if not any(_matches(name, (target,)) for name in shapes):
            raise ValueError(f"No linear layer named {target!r} in this model; choose among the layers it has.")
    for name, shape in shapes.items():
        if _matches(name, targets) and rank > min(shape):
            raise ValueError(f"--rank {rank} exceeds the width of {name} ({shape[1]} -> {shape[0]}); use a lower rank.")


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear in `model`, by module name."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def folder_weight_shapes(folder: str | Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every 2-D `.weight` in a saved folder's safetensors headers, by module name; reads no weights."""
    shapes = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                shape = handle.get_slice(key).get_shape()
                if key.endswith(".weight") and len(shape) == 2:
                    shapes[key.removesuffix(".weight")] = tuple(shape)
    return shapes


def compression_kind(folder: str | Path) -> str:
    """ "sliced" or "pruned" for a folder the lab compressed; NotCompressedError for anything else."""
    folder = Path(folder)
    if (folder / SLICING_FILE).is_file():
        return "sliced"
    if (folder / PRUNING_FILE).is_file():
        return "pruned"
    raise NotCompressedError(
        f"{folder} is a dense model (no {SLICING_FILE} or {PRUNING_FILE}); recovery is for sliced, pruned or "
        "hybrid folders: slice or prune it first."
    )


def check_recovery_folder(folder: str | Path, settings: RecoverySettings) -> str:
    """Everything about a folder and recipe that can be checked before the model loads; returns its kind."""
    kind = compression_kind(folder)
    check_targets(folder_weight_shapes(folder), settings.modules, settings.rank)
    return kind


def _span_hashes(windows: torch.Tensor, span: int) -> np.ndarray:
    """A 64-bit polynomial hash of every run of `span` consecutive tokens inside each window."""
    ids = windows.numpy().astype(np.uint64)
    if ids.shape[1] < span:
        return np.zeros(0, dtype=np.uint64)
    n = ids.shape[1] - span + 1
    hashes = np.zeros((ids.shape[0], n), dtype=np.uint64)
    for j in range(span):  # uint64 arithmetic wraps: a hash modulo 2**64
        hashes = hashes * np.uint64(1_000_003) + ids[:, j : j + n]
    return hashes.ravel()


def shared_spans(train_ids: torch.Tensor, held_out_ids: torch.Tensor, span: int = SPAN) -> int:
    """How many `span`-token runs inside the training windows also occur inside the held-out windows."""
    return int(np.isin(_span_hashes(train_ids, span), _span_hashes(held_out_ids, span)).sum())


def check_disjoint(tokenizer, train_ids: torch.Tensor, held_out: tuple[str, ...], span: int = SPAN) -> None:
    """Refuse training windows that share a `span`-token run with any held-out text (all of its windows)."""
    for text in held_out:
        shared = shared_spans(train_ids, token_windows(tokenizer, load_text(text), 1024), span)
        if shared:
            raise ValueError(
                f"The recovery text shares {shared} runs of {span} tokens with the evaluation text {text!r}; "
                "train on a text disjoint from every evaluation text."
            )


def recovery_data(tokenizer, settings: RecoverySettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) windows of the recovery text: the last `val_windows` validate, the rest train."""
    windows = token_windows(tokenizer, load_text(settings.text), settings.seqlen)
    if len(windows) < settings.val_windows + settings.batch_size:
        raise ValueError(
            f"{settings.text!r} has {len(windows)} windows of {settings.seqlen} tokens: too few for "
            f"{settings.val_windows} validation windows and one batch of {settings.batch_size}."
        )
    check_disjoint(tokenizer, windows, settings.held_out)
    return windows[: -settings.val_windows], windows[-settings.val_windows :]


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every predicted token of the windows `ids` (as perplexity counts)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def distill_loss(model: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over predicted tokens of KL(teacher || model) between next-token distributions: the compressed
    model learns to predict what the dense model predicts, not the training text itself."""
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    log_probs = F.log_softmax(logits, dim=-1)
    return F.kl_div(log_probs.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")


def objective(model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None = None) -> torch.Tensor:
    """The recovery loss on windows `ids`: next-token NLL, or with a `teacher` the KL from its predictions."""
    return lm_loss(model, ids) if teacher is None else distill_loss(model, teacher, ids)


def validation_loss(model: nn.Module, ids: torch.Tensor, batch_size: int, teacher: nn.Module | None = None) -> float:
    """The recovery loss (`objective`) averaged over the windows `ids`, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        total = sum(
            float(objective(model, ids[i : i + batch_size].to(device), teacher)) * len(ids[i : i + batch_size])
            for i in range(0, len(ids), batch_size)
        )
    model.train(was_training)
    return total / len(ids)


def add_adapters(model: nn.Module, settings: RecoverySettings) -> nn.Module:
    """Wrap `model` in a peft model with LoRA adapters on `settings.modules` (the base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    check_targets(linear_shapes(model), settings.modules, settings.rank)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.modules),
        bias="none",
    )
    torch.manual_seed(settings.seed)  # the adapters' random A matrices
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notice, raised inside peft
        return get_peft_model(model, config)


def _schedule(optimiser: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` of the steps, then linear decay to zero at the last step."""
    rise = max(1, round(warmup * steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < rise:
            return (step + 1) / rise
        return max(0.0, (steps - step) / max(1, steps - rise))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def _autocast(device: torch.device, dtype: str) -> torch.autocast:
    """Mixed precision for the training forward: weights and adapters stay float32, matmuls run in `dtype`."""
    return torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def recover(
    model: nn.Module,
    tokenizer,
    settings: RecoverySettings | None = None,
    train_ids: torch.Tensor | None = None,
    val_ids: torch.Tensor | None = None,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> tuple[nn.Module, RecoveryReport]:
    """Train LoRA adapters on `model`, restore the best ones by validation loss and merge them into the weights.

    Windows default to `recovery_data` (disjoint from the held-out texts). With `settings.loss` "distill" the
    adapters learn `teacher`'s (the dense model's) predictions; validation measures the same loss.
    Returns the merged model (same modules and parameter count as before) and a report. The model is changed
    in place.
    """
    settings = settings or RecoverySettings()
    if settings.loss == "distill" and teacher is None:
        raise ValueError("loss 'distill' needs the dense teacher model (--teacher).")
    if train_ids is None or val_ids is None:
        train_ids, val_ids = recovery_data(tokenizer, settings)
    if len(train_ids) < settings.batch_size or len(val_ids) == 0:
        raise ValueError(f"Need at least {settings.batch_size} training windows and one validation window.")
    params_before = parameter_count(model)
    device = next(model.parameters()).device
    reset_peak_memory(device)
    start = time.perf_counter()
    peft_model = add_adapters(model, settings)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=settings.lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    steps = settings.planned_steps
    scheduler = _schedule(optimiser, steps, settings.warmup)
    history: dict = dict(step=[], train_loss=[], val_step=[], val_loss=[], loss=settings.loss)
    teacher = teacher if settings.loss == "distill" else None
    best_val = validation_loss(peft_model, val_ids, settings.batch_size, teacher)
    history["val_step"].append(0)
    history["val_loss"].append(best_val)
    val_before, best_step, best_state, waited = best_val, 0, _lora_state(peft_model), 0
    order = torch.Generator().manual_seed(settings.seed)
    batches: list[torch.Tensor] = []
    peft_model.train()
    bar = progress_bar(total=steps, desc="recovery", unit="step", disable=not progress)
    step = 0
    while step < steps:
        if not batches:  # a new epoch: the training windows in a fresh seeded order
            perm = torch.randperm(len(train_ids), generator=order)
            usable = len(perm) - len(perm) % settings.batch_size
            batches = list(perm[:usable].split(settings.batch_size))
        ids = train_ids[batches.pop(0)].to(device)
        with _autocast(device, settings.autocast):
            loss = objective(peft_model, ids, teacher)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
        step += 1
        history["step"].append(step)
        history["train_loss"].append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{history['val_loss'][-1]:.3f}", best=f"{best_val:.3f}")
        if step % settings.eval_every == 0 or step == steps:
            val = validation_loss(peft_model, val_ids, settings.batch_size, teacher)
            history["val_step"].append(step)
            history["val_loss"].append(val)
            if val < best_val:
                best_val, best_step, best_state, waited = val, step, _lora_state(peft_model), 0
            else:
                waited += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}", best=f"{best_val:.3f}")
            if waited >= settings.patience:
                break
    bar.close()
    if not math.isfinite(best_val):
        raise RuntimeError("Recovery diverged (validation loss is not finite); lower the learning rate.")
    peft_model.load_state_dict(best_state, strict=False)
    adapted = sum(1 for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and name)
    merged = peft_model.merge_and_unload()
    merged.eval()
    if parameter_count(merged) != params_before:
        raise RuntimeError("Merging the adapters changed the parameter count; this is a bug.")
    report = RecoveryReport(
        settings={**asdict(settings), "planned_steps": steps, "betas": BETAS, "weight_decay": WEIGHT_DECAY},
        steps=step,
        tokens=step * settings.batch_size * settings.seqlen,
        best_step=best_step,
        val_loss_before=val_before,
        val_loss_after=best_val,
        stopped_early=step < steps,
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(device),
        adapted=adapted,
        trainable=sum(p.numel() for p in trainable),
        train_windows=len(train_ids),
        history=history,
    )
    return merged, report


def recover_folder(
    folder: str | Path,
    out: str | Path,
    settings: RecoverySettings | None = None,
    progress: bool = True,
    teacher: str | None = None,
) -> RecoveryReport:
    """Recover a sliced, pruned or hybrid folder and save the merged model to `out` as a folder of the same kind.

    `teacher`: the dense model (name or folder) that loss "distill" learns from. The recipe and what it cost
    go into the folder's slicing.json / pruning.json under "recovery".
    """
    settings = settings or RecoverySettings()
    kind = check_recovery_folder(folder, settings)
    if settings.loss == "distill" and teacher is None:
        raise ValueError("--loss distill needs --teacher, the dense model the folder was compressed from.")
    tokenizer = with_bos(AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))
    train_ids, val_ids = recovery_data(tokenizer, settings)  # refuses a text that overlaps the evaluation books
    model, tokenizer = load_model(str(folder), device="cpu")
    dense = load_model(teacher, device="cpu")[0].eval() if settings.loss == "distill" else None
    model, report = recover(model, tokenizer, settings, train_ids, val_ids, progress=progress, teacher=dense)
    record = {**asdict(report), "source": str(folder), "teacher": teacher}
    if kind == "sliced":
        save_sliced(model, tokenizer, out, extra={"recovery": record})
    else:
        info = json.loads((Path(folder) / PRUNING_FILE).read_text())
        info.pop(CHECKSUM_FIELD, None)
        save_pruned(model, tokenizer, out, {**info, "recovery": record})
    return report
