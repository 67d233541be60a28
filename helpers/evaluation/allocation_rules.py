"""The allocation rules, one registry (like `tasks.TASKS`): a new rule is one decorated function here plus its test.

docs/method.md section 6. A *scored* rule (`@scored`) returns one score per layer, oriented higher = more
redundant = slice more; the paper's SP/SB formula turns it into kept dimensions through
`allocation.layer_allocation` (matched to constant slicing's parameter count unless asked for the nominal
size). An *allocating* rule (`@allocating`) returns kept dimensions itself, at constant slicing's count; it
takes no SB and may also have a score to show beside the others. `python -m helpers slice --rule`, the
sliders' rule selector, the SB sweep (any scored rule's scores) and the rules report read `RULES`.
Scores are measured on `RuleInputs`: a model's calibration windows, each measurement made once and only
when a rule asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from helpers.analysis.block_scores import block_scores
from helpers.analysis.redundancy import cached_layer_redundancy
from helpers.compression.allocation import (
    Allocation,
    ModelShape,
    budget,
    constant_dims,
    layer_allocation,
    normalised_scores,
)
from helpers.compression.checkpoints import load_model
from helpers.compression.rules import spare_ends_dims, spectral_dims
from helpers.evaluation.sensitivity import (
    full_spectra,
    gradient_sensitivity,
    input_bases,
    measured_sensitivity,
    spectral_scores,
)
from helpers.infra.textdata import load_split, load_windows

BASE_SLICE = 0.0  # SB of a scored rule unless one is given: the SB the selection book picks at every SP on SmolLM2
HELD_OUT_WINDOWS = 8  # windows after the calibration ones that the measured rule perturbs perplexity on


@dataclass
class RuleInputs:
    """What the rules measure: `model` on `windows` windows of `seqlen` tokens of `text` (and the windows after).

    Every measurement is computed on first use and kept in `known`; pass values there that were computed
    elsewhere (a cache, a model already loaded as `loaded`) to reuse them. Without a `text`, only the rules
    that need no model run (LR must then be in `known`).
    """

    model: str
    text: str | None
    seqlen: int
    windows: int
    held_out_windows: int = HELD_OUT_WINDOWS
    seed: int = 0
    loaded: tuple[Any, Any] | None = None  # (model, tokenizer) already in memory
    progress: bool = False  # progress bars while LR and the block scores are measured
    known: dict = field(default_factory=dict)

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`known[key]`, computed once by `compute`."""
        if key not in self.known:
            self.known[key] = compute()
        return self.known[key]

    @property
    def shape(self) -> ModelShape:
        return self.get("shape", lambda: ModelShape.from_pretrained(self.model))

    @property
    def dense(self) -> tuple[Any, Any]:
        if self.text is None:
            raise ValueError(f"this rule measures {self.model} on its calibration windows, and no text was given")
        return self.get("dense", lambda: self.loaded or load_model(self.model, device="cpu"))

    @property
    def lr(self) -> np.ndarray:
        def compute() -> np.ndarray:
            table = cached_layer_redundancy(
                self.model, self.text, self.seqlen, self.windows, progress=self.progress, loaded=self.loaded
            )
            return table["lr"].to_numpy()

        return self.get("lr", compute)

    @property
    def calib(self):
        return self.get("calib", lambda: load_windows(self.dense[1], self.text, self.seqlen, self.windows))

    @property
    def held_out(self):
        sizes = self.windows, self.held_out_windows
        return self.get("held_out", lambda: load_split(self.dense[1], self.text, self.seqlen, *sizes)[1])

    @property
    def blocks(self):
        return self.get("blocks", lambda: block_scores(self.dense[0], self.calib, progress=self.progress))

    @property
    def bases(self):
        return self.get("bases", lambda: input_bases(self.dense[0], self.calib))

    @property
    def spectra(self) -> dict[str, np.ndarray]:
        return self.get("spectra", lambda: full_spectra(self.dense[0], self.calib))

    def keep(self, sp: float) -> int:
        """Constant slicing's kept dimension at `sp`: the perturbation the sensitivity scores measure."""
        return int(constant_dims(self.shape, sp)[0])

    def score(self, rule: str, sp: float) -> np.ndarray:
        """Rule `rule`'s per-layer scores at `sp` (higher = slice more), measured once."""
        found = get_rule(rule)
        if found.score is None:
            raise ValueError(f"Rule {rule!r} has no per-layer score; rules with one: {', '.join(score_names())}.")
        return self.get(("score", rule, sp), lambda: np.asarray(found.score(self, sp), dtype=np.float64))


@dataclass(frozen=True)
class Rule:
    """A registered rule: a per-layer score (through the SP/SB formula), or its own allocation, or both."""

    name: str
    score: Callable[[RuleInputs, float], np.ndarray] | None = None
    allocate: Callable[[RuleInputs, float], np.ndarray] | None = None  # kept dims at constant slicing's count

    @property
    def takes_sb(self) -> bool:
        """Whether SB applies: the rule's scores go through the SP/SB formula."""
        return self.allocate is None


RULES: dict[str, Rule] = {}  # registration order: the order of every table and selector


def scored(name: str) -> Callable:
    """Register `func(inputs, sp) -> scores` as rule `name`: its scores go through the SP/SB formula."""

    def wrap(func: Callable[[RuleInputs, float], np.ndarray]) -> Callable:
        RULES[name] = Rule(name, score=func)
        return func

    return wrap


def allocating(name: str, score: Callable[[RuleInputs, float], np.ndarray] | None = None) -> Callable:
    """Register `func(inputs, sp) -> kept dims` (at constant slicing's count) as rule `name`, with an optional score."""

    def wrap(func: Callable[[RuleInputs, float], np.ndarray]) -> Callable:
        RULES[name] = Rule(name, score=score, allocate=func)
        return func

    return wrap


@allocating("constant")
def constant(inputs: RuleInputs, sp: float) -> np.ndarray:
    """SliceGPT: every layer keeps (1 - SP) d rounded down to a multiple of 8."""
    return constant_dims(inputs.shape, sp)


@scored("lr")
def layer_redundancy(inputs: RuleInputs, sp: float) -> np.ndarray:
    """Layer Redundancy, the paper's rule: the cosine of a layer's input and output (cached per text and size)."""
    return inputs.lr


@scored("block_influence")
def block_influence(inputs: RuleInputs, sp: float) -> np.ndarray:
    """ShortGPT's Block Influence, negated: a layer that changes its input least is sliced most."""
    return -inputs.blocks.bi()


@scored("angular")
def angular(inputs: RuleInputs, sp: float) -> np.ndarray:
    """Gromov et al.'s angular distance between a layer's input and output, as a similarity (1 - distance)."""
    return 1 - np.diag(inputs.blocks.ang_last, k=1)


@scored("gradient")
def gradient(inputs: RuleInputs, sp: float) -> np.ndarray:
    """First-order loss change from cutting a layer's input to constant slicing's width, negated."""
    return -gradient_sensitivity(inputs.dense[0], inputs.calib, inputs.keep(sp), inputs.bases, inputs.seed)


@scored("measured")
def measured(inputs: RuleInputs, sp: float) -> np.ndarray:
    """Held-out perplexity increase from cutting only that layer's input to constant slicing's width, negated."""
    return -measured_sensitivity(inputs.dense[0], inputs.held_out, inputs.keep(sp), inputs.bases, inputs.seed)


@allocating("spare_ends")
def spare_ends(inputs: RuleInputs, sp: float) -> np.ndarray:
    """First and last layer whole, the others alike (an ablation of LR's shape)."""
    return spare_ends_dims(budget(inputs.shape, sp), inputs.shape)


def _spectral_score(inputs: RuleInputs, sp: float) -> np.ndarray:
    return spectral_scores(inputs.spectra, inputs.keep(sp), inputs.shape.n_layers)


@allocating("spectral", score=_spectral_score)
def spectral(inputs: RuleInputs, sp: float) -> np.ndarray:
    """The most PCA energy for the budget, greedily, on the spectra of one full-width rotation pass."""
    return spectral_dims(inputs.spectra, budget(inputs.shape, sp), inputs.shape)


def get_rule(name: str) -> Rule:
    """The registered rule `name`, or a one-line error listing them."""
    if name not in RULES:
        raise ValueError(f"Unknown allocation rule {name!r}; use one of {', '.join(RULES)}.")
    return RULES[name]


def score_names() -> list[str]:
    """The rules that have a per-layer score, in registry order (the columns of `score_table`)."""
    return [name for name, rule in RULES.items() if rule.score is not None]


def rule_dims(name: str, inputs: RuleInputs, sp: float, sb: float | None = None, size: str = "matched") -> np.ndarray:
    """Kept dimensions of rule `name` at `sp`: a scored rule's through `allocation.layer_allocation` at
    (SP, SB = `BASE_SLICE` unless given, `size`); an allocating rule's at constant slicing's count (no SB)."""
    rule = get_rule(name)
    if rule.takes_sb:
        return rule_allocation(name, inputs, sp, sb, size).kept_dim
    if sb is not None:
        raise ValueError(f"Rule {name!r} allocates by itself at constant slicing's parameter count; it takes no SB.")
    return np.asarray(rule.allocate(inputs, sp), dtype=np.int64)


def rule_allocation(
    name: str, inputs: RuleInputs, sp: float, sb: float | None = None, size: str = "matched", **kwargs
) -> Allocation:
    """Rule `name`'s allocation for display (the sliders, Figure 1): a scored rule's SP/SB allocation; an
    allocating rule's kept dimensions, with its own score (else LR) as the score. `kwargs`: fs_max, multiple."""
    rule = get_rule(name)
    if rule.takes_sb:
        sb = BASE_SLICE if sb is None else sb
        return layer_allocation(inputs.score(name, sp), sp, sb, inputs.shape, size, **kwargs)
    dims = rule_dims(name, inputs, sp)
    shown = inputs.score(name, sp) if rule.score is not None else inputs.lr
    fs = 1.0 - dims / inputs.shape.hidden_size
    return Allocation(
        lr=shown,
        lr_norm=normalised_scores(shown),
        slr=fs,
        fs=fs,
        kept_dim=dims,
        sp=float(fs.mean()),
        sb=0.0,
        hidden_size=inputs.shape.hidden_size,
    )


def score_table(inputs: RuleInputs, sp: float) -> pd.DataFrame:
    """Every scored rule's per-layer score at `sp`, one column per rule (registry order), one row per layer."""
    return pd.DataFrame({name: inputs.score(name, sp) for name in score_names()})
