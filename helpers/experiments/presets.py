"""Every setting of the tables and figures, once: `Settings` with its presets (`SIZES`).

The sweep, the method comparison with its recovery (`compare`), the speed step and the rules report read one
`Settings`; the named defaults it uses (calibration and evaluation texts, scoring precision, the recovery recipe)
are each defined once, beside the code they configure.
"""

from __future__ import annotations

from dataclasses import dataclass

from helpers.compression.recovery import RecoverySettings
from helpers.evaluation.tasks import PAPER_TASKS
from helpers.evaluation.zeroshot import SCORING_DTYPE
from helpers.infra.textdata import CALIB_TEXT, EVAL_TEXT
from helpers.models.loading import DEFAULT_MODEL


@dataclass(frozen=True)
class Settings:
    """Everything that determines the numbers; the relevant fields key every cached cell."""

    model: str = DEFAULT_MODEL
    calib_text: str = CALIB_TEXT  # LR and PCA calibration
    select_text: str = CALIB_TEXT  # picks the best SB: the windows after the calibration ones
    eval_texts: tuple[str, ...] = (EVAL_TEXT, "twenty-thousand-leagues", "war-of-the-worlds")  # held out
    seqlen: int = 256
    calib_windows: int = 32
    select_windows: int = 8
    eval_windows: int = 8  # per held-out book
    sps: tuple[float, ...] = (0.10, 0.20, 0.30, 0.35, 0.40)  # the SB sweep
    figure_sps: tuple[float, ...] = (0.30, 0.35, 0.40)  # the paper's Figures 2-4 (Figure 1 at the first)
    recover_sps: tuple[float, ...] = (0.10, 0.20, 0.30)  # every method at matched size, before and after recovery
    sb_step: float = 0.2
    tasks: tuple[str, ...] = PAPER_TASKS
    limit: int | None = 100  # questions per task; None = the whole validation split
    task_limits: tuple[tuple[str, int], ...] = ()  # per-task overrides of `limit`
    dtype: str = SCORING_DTYPE  # zero-shot scoring only; slicing and PCA stay float32/float64
    speed_prompt: int = 128
    speed_new_tokens: int = 16  # the full-size workloads are scripts/bench_speed.py's
    depth: bool = True  # also compare depth pruning and recovery (`compare`) at `recover_sps`
    recovery_tokens: int = 8_192  # LoRA's and the trained replacement's budget, the same for every method
    # The gallery recovers by distillation from the dense model at 5x the recipe's learning rate: at eight steps
    # it lowered SP 0.30's held-out perplexity most without costing accuracy (docs/recovery.md).
    recovery_lr: float = 1e-3
    recovery_loss: str = "distill"
    rules: bool = False  # also compare allocation and SB selection rules (helpers.experiments.rules_report)
    rules_sps: tuple[float, ...] = (0.30, 0.40)  # the SPs of the allocation-rules comparison (a subset of sps)
    seed: int = 0

    def task_limit(self, task: str) -> int | None:
        """Questions scored for `task`."""
        return dict(self.task_limits).get(task, self.limit)

    def recovery(self) -> RecoverySettings:
        """The recovery recipe every compressed model of the comparison gets (docs/method.md, recovery)."""
        return RecoverySettings(
            tokens=self.recovery_tokens,
            lr=self.recovery_lr,
            loss=self.recovery_loss,
            seqlen=self.seqlen,
            seed=self.seed,
        )


SIZES: dict[str, Settings] = {
    # The setup command's main job, meant for 45 minutes on 2 idle CPU cores (measured 47.2, docs/findings.md):
    # 100 questions per task scored in bfloat16, perplexity on three held-out books, recovery at 8,192 tokens.
    "reduced": Settings(),
    # Statistical power (not run here; hours on 2 cores): whole validation splits, 2,000 HellaSwag questions,
    # recovery at 32,768 tokens.
    "standard": Settings(limit=None, task_limits=(("hellaswag", 2000),), eval_windows=32, recovery_tokens=32_768),
    # The paper's protocol sizes (SB step 0.02, whole validation splits): hours on a GPU.
    "full": Settings(
        seqlen=512,
        calib_windows=128,
        select_windows=32,
        eval_windows=64,
        sb_step=0.02,
        limit=None,
        dtype="float32",
        recovery_tokens=8_192_000,  # SliceGPT's Alpaca recipe: 8,000 samples of 1,024 tokens
    ),
    # Every step in about a minute: the notebooks' fast mode and the tests.
    "smoke": Settings(
        seqlen=64,
        calib_windows=4,
        select_windows=2,
        eval_windows=2,
        eval_texts=(EVAL_TEXT, "war-of-the-worlds"),
        sps=(0.3,),
        figure_sps=(0.3,),
        recover_sps=(0.3,),
        sb_step=0.3,
        tasks=("piqa", "winogrande"),
        limit=4,
        speed_prompt=16,
        speed_new_tokens=4,
        depth=False,
        recovery_tokens=512,
        rules_sps=(0.3,),
    ),
}
