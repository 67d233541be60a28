"""Interactive SP/SB sliders over cached LR scores: the paper's Figure 1, redrawn on every change.

Everything that needs disk (LR tables, model configs) is read once when the app is built; with LR
(the default rule) the slider callback only allocates (NumPy) and re-renders one pre-built figure
into a PNG. The rule selector offers every registered rule (`allocation_rules.RULES`); a rule whose
scores need the model measures them once per SP on the LR table's own windows.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import numpy as np

from helpers.compression.allocation import (
    DEFAULT_FS_MAX,
    DEFAULT_MULTIPLE,
    SIZES,
    Allocation,
    ModelShape,
    param_summary,
    read_lr_csv,
)
from helpers.evaluation.allocation_rules import RULES, RuleInputs, rule_allocation
from helpers.infra.storage import CACHE_DIR, RUNS_DIR
from helpers.ui.plots import AllocationFigure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LRChoice:
    """One entry of the model selector: LR scores, the shape of their model, and the rules' inputs."""

    label: str
    model: str
    lr: np.ndarray
    shape: ModelShape
    inputs: RuleInputs | None = None  # the LR table's model and windows (cache files name them); None: LR only


def rule_inputs(path: Path, model: str, lr: np.ndarray, shape: ModelShape) -> RuleInputs | None:
    """The rules' inputs of a cached LR table (MODEL__TEXT__L<seqlen>__N<windows>), its LR and shape known."""
    parts = path.stem.split("__")
    if len(parts) != 4 or not (parts[2][1:].isdigit() and parts[3][1:].isdigit()):
        return None
    inputs = RuleInputs(model, parts[1], int(parts[2][1:]), int(parts[3][1:]))
    inputs.known.update(lr=lr, shape=shape)
    return inputs


def model_of_lr_file(path: Path) -> str:
    """Model name encoded in an LR file name: runs/lr_MODEL.csv or cache/lr/MODEL__TEXT__L..__N...csv."""
    stem = path.stem
    return stem.split("__")[0] if "__" in stem else stem.removeprefix("lr_")


def lr_file_label(path: Path) -> str:
    """A readable selector label: 'smollm2-135m: LR on gutenberg, 4 x 64 tokens' rather than the cache file name."""
    parts = path.stem.split("__")
    if len(parts) == 4 and parts[2].startswith("L") and parts[3].startswith("N"):
        model, text, seqlen, windows = parts
        return f"{model}: LR on {text}, {windows[1:]} x {seqlen[1:]} tokens"
    return f"{model_of_lr_file(path)}: LR from {path.parent.name}/{path.name}"


def find_lr_files(runs: Path = RUNS_DIR, cache: Path = CACHE_DIR / "lr") -> list[Path]:
    """LR tables: data/runs/lr_*.csv (written by `python -m helpers lr`) and the cache, data/cache/lr/*.csv."""
    return sorted(Path(runs).glob("lr_*.csv")) + sorted(Path(cache).glob("*.csv"))


def load_choices(paths: Iterable[Path]) -> dict[str, LRChoice]:
    """Read each LR table and its model's config once; files whose model is unknown are skipped (logged)."""
    shapes: dict[str, ModelShape] = {}
    choices = {}
    for path in paths:
        model = model_of_lr_file(path)
        try:
            if model not in shapes:
                shapes[model] = ModelShape.from_pretrained(model)
            lr = read_lr_csv(path)
        except (ValueError, OSError, RuntimeError) as err:
            log.warning("skipping %s: %s", path, err)
            continue
        if lr.size != shapes[model].n_layers:
            log.warning("skipping %s: %d LR scores but %s has %d layers", path, lr.size, model, shapes[model].n_layers)
            continue
        label = lr_file_label(path)
        choices[label] = LRChoice(label, model, lr, shapes[model], rule_inputs(path, model, lr, shapes[model]))
    if not choices:
        raise FileNotFoundError("No usable LR table found; compute one with: python -m helpers lr")
    return choices


class SliderApp:
    """SP and SB sliders (SB kept within [0, SP]), model, rule and size selectors, Figure 1 and a readout."""

    def __init__(
        self,
        choices: dict[str, LRChoice],
        sp: float = 0.3,
        sb: float = 0.1,
        fs_max: float = DEFAULT_FS_MAX,
        multiple: int = DEFAULT_MULTIPLE,
    ) -> None:
        self.choices, self.fs_max, self.multiple = choices, fs_max, multiple
        style = {"description_width": "150px"}
        layout = widgets.Layout(width="520px")
        self.model = widgets.Dropdown(options=list(choices), description="LR scores", style=style, layout=layout)
        self.rule = widgets.Dropdown(options=list(RULES), value="lr", description="rule", style=style, layout=layout)
        self.size = widgets.ToggleButtons(options=SIZES, description="size", style=style)
        self.sp = widgets.FloatSlider(
            value=sp, min=0.0, max=0.9, step=0.01, description="SP (mean slice)", style=style, layout=layout
        )
        self.sb = widgets.FloatSlider(
            value=sb, min=0.0, max=sp, step=0.01, description="SB (base slice)", style=style, layout=layout
        )
        self.image = widgets.Image(format="png")
        self.readout = widgets.HTML(layout=widgets.Layout(width="700px"))  # wraps inside the figure's width
        self.last_seconds = 0.0
        first = self.allocation(sp, sb)
        self.figure = AllocationFigure(first, title="Figure 1: slice allocation by Layer Redundancy")
        self.figure.warm()
        self.update()
        self.sp.observe(self._on_sp, names="value")
        self.sb.observe(self.update, names="value")
        for control in (self.model, self.rule, self.size):
            control.observe(self.update, names="value")
        self.box = widgets.VBox([self.model, self.rule, self.size, self.sp, self.sb, self.readout, self.image])

    @property
    def choice(self) -> LRChoice:
        return self.choices[self.model.value]

    def allocation(self, sp: float, sb: float) -> Allocation:
        """The selected rule's allocation at (SP, SB) and the selected size, on the selected LR table's model."""
        choice = self.choice
        inputs = choice.inputs or RuleInputs(choice.model, None, 0, 0, known={"lr": choice.lr, "shape": choice.shape})
        kwargs = {"fs_max": self.fs_max, "multiple": self.multiple}
        sb = sb if RULES[self.rule.value].takes_sb else None
        return rule_allocation(self.rule.value, inputs, sp, sb, self.size.value, **kwargs)

    def _on_sp(self, change: dict | None = None) -> None:
        if self.sb.value > self.sp.value:  # moving max below the value would also trigger update
            self.sb.max = self.sp.value
            return
        self.sb.max = self.sp.value
        self.update()

    def update(self, change: dict | None = None) -> Allocation | None:
        """The callback: allocate for the current widgets, redraw the figure, refresh the readout."""
        start = time.perf_counter()
        choice = self.choice
        model_changed = change is not None and change.get("owner") is self.model
        try:
            alloc = self.allocation(self.sp.value, self.sb.value)
        except ValueError as err:  # an infeasible request: say why, keep the last figure
            self.readout.value = f"<b>cannot allocate:</b> {html.escape(str(err))}"
            return None
        self.figure.update(alloc)
        if model_changed:  # a new LR vector: pay for both backgrounds now, not on the next slider move
            self.figure.warm()
        self.image.value = self.figure.png()
        counts = param_summary(choice.shape, alloc.kept_dim)
        self.readout.value = (
            f"<b>realised mean slice: <span class='realised-mean'>{alloc.realised_mean:.3f}</span></b> "
            f"(rule {self.rule.value}, {self.size.value} size: requested SP {self.sp.value:.2f}, sliced at "
            f"SP {alloc.sp:.3f}, SB {alloc.sb:.2f}; kept dims multiple of {alloc.multiple}, "
            f"d = {alloc.hidden_size})<br>"
            f"<span style='white-space: normal; overflow-wrap: anywhere'>kept dims: "
            f"{', '.join(map(str, alloc.kept_dim))}</span><br>"
            f"parameters: {counts['sliced']:,} of {counts['dense']:,} "
            f"({counts['removed_fraction']:.1%} removed; {counts['removed_fraction_body']:.1%} of the layers' "
            f"parameters, embeddings and head counted apart)"
        )
        self.last_seconds = time.perf_counter() - start
        return alloc


def slider_app(paths: Iterable[Path] | None = None, sp: float = 0.3, sb: float = 0.1, **kwargs) -> SliderApp:
    """Build the app over the given LR files (default: every cached one); display `app.box`."""
    return SliderApp(load_choices(find_lr_files() if paths is None else paths), sp=sp, sb=sb, **kwargs)
