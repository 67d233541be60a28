"""Regenerate the paper's figures and tables in one command: `python -m helpers reproduce`.

1. SB sweeps: for every SP, slice the dense model at every SB from SP down to 0
   and measure perplexity on a selection book, perplexity on a held-out book and
   zero-shot accuracy. SB = SP is constant slicing (SliceGPT); the dynamic row
   of each SP is the SB < SP with the lowest selection-book perplexity (the
   paper's rule, never looking at the evaluation book).
2. Figures: Figure 1 (allocation at the first SP and its best SB), Figures 2-5
   (accuracy per task and average against SB, constant slicing as a red line),
   the perplexity comparison; the results table (method x SP) as CSV and Markdown.
3. Speed and memory of dense, constant and best dynamic at the first SP: each model
   in its own worker process, repeats interleaved (`helpers.evaluation.speed`).
4. Depth pruning against slicing at matched parameter counts (`helpers.experiments.compare`).
5. With `rules` on, after these: allocation rules and SB selection rules compared (`helpers.experiments.rules_report`,
   which builds on this module; `python -m helpers reproduce --rules` runs it into the same folder and manifest).

Every cell is cached (`helpers.experiments.results.CellCache`): a rerun skips finished work
and an interrupted run loses at most the cell in progress. Each file written is
recorded in `figures/manifest.json` with the settings that produced it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from helpers.analysis.redundancy import cached_layer_redundancy
from helpers.compression.allocation import ModelShape, allocate, matched_sp, sliced_param_count
from helpers.compression.checkpoints import load_model
from helpers.compression.ledger import ledger_totals, parameter_ledger
from helpers.compression.sliced_io import save_sliced
from helpers.compression.slicing import rotate_and_slice
from helpers.evaluation import speed, stats
from helpers.evaluation.perplexity import perplexity_on_ids
from helpers.evaluation.speed import WORKLOADS
from helpers.evaluation.stats import accuracy_se, perplexity_interval
from helpers.evaluation.tasks import PAPER_TASKS, paper_metric
from helpers.evaluation.zeroshot import evaluate_task, in_dtype
from helpers.experiments import sweeps
from helpers.experiments.compare import CompareSettings, compare, summary_table
from helpers.experiments.readings import read_depth_comparison, read_speed_table
from helpers.experiments.results import CellCache, Manifest
from helpers.experiments.sweeps import sb_values
from helpers.infra import storage
from helpers.infra.integrity import code_fingerprint
from helpers.infra.storage import DATA_DIR, FIGURES_DIR, cache_key, markdown_table, slug, write_text_atomic
from helpers.infra.textdata import CALIB_TEXT, EVAL_TEXT, bos_id, load_split, load_windows
from helpers.models.loading import DEFAULT_MODEL, model_label, pick_device
from helpers.ui import plots

# The modules whose source shapes a sweep cell's numbers: a change to any of them computes fresh cells. Of this
# module only `Lab` and `cell_result` compute cells (`Settings.cell_params` adds them); the rest writes reports.
CELL_CODE = (
    "helpers.compression.allocation",
    "helpers.analysis.redundancy",
    "helpers.analysis.capture",
    "helpers.compression.slicing",
    "helpers.evaluation.perplexity",
    "helpers.evaluation.zeroshot",
    "helpers.evaluation.tasks",
    "helpers.infra.textdata",
    "helpers.models.loading",
    "helpers.compression.checkpoints",
    "helpers.compression.ledger",
    "helpers.experiments.sweeps",
)


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
    dtype: str = "bfloat16"  # zero-shot scoring only; slicing and PCA stay float32/float64
    speed_prompt: int = 128
    speed_new_tokens: int = 16  # the full-size workloads are scripts/bench_speed.py's
    depth: bool = True  # also run the depth-pruning comparison
    depth_steps: int = 150  # replacement training steps in the depth comparison
    rules: bool = False  # also compare allocation and SB selection rules (helpers.experiments.rules_report)
    rules_sps: tuple[float, ...] = (0.30, 0.40)  # the SPs of the allocation-rules comparison (a subset of sps)
    seed: int = 0

    def cell_params(self, **coordinates) -> dict:
        """The fields that change a sweep cell's numbers, plus the cell's coordinates."""
        keep = (
            "model",
            "calib_text",
            "select_text",
            "seqlen",
            "calib_windows",
            "select_windows",
            "eval_texts",
            "eval_windows",
            "tasks",
            "limit",
            "task_limits",
            "dtype",
            "seed",
        )
        code = code_fingerprint(*CELL_CODE, Lab, cell_result)
        return {**{k: getattr(self, k) for k in keep}, "code": code, **coordinates}

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


class Lab:
    """The dense model, its LR and the token windows, loaded once and shared by every cell."""

    def __init__(self, settings: Settings, progress: bool = True) -> None:
        s = self.settings = settings
        self.progress = progress
        self.model, self.tokenizer = load_model(s.model, device="cpu")
        self.calib = load_windows(self.tokenizer, s.calib_text, s.seqlen, s.calib_windows)
        skip = s.calib_windows if s.select_text == s.calib_text else 0  # never select on calibration windows
        _, self.select = load_split(self.tokenizer, s.select_text, s.seqlen, skip, s.select_windows)
        if s.select_text in s.eval_texts:
            raise ValueError(f"The selection text {s.select_text!r} must not be an evaluation text.")
        self.eval = torch.cat([load_windows(self.tokenizer, t, s.seqlen, s.eval_windows) for t in s.eval_texts])
        self.lr = cached_layer_redundancy(
            s.model, s.calib_text, s.seqlen, s.calib_windows, progress=progress, loaded=(self.model, self.tokenizer)
        )

    def allocation(self, sp: float, sb: float):
        """The allocation (fractions and kept dimensions) for (SP, SB)."""
        return allocate(self.lr["lr"].to_numpy(), sp, sb, self.model.config.hidden_size)

    def sliced_sp(self, sp: float, sb: float) -> float:
        """The SP a cell is sliced at: SP itself for constant slicing, else the SP matching constant's size."""
        if np.isclose(sb, sp):
            return sp
        shape = ModelShape.from_config(self.model.config)
        target = int(sliced_param_count(shape, self.allocation(sp, sp).kept_dim)["total"])
        return matched_sp(self.lr["lr"].to_numpy(), target, sb, shape)

    def sliced(self, sp: float, sb: float) -> torch.nn.Module:
        """A freshly sliced copy of the dense model at (SP, SB)."""
        torch.manual_seed(self.settings.seed)
        model = copy.deepcopy(self.model)
        dims = [int(d) for d in self.allocation(self.sliced_sp(sp, sb), sb).kept_dim]
        rotate_and_slice(model, self.calib, dims, progress=False)
        return model

    def measure(self, model: torch.nn.Module) -> dict:
        """Parameter count, both perplexities (with each window's NLL) and zero-shot answers of one model."""
        s = self.settings
        held_out = perplexity_on_ids(model, self.eval, progress=False)
        scored = in_dtype(model, getattr(torch, s.dtype))
        tasks = {}
        for task in s.tasks:
            r = evaluate_task(scored, self.tokenizer, task, s.task_limit(task))
            pred = r.pred if paper_metric(task) == "acc" else r.pred_norm
            tasks[task] = {**r.summary, "correct": (pred == r.labels).astype(int).tolist()}
        return {
            "params": ledger_totals(parameter_ledger(model))["total"],
            "ppl_select": perplexity_on_ids(model, self.select, progress=False).perplexity,
            "ppl_eval": held_out.perplexity,
            "eval_window_nll": list(held_out.window_nll),
            "eval_window_tokens": list(held_out.window_tokens),
            "tasks": tasks,
        }


def sweep_cells(settings: Settings) -> list[tuple[float, float | None]]:
    """Every cell of the sweep as (SP, SB); (0, None) is the dense model."""
    return [(0.0, None)] + [(sp, sb) for sp in settings.sps for sb in sb_values(sp, settings.sb_step)]


def speed_folder(settings: Settings, sp: float, sb: float) -> Path:
    """Where the speed step keeps the sliced model of cell (SP, SB)."""
    key = cache_key(**settings.cell_params(sp=sp, sb=sb))
    return DATA_DIR / "sliced" / "reproduce" / f"{slug(settings.model)}-{key}"


def cell_result(lab: Lab, cache: CellCache, sp: float, sb: float | None) -> dict:
    """One cell's measurements, from the cache or computed and cached (atomically).

    A sliced model at the first SP is also saved for the speed step, which would otherwise slice it again.
    """
    s = lab.settings
    if sb is None:
        return cache.get_or_compute(s.cell_params(kind="dense"), lambda: lab.measure(lab.model))

    def compute() -> dict:
        model = lab.sliced(sp, sb)
        folder = speed_folder(s, sp, sb)
        if np.isclose(sp, s.sps[0]) and not (folder / "slicing.json").exists():
            save_sliced(model, lab.tokenizer, folder)
        return lab.measure(model)

    return cache.get_or_compute(s.cell_params(kind="sliced", sp=sp, sb=sb), compute)


def sweep(lab: Lab, cache: CellCache | None = None) -> pd.DataFrame:
    """Dense plus every (SP, SB) cell, computed or read from the cache; one flat row per cell."""
    s, cache = lab.settings, cache or CellCache("sweep")
    rows = []
    for sp, sb in tqdm(sweep_cells(s), desc="sweep cells", unit="cell", disable=not lab.progress):
        result = cell_result(lab, cache, sp, sb)
        if sb is None:
            rows.append({"method": "dense", "sp": 0.0, "sb": 0.0, "sliced_sp": 0.0, "realised_slice": 0.0, **result})
            continue
        sliced_sp = lab.sliced_sp(sp, sb)
        realised = 1 - float(np.mean(lab.allocation(sliced_sp, sb).kept_dim)) / lab.model.config.hidden_size
        method = "constant" if np.isclose(sb, sp) else "dynamic"
        row = {"method": method, "sp": sp, "sb": sb, "sliced_sp": sliced_sp, "realised_slice": realised}
        rows.append({**row, **result})
    return flatten(rows, s.tasks)


RAW = ("tasks", "eval_window_nll", "eval_window_tokens")  # per-question and per-window records of a cell


def flatten(rows: list[dict], tasks: tuple[str, ...]) -> pd.DataFrame:
    """One column per task (the paper's metric) with its standard error, their average, the perplexity interval.

    The per-question answers and per-window NLLs stay in the `raw` column (for paired comparisons, not written).
    """
    flat = []
    for row in rows:
        out = {k: v for k, v in row.items() if k not in RAW}
        for task in tasks:
            out[task] = row["tasks"][task][paper_metric(task)]
            out[f"{task}_se"] = accuracy_se(np.array(row["tasks"][task]["correct"]))
        out["average"] = float(np.mean([out[t] for t in tasks]))
        ci = perplexity_interval(row["eval_window_nll"], row["eval_window_tokens"])
        out["ppl_eval_low"], out["ppl_eval_high"] = ci.low, ci.high
        out["questions"] = int(sum(row["tasks"][t]["n"] for t in tasks))
        out["raw"] = {k: row[k] for k in RAW}
        flat.append(out)
    return pd.DataFrame(flat)


def best_dynamic(cells: pd.DataFrame) -> pd.DataFrame:
    """For each SP, the dynamic cell (SB < SP) with the lowest selection-book perplexity (sweeps.best_dynamic)."""
    return sweeps.best_dynamic(cells, "ppl_select")


def results_table(cells: pd.DataFrame, tasks: tuple[str, ...]) -> pd.DataFrame:
    """The paper-style table: rows method x SP; tasks, average, perplexity, parameters kept."""
    picked = pd.concat([cells[cells["method"].isin(["dense", "constant"])], best_dynamic(cells)])
    dense_params = int(cells.loc[cells["method"] == "dense", "params"].iloc[0])
    table = picked.assign(params_kept=picked["params"] / dense_params)
    table = table.sort_values(
        ["sp", "method"], key=lambda c: c.map({"dense": 0, "constant": 1, "dynamic": 2}) if c.name == "method" else c
    )
    columns = [
        "method",
        "sp",
        "sb",
        "realised_slice",
        *[c for t in tasks for c in (t, f"{t}_se")],
        "average",
        "ppl_eval",
        "ppl_eval_low",
        "ppl_eval_high",
        "params",
        "params_kept",
        "questions",
    ]
    return table[columns].reset_index(drop=True)


def comparisons_table(cells: pd.DataFrame, tasks: tuple[str, ...]) -> pd.DataFrame:
    """Best dynamic minus constant at each SP, on the same questions and windows: paired 95% intervals, verdicts.

    Accuracy rows also carry McNemar's exact p-value and its Holm adjustment over every accuracy row of the
    table (the several comparisons made at once); the verdict itself is read from the bootstrap interval.
    """
    constant = cells[cells["method"] == "constant"].set_index("sp")
    rows = []
    for dyn in best_dynamic(cells).itertuples():
        const = constant.loc[dyn.sp]
        a, b = dyn.raw["tasks"], const["raw"]["tasks"]
        base = {"sp": dyn.sp, "sb": dyn.sb, "params_dynamic": dyn.params, "params_constant": const["params"]}
        for task in tasks:
            cmp = stats.paired_accuracy(a[task]["correct"], b[task]["correct"])
            p = stats.mcnemar(a[task]["correct"], b[task]["correct"])
            rows.append({**base, "metric": task, "dynamic": getattr(dyn, task), "constant": const[task]})
            rows[-1].update(cmp.as_dict(), mcnemar_p=p)
        cmp = stats.paired_average([a[t]["correct"] for t in tasks], [b[t]["correct"] for t in tasks])
        rows.append({**base, "metric": "average", "dynamic": dyn.average, "constant": const["average"]})
        rows[-1].update(cmp.as_dict())
        nll_a, nll_b = dyn.raw["eval_window_nll"], const["raw"]["eval_window_nll"]
        cmp = stats.paired_perplexity(nll_a, nll_b, dyn.raw["eval_window_tokens"])
        rows.append({**base, "metric": "perplexity", "dynamic": dyn.ppl_eval, "constant": const["ppl_eval"]})
        rows[-1].update(cmp.as_dict())
    table = pd.DataFrame(rows)
    tested = table["metric"].isin(tasks)
    table.loc[tested, "holm_p"] = stats.holm(table.loc[tested, "mcnemar_p"].to_numpy())
    return table


def reading_intervals(cells: pd.DataFrame, tasks: tuple[str, ...]) -> dict:
    """The paired 95% intervals `readings.read_results_table` reads: dynamic - constant per SP (average accuracy
    and perplexity), and every compressed row's accuracy - the dense model's per task."""
    from helpers.evaluation import stats

    comparisons = comparisons_table(cells, tasks).set_index(["sp", "metric"])
    pick = {sp: comparisons.loc[sp] for sp in comparisons.index.get_level_values("sp").unique()}
    dense = cells[cells["method"] == "dense"].iloc[0]["raw"]["tasks"]
    rows = pd.concat([best_dynamic(cells), cells[cells["method"] == "constant"]])
    return {
        "accuracy_intervals": {sp: tuple(t.loc["average", ["low", "high"]]) for sp, t in pick.items()},
        "perplexity_intervals": {sp: tuple(t.loc["perplexity", ["low", "high"]]) for sp, t in pick.items()},
        "task_intervals": {
            (row.method, row.sp, task): _interval(
                stats.paired_accuracy(row.raw["tasks"][task]["correct"], dense[task]["correct"])
            )
            for row in rows.itertuples()
            for task in tasks
        },
    }


def _interval(comparison) -> tuple[float, float]:
    return comparison.low, comparison.high


def comparison_statements(table: pd.DataFrame, model: str) -> str:
    """README sentences on dynamic vs constant slicing, generated from the paired intervals."""
    lines = []
    for sp, rows in table.groupby("sp"):
        r = rows.set_index("metric")
        avg, ppl = r.loc["average"], r.loc["perplexity"]
        lines.append(
            f"- SP = {sp:.2f} ({model}; dynamic SB = {avg['sb']:.2f} with {int(avg['params_dynamic']):,} parameters, "
            f"constant {int(avg['params_constant']):,}): average accuracy dynamic minus constant "
            f"{100 * avg['diff']:+.1f} points (95% paired interval "
            f"{100 * avg['low']:+.1f} to {100 * avg['high']:+.1f}, "
            f"{avg['n']} questions): **{avg['verdict']}**; held-out perplexity {ppl['diff']:+.2f} "
            f"({ppl['low']:+.2f} to {ppl['high']:+.2f}, {ppl['n']} windows): **{ppl['verdict']}**."
        )
    per_task = table[table["holm_p"].notna()]
    by_interval = int((per_task["verdict"] != "not resolved").sum())
    lines.append(
        f"- Per task: {len(per_task)} paired accuracy comparisons; {by_interval} resolved by their 95% interval, "
        f"{int((per_task['holm_p'] <= 0.05).sum())} significant by McNemar after Holm correction."
    )
    return "\n".join(lines) + "\n"


def write_table(
    table: pd.DataFrame, stem: Path, manifest: Manifest, step: str, cells: tuple[str, ...] = ("sweep",), **params
) -> list[Path]:
    """`storage.write_table` (without the per-question `raw` column), then both files recorded in the manifest
    as built from the cells of the `cells` caches."""
    files = storage.write_table(table.drop(columns=["raw"], errors="ignore"), stem)
    manifest.record(files, step, cells=cells, **params)
    return files


def results_summary(results: pd.DataFrame, comparisons: pd.DataFrame, settings: Settings, bos: bool) -> str:
    """The README's results table and statements: accuracy +/- SE, perplexity with its 95% interval.

    `bos`: whether every window starts with the BOS token (the model family's choice).
    """
    tasks = list(settings.tasks)
    sizes = ", ".join(f"{t} {settings.task_limit(t) or 'all'}" for t in tasks)
    intro = (
        f"{model_label(settings.model)}; {int(results['questions'].iloc[0])} questions per model "
        f"({sizes}), zero-shot scored in "
        f"{settings.dtype}; perplexity on {len(settings.eval_texts) * settings.eval_windows} x {settings.seqlen} "
        f"tokens of {', '.join(settings.eval_texts)} ({'BOS first' if bos else 'no BOS'}). "
        "Accuracy +/- one standard error; perplexity with its 95% bootstrap interval over windows."
    )
    rows = []
    for r in results.itertuples():
        se = np.sqrt(sum(getattr(r, f"{t}_se") ** 2 for t in tasks)) / len(tasks)
        sp, sb = ("-", "-") if r.method == "dense" else (f"{r.sp:.2f}", f"{r.sb:.2f}")
        accuracy = f"{r.average:.3f} +/- {se:.3f}"
        perplexity = f"{r.ppl_eval:.1f} ({r.ppl_eval_low:.1f}-{r.ppl_eval_high:.1f})"
        rows.append([r.method, sp, sb, f"{r.realised_slice:.3f}", f"{r.params:,}", accuracy, perplexity])
    header = "method | SP | SB | realised slice | parameters | average accuracy | perplexity (95% interval)"
    return (
        f"{intro}\n\n{markdown_table(header, rows)}"
        + "\nDynamic minus constant slicing at the same parameter count (paired):\n\n"
        + comparison_statements(comparisons, model_label(settings.model))
    )


def write_comparisons(
    cells: pd.DataFrame, results: pd.DataFrame, lab: Lab, out: Path, manifest: Manifest
) -> pd.DataFrame:
    """The paired dynamic-vs-constant table and the README text generated from it (`results_summary.md`)."""
    settings = lab.settings
    table = comparisons_table(cells, settings.tasks)
    write_table(table, out / "comparisons", manifest, "comparisons", **settings.cell_params())
    summary = results_summary(results, table, settings, bos=bos_id(lab.tokenizer) is not None)
    text = write_text_atomic(out / "results_summary.md", summary)
    manifest.record(text, "results_summary", cells=("sweep",), **settings.cell_params())
    return table


def speed_workloads(settings: Settings) -> tuple:
    """Prefill of 1 and 8 prompts of `speed_prompt` tokens; `speed_new_tokens` generated at batch 1 and 16."""
    return tuple(
        dataclasses.replace(w, length=settings.speed_prompt, new_tokens=0)
        if w.kind == "prefill"
        else dataclasses.replace(w, new_tokens=settings.speed_new_tokens)
        for w in WORKLOADS
    )


def speed_table(lab: Lab, cells: pd.DataFrame, cache: CellCache | None = None) -> pd.DataFrame:
    """Interleaved speed benchmark (`speed`) of dense, constant and best dynamic at the first SP, float32.

    One SP keeps the step short: `scripts/bench_speed.py` runs the full-size workloads in both dtypes.

    Each model runs in its own worker process; sliced ones are saved once under
    data/sliced/reproduce/ (`speed_folder`). The raw samples are cached as one cell.
    """
    s, cache = lab.settings, cache or CellCache("speed")
    picked = pd.concat([cells[cells["method"].isin(["dense", "constant"])], best_dynamic(cells)])
    picked = picked[np.isclose(picked["sp"], 0.0) | np.isclose(picked["sp"], s.sps[0])]
    models = {}
    for row in picked.itertuples():
        if row.method == "dense":
            models["dense"] = s.model
            continue
        folder = speed_folder(s, row.sp, row.sb)
        if not (folder / "slicing.json").exists():  # saved by the sweep unless its cell came from the cache
            save_sliced(lab.sliced(row.sp, row.sb), lab.tokenizer, folder)
        models[f"{row.method} SP={row.sp:g} SB={row.sb:g}"] = str(folder)
    workloads = speed_workloads(s)
    params = {
        "kind": "interleaved",
        "models": sorted(models),
        "workloads": [w.name for w in workloads],
        "speed_code": code_fingerprint(speed),
        **s.cell_params(),
    }

    def measure() -> dict:
        samples = speed.interleaved_benchmark(models, "float32", workloads, progress=lab.progress)
        return {"samples": samples.to_dict("records")}

    return speed.summarise(pd.DataFrame(cache.get_or_compute(params, measure)["samples"]))


def write_speed_report(summary: pd.DataFrame, settings: Settings, out: Path, manifest: Manifest) -> None:
    """speed_table.csv (every column of `speed.summarise`) and speed_table.md: what was run, the benchmark's
    table (`speed.speed_markdown`) and one generated reading per sliced model and workload."""
    header = (
        f"{model_label(settings.model)}; {speed.device_name(pick_device(None), threads=False)}, one torch thread per "
        f"worker process; prompts of {settings.speed_prompt} tokens, {settings.speed_new_tokens} new tokens "
        "(scripts/bench_speed.py runs the full-size workloads); one warm-up round, then interleaved rounds; "
        "median [interquartile range]; ratio = the per-round tokens/s over dense's.\n\n"
    )
    text = header + speed.speed_markdown(summary) + "\n" + read_speed_table(summary) + "\n"
    params = {"prompt": settings.speed_prompt, "new_tokens": settings.speed_new_tokens, **settings.cell_params()}
    manifest.record(storage.write_csv_atomic(summary, out / "speed_table.csv"), "speed", cells=("speed",), **params)
    manifest.record(write_text_atomic(out / "speed_table.md", text), "speed", cells=("speed",), **params)


def figures(lab: Lab, cells: pd.DataFrame, out: Path, manifest: Manifest) -> None:
    """Figure 1, Figures 2-5 (one per SP), the perplexity comparison."""
    s = lab.settings
    best = best_dynamic(cells).set_index("sp")
    sp0 = s.sps[0]
    sb0 = float(best.loc[sp0, "sb"]) if sp0 in best.index else 0.0
    fig = plots.plot_allocation(
        lab.allocation(lab.sliced_sp(sp0, sb0), sb0), title=f"{s.model}: SP={sp0}, SB={sb0} (best by perplexity)"
    )
    files = plots.save_figure(fig, out / "figure1_allocation")
    manifest.record(files, "figure1", cells=("sweep",), sp=sp0, sb=sb0, **s.cell_params())
    limits = plots.accuracy_limits(cells, list(s.tasks))
    dense = cells[cells["method"] == "dense"].iloc[0]
    for index, sp in enumerate(s.sps, start=2):
        fig = plots.plot_accuracy_vs_sb(cells[cells["sp"] == sp], list(s.tasks), sp, dense, limits)
        files = plots.save_figure(fig, out / f"figure{index}_accuracy_vs_sb_sp{round(sp * 100)}")
        manifest.record(files, "accuracy_vs_sb", cells=("sweep",), sp=sp, **s.cell_params())
    fig = plots.plot_perplexity_comparison(cells, best.reset_index())
    files = plots.save_figure(fig, out / "perplexity_comparison")
    manifest.record(files, "perplexity_comparison", cells=("sweep",), **s.cell_params())


def depth_comparison(settings: Settings, sb: float, out: Path, manifest: Manifest, progress: bool) -> pd.DataFrame:
    """Depth pruning vs slicing at the parameter count of constant slicing at the first SP (notebook 05)."""
    compare_settings = CompareSettings(
        model=settings.model,
        calib=settings.calib_text,
        seqlen=settings.seqlen,
        calib_windows=settings.calib_windows,
        train_windows=settings.calib_windows // 2,
        max_steps=settings.depth_steps,
        slice_fraction=settings.sps[0],
        base_slice=sb,
        eval_text=settings.eval_texts[0],
        eval_seqlen=settings.seqlen,
        eval_windows=settings.eval_windows,
        tasks=settings.tasks,
        task_limit=settings.limit,
        dtype=settings.dtype,
    )
    table, _ = compare(compare_settings, progress=progress)
    params = dataclasses.asdict(compare_settings)
    files = storage.write_table(table, out / "depth_comparison")
    manifest.record(files, "depth_comparison", cells=("depth_compare",), **params)
    summary = write_text_atomic(out / "depth_summary.md", f"{summary_table(table)}\n{read_depth_comparison(table)}\n")
    manifest.record(summary, "depth_summary", cells=("depth_compare",), **params)
    return table


def reproduce(
    settings: Settings, out: Path = FIGURES_DIR, progress: bool = True, executor: str = "inprocess"
) -> dict[str, pd.DataFrame]:
    """Run every step and write figures, tables and the manifest into `out`; returns the tables.

    With `executor` local, slurm or ray the sweep cells run first as independent jobs (`run_cells`).
    """
    started = time.time()
    manifest = Manifest(out, model=settings.model, seed=settings.seed, settings=dataclasses.asdict(settings))
    lab = Lab(settings, progress)  # also caches the LR scores before any job needs them
    run_cells(settings, executor)
    cells = sweep(lab)
    tables = {"cells": cells, "results": results_table(cells, settings.tasks)}
    write_table(cells, out / "sweep_cells", manifest, "sweep", **settings.cell_params())
    write_table(tables["results"], out / "results_table", manifest, "results_table", **settings.cell_params())
    tables["comparisons"] = write_comparisons(cells, tables["results"], lab, out, manifest)
    figures(lab, cells, out, manifest)
    tables["speed"] = speed_table(lab, cells)
    write_speed_report(tables["speed"], settings, out, manifest)
    if settings.depth:
        tables["depth"] = depth_comparison(
            settings, float(best_dynamic(cells).set_index("sp").loc[settings.sps[0], "sb"]), out, manifest, progress
        )
    if progress:
        print(f"reproduce ({settings.model}) finished in {(time.time() - started) / 60:.1f} min; see {out}")
    return tables


def check(
    settings: Settings, out: Path = FIGURES_DIR, sample: tuple[str, ...] = ("dense", "constant")
) -> dict[str, float]:
    """Recompute the first committed cell of each method in `sample` (no cache) against `out`/sweep_cells.csv.

    Returns the largest relative difference over parameters and both perplexities (float rounding only),
    and the largest accuracy difference in points, kept apart: scoring runs in bfloat16, whose products
    round differently on another CPU, flipping answers the model nearly ties.
    """
    committed = pd.read_csv(out / "sweep_cells.csv")
    lab = Lab(settings, progress=False)
    gaps = {"relative": 0.0, "accuracy_points": 0.0}
    for method in sample:
        row = committed[committed["method"] == method].iloc[0]
        model = lab.model if method == "dense" else lab.sliced(float(row["sp"]), float(row["sb"]))
        fresh = flatten([{**lab.measure(model), "method": method}], settings.tasks).iloc[0]
        for column in ("params", "ppl_select", "ppl_eval", *settings.tasks):
            old, new = float(row[column]), float(fresh[column])
            print(f"{method:>9} {column:>14}: committed {old:.6g}, now {new:.6g}")
            if column in settings.tasks:
                gaps["accuracy_points"] = max(gaps["accuracy_points"], 100 * abs(new - old))
            else:
                gaps["relative"] = max(gaps["relative"], abs(new - old) / max(abs(old), 1e-12))
    return gaps


# ---------------------------------------------------------------------------------------------
# Sweep cells as independent jobs on an existing engine (submitit: SLURM or local; Ray)
# ---------------------------------------------------------------------------------------------

EXECUTORS = ("inprocess", "local", "slurm", "ray")


def compute_cell(settings: Settings, sp: float, sb: float | None, cache_root: Path | None = None) -> dict:
    """One sweep cell as a self-contained job: load the lab, compute the cell, write it to the cell cache.

    `cache_root` (default data/cache) must be on a filesystem every worker
    shares; the cache file is written atomically, so a job killed halfway
    leaves nothing and a rerun recomputes only missing cells.
    """
    torch.set_num_threads(max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", torch.get_num_threads()))))
    return cell_result(Lab(settings, progress=False), CellCache("sweep", cache_root), sp, sb)


def missing_cells(settings: Settings, cache_root: Path | None = None) -> list[tuple[float, float | None]]:
    """The sweep cells with no cached result yet (what a resumed run still has to do)."""
    cache = CellCache("sweep", cache_root)
    cells = []
    for sp, sb in sweep_cells(settings):
        coords = {"kind": "dense"} if sb is None else {"kind": "sliced", "sp": sp, "sb": sb}
        if cache.get(settings.cell_params(**coords)) is None:
            cells.append((sp, sb))
    return cells


def run_cells(
    settings: Settings,
    executor: str,
    cache_root: Path | None = None,
    log_folder: Path | None = None,
    timeout_min: int = 240,
) -> int:
    """Run every missing sweep cell as its own job on `executor` and wait; returns how many ran.

    local and slurm use submitit (a SLURM job array; its LocalExecutor runs the
    jobs as local processes), ray uses Ray tasks (on the cluster at RAY_ADDRESS, or a
    local Ray instance). "inprocess" runs nothing here: `sweep` computes cells itself.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}.")
    todo = missing_cells(settings, cache_root)
    if executor == "inprocess" or not todo:
        return 0
    if executor == "ray":
        import ray

        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=1)(compute_cell)
        ray.get([remote.remote(settings, sp, sb, cache_root) for sp, sb in todo])
        return len(todo)
    import submitit

    folder = log_folder or DATA_DIR / "jobs" / "%j"
    if executor == "local":
        engine = submitit.LocalExecutor(folder=folder)
        engine.update_parameters(timeout_min=timeout_min)
    else:
        engine = submitit.AutoExecutor(folder=folder, cluster="slurm")
        engine.update_parameters(timeout_min=timeout_min, cpus_per_task=4, slurm_array_parallelism=len(todo))
    with engine.batch():
        jobs = [engine.submit(compute_cell, settings, sp, sb, cache_root) for sp, sb in todo]
    for job in jobs:
        job.result()  # raises with the job's own traceback if a cell failed
    return len(todo)
