"""The reproduce command's outputs from the sweep's cells: tables, generated statements, figures, speed, depth.

Every writer records its files in the manifest with the settings and cells they were built from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.compression.sliced_io import save_sliced
from helpers.evaluation import speed, stats
from helpers.evaluation.speed import WORKLOADS
from helpers.experiments.cells import Lab, best_dynamic, cell_params, speed_folder
from helpers.experiments.compare import CompareSettings, compare, summary_table
from helpers.experiments.presets import Settings
from helpers.experiments.readings import read_depth_comparison, read_speed_table
from helpers.experiments.results import CellCache, Manifest
from helpers.infra import storage
from helpers.infra.integrity import code_fingerprint
from helpers.infra.storage import markdown_table, write_text_atomic
from helpers.infra.textdata import bos_id
from helpers.models.loading import model_label, pick_device
from helpers.ui import plots


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
    write_table(table, out / "comparisons", manifest, "comparisons", **cell_params(settings))
    summary = results_summary(results, table, settings, bos=bos_id(lab.tokenizer) is not None)
    text = write_text_atomic(out / "results_summary.md", summary)
    manifest.record(text, "results_summary", cells=("sweep",), **cell_params(settings))
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
        **cell_params(s),
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
    params = {"prompt": settings.speed_prompt, "new_tokens": settings.speed_new_tokens, **cell_params(settings)}
    manifest.record(storage.write_csv_atomic(summary, out / "speed_table.csv"), "speed", cells=("speed",), **params)
    manifest.record(write_text_atomic(out / "speed_table.md", text), "speed", cells=("speed",), **params)


def figures(lab: Lab, cells: pd.DataFrame, out: Path, manifest: Manifest) -> None:
    """Figure 1, Figures 2-5 (one per SP), the perplexity comparison."""
    s = lab.settings
    best = best_dynamic(cells).set_index("sp")
    sp0 = s.sps[0]
    sb0 = float(best.loc[sp0, "sb"]) if sp0 in best.index else 0.0
    fig = plots.plot_allocation(lab.allocation(sp0, sb0), title=f"{s.model}: SP={sp0}, SB={sb0} (best by perplexity)")
    files = plots.save_figure(fig, out / "figure1_allocation")
    manifest.record(files, "figure1", cells=("sweep",), sp=sp0, sb=sb0, **cell_params(s))
    limits = plots.accuracy_limits(cells, list(s.tasks))
    dense = cells[cells["method"] == "dense"].iloc[0]
    for index, sp in enumerate(s.sps, start=2):
        fig = plots.plot_accuracy_vs_sb(cells[cells["sp"] == sp], list(s.tasks), sp, dense, limits)
        files = plots.save_figure(fig, out / f"figure{index}_accuracy_vs_sb_sp{round(sp * 100)}")
        manifest.record(files, "accuracy_vs_sb", cells=("sweep",), sp=sp, **cell_params(s))
    fig = plots.plot_perplexity_comparison(cells, best.reset_index())
    files = plots.save_figure(fig, out / "perplexity_comparison")
    manifest.record(files, "perplexity_comparison", cells=("sweep",), **cell_params(s))


def depth_settings(settings: Settings, sb: float) -> CompareSettings:
    """The depth comparison's settings at the first SP of `settings`, dynamic slicing at base slice `sb`."""
    return CompareSettings(
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


def depth_comparison(settings: Settings, sb: float, out: Path, manifest: Manifest, progress: bool) -> pd.DataFrame:
    """Depth pruning vs slicing at the parameter count of constant slicing at the first SP (notebook 05)."""
    compare_settings = depth_settings(settings, sb)
    table, _ = compare(compare_settings, progress=progress)
    params = dataclasses.asdict(compare_settings)
    files = storage.write_table(table, out / "depth_comparison")
    manifest.record(files, "depth_comparison", cells=("depth_compare",), **params)
    summary = write_text_atomic(out / "depth_summary.md", f"{summary_table(table)}\n{read_depth_comparison(table)}\n")
    manifest.record(summary, "depth_summary", cells=("depth_compare",), **params)
    return table
