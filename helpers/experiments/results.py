"""Resumable experiment cells and the manifest of what produced each figure.

A sweep is a set of cells (one slicing + evaluation each). `CellCache` stores
every finished cell as its own JSON file keyed by its parameters, so a rerun
skips finished cells and an interrupted sweep loses at most the cell in
progress. `Manifest` records, for every file written to `figures/`, the step,
model, data, parameters, seed, package versions, machine and time that produced it.
bfloat16 scores can differ between CPUs, so every cell stores the machine that computed
it, and a file built from cached cells names their machines as well as its own.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from helpers.infra.integrity import discard, machine_name, package_versions
from helpers.infra.storage import CACHE_DIR, cache_key, write_json_atomic

NOT_RECORDED = "not recorded"  # the machine of a cell cached before cells stored it


class CellCache:
    """One JSON file per finished cell under `data/cache/<name>/`.

    `served[name]` collects, for this process, the machines that computed the cells each cache returned
    (cached or fresh): what `Manifest.record(..., cells=(name,))` names beside the writing machine.
    """

    served: ClassVar[dict[str, set[str]]] = {}

    def __init__(self, name: str, root: Path | None = None) -> None:
        self.name = name
        self.folder = (root or CACHE_DIR) / name

    def path(self, params: dict[str, Any]) -> Path:
        return self.folder / f"{cache_key(**params)}.json"

    def get(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """The cached result, or None when absent; an unreadable entry is reported, removed and so recomputed."""
        path = self.path(params)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            result = entry["result"]
            if not isinstance(result, dict):
                raise TypeError(f"result is {type(result).__name__}, not an object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            discard(path, f"{type(err).__name__}: {err}")
            return None
        self._serve(str(entry.get("machine", NOT_RECORDED)))
        return result

    def _serve(self, machine: str) -> None:
        CellCache.served.setdefault(self.name, set()).add(machine)

    def get_or_compute(self, params: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Return the cached result for `params`, or compute, store atomically and return it."""
        cached = self.get(params)
        if cached is not None:
            return cached
        result = compute()
        machine = machine_name()
        write_json_atomic(
            self.path(params), {"params": params, "result": result, "finished": _now(), "machine": machine}
        )
        self._serve(machine)
        return result


class Manifest:
    """What produced each output file; saved as `manifest.json` in the output folder."""

    def __init__(self, folder: Path, **common: Any) -> None:
        self.path = Path(folder) / "manifest.json"
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.files: dict[str, Any] = previous.get("files", {})
        self.common = {**common, "versions": package_versions()}
        self.machine = machine_name()

    def record(self, files: list[Path] | Path, step: str, cells: tuple[str, ...] = (), **params: Any) -> None:
        """Note that `step` with `params` wrote `files`, and save the manifest at once.

        `cells`: the `CellCache` names whose cells the files were built from; the machines that computed
        those cells (`CellCache.served`) are recorded as `cells_machines`.
        """
        entry = {"step": step, "params": params, "machine": self.machine, "written": _now()}
        computed = sorted(set().union(*(CellCache.served.get(name, set()) for name in cells)))
        if computed:
            entry["cells_machines"] = computed
        for file in [files] if isinstance(files, Path) else files:
            name = str(Path(file).resolve().relative_to(self.path.parent.resolve()))
            self.files[name] = dict(entry)
        write_json_atomic(self.path, {**self.common, "files": dict(sorted(self.files.items()))})


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
