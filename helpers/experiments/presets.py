"""Every setting of the tables and figures, once: `Settings` with its presets (`SIZES`).

The sweep, the speed step, the depth comparison (`reports.depth_settings`) and the rules report read one `Settings`;
the named defaults it uses (calibration and evaluation texts, scoring precision, replacement steps, base slice)
are each defined once, beside the code they configure, with the values the committed gallery was made with.
"""

from __future__ import annotations

from dataclasses import dataclass

from helpers.compression.replacement import REPLACEMENT_STEPS
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
    eval_windows: int = 16  # per held-out book
    sps: tuple[float, ...] = (0.30, 0.35, 0.40)
    sb_step: float = 0.2
    tasks: tuple[str, ...] = PAPER_TASKS
    limit: int | None = 200  # questions per task; None = the whole validation split
    task_limits: tuple[tuple[str, int], ...] = ()  # per-task overrides of `limit`
    dtype: str = SCORING_DTYPE  # zero-shot scoring only; slicing and PCA stay float32/float64
    speed_prompt: int = 128
    speed_new_tokens: int = 16  # the full-size workloads are scripts/bench_speed.py's
    depth: bool = True  # also run the depth-pruning comparison
    depth_steps: int = REPLACEMENT_STEPS  # replacement training steps in the depth comparison
    rules: bool = False  # also compare allocation and SB selection rules (helpers.experiments.rules_report)
    rules_sps: tuple[float, ...] = (0.30, 0.40)  # the SPs of the allocation-rules comparison (a subset of sps)
    seed: int = 0

    def task_limit(self, task: str) -> int | None:
        """Questions scored for `task`."""
        return dict(self.task_limits).get(task, self.limit)


SIZES: dict[str, Settings] = {
    # The setup command's main job, at most 30 minutes on 2 idle CPU cores: 200 questions per task scored in
    # bfloat16 with the shared-context scorer, perplexity on three held-out books.
    "reduced": Settings(),
    # Statistical power within 3 hours here (about 2 h estimated; `--rules` adds about as much): whole
    # validation splits, 2,000 HellaSwag questions.
    "standard": Settings(limit=None, task_limits=(("hellaswag", 2000),), eval_windows=32),
    # The paper's protocol sizes (SB step 0.02, whole validation splits): hours on a GPU.
    "full": Settings(
        seqlen=512,
        calib_windows=128,
        select_windows=32,
        eval_windows=64,
        sb_step=0.02,
        limit=None,
        dtype="float32",
        depth_steps=1000,
    ),
    # Every step in about a minute: the notebooks' fast mode and the tests.
    "smoke": Settings(
        seqlen=64,
        calib_windows=4,
        select_windows=2,
        eval_windows=2,
        eval_texts=(EVAL_TEXT, "war-of-the-worlds"),
        sps=(0.3,),
        sb_step=0.3,
        tasks=("piqa", "winogrande"),
        limit=4,
        speed_prompt=16,
        speed_new_tokens=4,
        depth=False,
        rules_sps=(0.3,),
    ),
}
