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
from helpers.experiments import compare
from helpers.experiments.cells import Lab, best_dynamic, cell_params, cell_result, flatten, speed_folder
from helpers.experiments.compare import LORA, NONE, SLICING
from helpers.experiments.methods_report import comparison_table, recovery_statements, replacement_vs_lora, summary_table
from helpers.experiments.presets import Settings
from helpers.experiments.readings import read_depth_comparison, read_speed_table
from helpers.experiments.results import CellCache, Manifest
from helpers.infra import storage
from helpers.infra.integrity import code_fingerprint
from helpers.infra.storage import markdown_table, write_text_atomic
from helpers.infra.textdata import bos_id
from helpers.models.loading import model_label, pick_device
from helpers.ui import comparison_plots, plots


def recovered_rows(grid: dict, cells: pd.DataFrame, tasks: tuple[str, ...]) -> pd.DataFrame:
    """The sweep's constant and best dynamic rows at each SP of `recover_sps` after LoRA recovery (`compare.grid`),
    flattened like the sweep's cells so that the results and comparisons tables pair them."""
    picked = pd.concat([cells[cells["method"] == "constant"], best_dynamic(cells)]).set_index(["method", "sp"])
    rows = []
    for (name, sp, state), cell in grid.items():
        if state != LORA or name not in SLICING:
            continue
        method = "constant" if name == "constant slicing" else "dynamic"
        source = picked.loc[(method, sp)]
        where = {k: source[k] for k in ("sb", "sliced_sp", "realised_slice")}
        measured = {k: v for k, v in cell.items() if k not in ("info", "training")}
        rows.append(
            {"method": method, "sp": sp, **where, "recovery": LORA, "tokens": cell["training"]["tokens"], **measured}
        )
    return flatten(rows, tasks)


def _with_recovery(cells: pd.DataFrame, recovered: pd.DataFrame | None) -> pd.DataFrame:
    """The sweep's dense, constant and best dynamic rows (recovery "none"), then the recovered ones."""
    picked = pd.concat([cells[cells["method"].isin(["dense", "constant"])], best_dynamic(cells)])
    picked = picked.assign(recovery=NONE, tokens=0)
    return picked if recovered is None or recovered.empty else pd.concat([picked, recovered])


def results_table(cells: pd.DataFrame, tasks: tuple[str, ...], recovered: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper-style table: rows method x SP x recovery; tasks, average, perplexity, parameters kept."""
    picked = _with_recovery(cells, recovered)
    dense_params = int(cells.loc[cells["method"] == "dense", "params"].iloc[0])
    table = picked.assign(params_kept=picked["params"] / dense_params)
    order = {"dense": 0, "constant": 1, "dynamic": 2, NONE: 0, LORA: 1}
    table = table.sort_values(
        ["sp", "recovery", "method"], key=lambda c: c.map(order) if c.name in ("method", "recovery") else c
    )
    columns = [
        "method",
        "sp",
        "sb",
        "recovery",
        "tokens",
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


def comparisons_table(
    cells: pd.DataFrame, tasks: tuple[str, ...], recovered: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Best dynamic minus constant at each SP and recovery, on the same questions and windows: paired 95%
    intervals, verdicts.

    Accuracy rows also carry McNemar's exact p-value and its Holm adjustment over every accuracy row of the
    table (the several comparisons made at once); the verdict itself is read from the bootstrap interval.
    """
    picked = _with_recovery(cells, recovered)
    constant = picked[picked["method"] == "constant"].set_index(["sp", "recovery"])
    rows = []
    for dyn in picked[picked["method"] == "dynamic"].itertuples():
        const = constant.loc[(dyn.sp, dyn.recovery)]
        a, b = dyn.raw["tasks"], const["raw"]["tasks"]
        base = {
            "sp": dyn.sp,
            "sb": dyn.sb,
            "recovery": dyn.recovery,
            "params_dynamic": dyn.params,
            "params_constant": const["params"],
        }
        for task in tasks:
            cmp = stats.paired_accuracy(a[task]["correct"], b[task]["correct"])
            p = stats.mcnemar(a[task]["correct"], b[task]["correct"])
            rows.append({**base, "metric": task, "dynamic": getattr(dyn, task), "constant": const[task]})
            rows[-1].update(cmp.as_dict(), mcnemar_p=p)
        ordered = sorted(tasks)  # the task order of every paired average (methods_report.paired): the same draws
        cmp = stats.paired_average([a[t]["correct"] for t in ordered], [b[t]["correct"] for t in ordered])
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
    groups = sorted(table.groupby(["sp", "recovery"]), key=lambda g: (g[0][0], g[0][1] != NONE))
    for (sp, recovery), rows in groups:
        r = rows.set_index("metric")
        avg, ppl = r.loc["average"], r.loc["perplexity"]
        state = "" if recovery == NONE else ", both recovered with LoRA"
        lines.append(
            f"- SP = {sp:.2f}{state} ({model}; dynamic SB = {avg['sb']:.2f} with {int(avg['params_dynamic']):,} "
            "parameters, "
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
        recovery = r.recovery if r.recovery == NONE else f"{r.recovery}, {r.tokens:,} tokens"
        rows.append([r.method, sp, sb, recovery, f"{r.realised_slice:.3f}", f"{r.params:,}", accuracy, perplexity])
    header = "method | SP | SB | recovery | realised slice | parameters | average accuracy | perplexity (95% interval)"
    return (
        f"{intro}\n\n{markdown_table(header, rows)}"
        + "\nDynamic minus constant slicing at the same parameter count (paired), before and after recovery:\n\n"
        + comparison_statements(comparisons, model_label(settings.model))
    )


def write_comparisons(
    cells: pd.DataFrame, results: pd.DataFrame, lab: Lab, out: Path, manifest: Manifest, recovered: pd.DataFrame | None
) -> pd.DataFrame:
    """The paired dynamic-vs-constant table (before and, with `recovered`, after recovery) and the README text
    generated from it (`results_summary.md`)."""
    settings = lab.settings
    table = comparisons_table(cells, settings.tasks, recovered)
    sources = ("sweep",) if recovered is None else ("sweep", "depth_compare")
    write_table(table, out / "comparisons", manifest, "comparisons", cells=sources, **cell_params(settings))
    summary = results_summary(results, table, settings, bos=bos_id(lab.tokenizer) is not None)
    text = write_text_atomic(out / "results_summary.md", summary)
    manifest.record(text, "results_summary", cells=sources, **cell_params(settings))
    return table


def speed_workloads(settings: Settings) -> tuple:
    """Prefill of one prompt of `speed_prompt` tokens and `speed_new_tokens` generated at batch 1: the two regimes
    of the accuracy-against-speed figure (scripts/bench_speed.py runs every workload at full size)."""
    return (
        dataclasses.replace(WORKLOADS[0], length=settings.speed_prompt, new_tokens=0),
        dataclasses.replace(WORKLOADS[2], new_tokens=settings.speed_new_tokens),
    )


def speed_groups(lab: Lab, cells: pd.DataFrame, folders: dict[str, Path] | None) -> dict[float, dict[str, str]]:
    """The models the speed step times, one group per SP of `recover_sps`, dense in each: every architecture of
    the method comparison (`folders`), or without it the sweep's constant and best dynamic slicing."""
    s = lab.settings
    best = best_dynamic(cells).set_index("sp")
    groups = {}
    for sp in s.recover_sps:
        models = {"dense": s.model}
        if folders is None:
            for name, sb in (("constant slicing", sp), ("dynamic slicing", float(best.loc[sp, "sb"]))):
                folder = speed_folder(s, sp, sb)
                if not (folder / "slicing.json").exists():  # saved by the sweep unless its cell came from the cache
                    save_sliced(lab.sliced(sp, sb), lab.tokenizer, folder)
                models[f"{name} SP={sp:g}"] = str(folder)
        else:
            models.update({label: str(f) for label, f in folders.items() if label.endswith(f" SP={sp:g}")})
        groups[sp] = models
    return groups


def speed_table(
    lab: Lab, cells: pd.DataFrame, folders: dict[str, Path] | None = None, cache: CellCache | None = None
) -> pd.DataFrame:
    """Interleaved speed benchmark (`speed`) in float32 of every model in `speed_groups`, group by group.

    Each model runs in its own worker process, requests alternate between the models of a group, and
    ratios pair each sample with dense's from the same round. The raw samples are cached as one cell per group.
    """
    s, cache = lab.settings, cache or CellCache("speed")
    workloads = speed_workloads(s)
    summaries = []
    for sp, models in speed_groups(lab, cells, folders).items():
        params = {
            "kind": "interleaved",
            "models": sorted(models),
            "workloads": [w.name for w in workloads],
            "speed_code": code_fingerprint(speed),
            **cell_params(s),
        }

        def measure(models=models) -> dict:
            samples = speed.interleaved_benchmark(models, "float32", workloads, repeats=3, progress=lab.progress)
            return {"samples": samples.to_dict("records")}

        summary = speed.summarise(pd.DataFrame(cache.get_or_compute(params, measure)["samples"]))
        summaries.append(summary.assign(sp=sp))
    return pd.concat(summaries, ignore_index=True)


def write_speed_report(summary: pd.DataFrame, settings: Settings, out: Path, manifest: Manifest) -> None:
    """speed_table.csv (every column of `speed.summarise`, and the group's SP) and speed_table.md: what was run,
    the benchmark's table (`speed.speed_markdown`) and one generated reading per compressed model and workload."""
    header = (
        f"{model_label(settings.model)}; {speed.device_name(pick_device(None), threads=False)}, one torch thread per "
        f"worker process; prefill of one prompt of {settings.speed_prompt} tokens, {settings.speed_new_tokens} new "
        "tokens at batch 1 (scripts/bench_speed.py runs the full-size workloads); one group of models per SP, dense "
        "in each; one warm-up round, then interleaved rounds; median [interquartile range]; ratio = the per-round "
        "tokens/s over dense's.\n\n"
    )
    text = header + speed.speed_markdown(summary) + "\n" + read_speed_table(summary) + "\n"
    params = {"prompt": settings.speed_prompt, "new_tokens": settings.speed_new_tokens, **cell_params(settings)}
    manifest.record(storage.write_csv_atomic(summary, out / "speed_table.csv"), "speed", cells=("speed",), **params)
    manifest.record(write_text_atomic(out / "speed_table.md", text), "speed", cells=("speed",), **params)


def figures(lab: Lab, cells: pd.DataFrame, out: Path, manifest: Manifest) -> None:
    """Figure 1, Figures 2-4 (one per SP of `figure_sps`, the paper's), the perplexity comparison."""
    s = lab.settings
    best = best_dynamic(cells).set_index("sp")
    sp0 = s.figure_sps[0]
    sb0 = float(best.loc[sp0, "sb"]) if sp0 in best.index else 0.0
    fig = plots.plot_allocation(lab.allocation(sp0, sb0), title=f"{s.model}: SP={sp0}, SB={sb0} (best by perplexity)")
    files = plots.save_figure(fig, out / "figure1_allocation")
    manifest.record(files, "figure1", cells=("sweep",), sp=sp0, sb=sb0, **cell_params(s))
    limits = plots.accuracy_limits(cells, list(s.tasks))
    dense = cells[cells["method"] == "dense"].iloc[0]
    for index, sp in enumerate(s.figure_sps, start=2):
        fig = plots.plot_accuracy_vs_sb(cells[cells["sp"] == sp], list(s.tasks), sp, dense, limits)
        files = plots.save_figure(fig, out / f"figure{index}_accuracy_vs_sb_sp{round(sp * 100)}")
        manifest.record(files, "accuracy_vs_sb", cells=("sweep",), sp=sp, **cell_params(s))
    fig = plots.plot_perplexity_comparison(cells, best.reset_index())
    files = plots.save_figure(fig, out / "perplexity_comparison")
    manifest.record(files, "perplexity_comparison", cells=("sweep",), **cell_params(s))


def dynamic_sbs(cells: pd.DataFrame, sps: tuple[float, ...]) -> dict[float, float]:
    """The base slice the sweep picked for dynamic slicing at each SP of `sps`."""
    best = best_dynamic(cells).set_index("sp")
    return {sp: float(best.loc[sp, "sb"]) for sp in sps}


def method_comparison(lab: Lab, cells: pd.DataFrame, out: Path, manifest: Manifest) -> tuple[pd.DataFrame, dict]:
    """Every method at matched size at each SP of `recover_sps`, before and after recovery (`compare.grid`):
    depth_comparison.{csv,md}, replacement_vs_lora.{csv,md} and depth_summary.md with the generated statements."""
    s = lab.settings
    grid = compare.grid(lab, dynamic_sbs(cells, s.recover_sps), lab.progress)
    dense = cell_result(lab, CellCache("sweep"), 0.0, None)
    table = comparison_table(grid, dense)
    params = {**cell_params(s), "recovery": dataclasses.asdict(s.recovery())}
    manifest.record(storage.write_table(table, out / "depth_comparison"), "depth_comparison", cells=SOURCES, **params)
    replacement = replacement_vs_lora(table)
    files = storage.write_table(replacement, out / "replacement_vs_lora")
    manifest.record(files, "replacement_vs_lora", cells=SOURCES, **params)
    text = f"{summary_table(table)}\n{read_depth_comparison(table)}\n\n" + recovery_statements(
        table, grid, model_label(s.model)
    )
    manifest.record(write_text_atomic(out / "depth_summary.md", text), "depth_summary", cells=SOURCES, **params)
    return table, grid


SOURCES = ("sweep", "depth_compare")  # the caches the method comparison reads


def method_figures(table: pd.DataFrame, speed_summary: pd.DataFrame, settings: Settings, out: Path, manifest: Manifest):
    """Accuracy and perplexity against parameters removed, and accuracy against measured speed-up, every method
    before and after recovery."""
    params = {**cell_params(settings), "recovery": dataclasses.asdict(settings.recovery())}
    title = f"{model_label(settings.model)}; recovery: LoRA, {settings.recovery_tokens:,} tokens"
    files = plots.save_figure(comparison_plots.plot_methods_vs_removed(table, title), out / "accuracy_vs_removed")
    manifest.record(files, "accuracy_vs_removed", cells=SOURCES, **params)
    files = plots.save_figure(
        comparison_plots.plot_accuracy_vs_speed(table, speed_summary, title), out / "accuracy_vs_speed"
    )
    manifest.record(files, "accuracy_vs_speed", cells=(*SOURCES, "speed"), **params)
