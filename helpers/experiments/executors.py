"""Sweep cells as independent jobs on an existing engine (submitit: SLURM or local; Ray).

A job computes one cell into the shared cell cache (atomically); `run_cells` submits the missing ones and waits.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from helpers.experiments.cells import Lab, cell_params, cell_result, sweep_cells
from helpers.experiments.presets import Settings
from helpers.experiments.results import CellCache
from helpers.infra.storage import DATA_DIR

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
        if cache.get(cell_params(settings, **coords)) is None:
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
