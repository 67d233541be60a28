"""Resumable experiment cells and the manifest of what produced each figure.

A sweep is a set of cells (one slicing + evaluation each). `CellCache` stores
every finished cell as its own JSON file keyed by its parameters, so a rerun
skips finished cells and an interrupted sweep loses at most the cell in
progress. `Manifest` records, for every file written to `figures/`, the step,
model, data, parameters, seed, package versions, machine and time that produced it
(bfloat16 scores can differ between CPUs, so every file names the one it was made on).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers.infra.integrity import discard, machine_name, package_versions
from helpers.infra.storage import CACHE_DIR, cache_key, write_json_atomic


class CellCache:
    """One JSON file per finished cell under `data/cache/<name>/`."""

    def __init__(self, name: str, root: Path | None = None) -> None:
        self.folder = (root or CACHE_DIR) / name

    def path(self, params: dict[str, Any]) -> Path:
        return self.folder / f"{cache_key(**params)}.json"

    def get(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """The cached result, or None when absent; an unreadable entry is reported, removed and so recomputed."""
        path = self.path(params)
        if not path.exists():
            return None
        try:
            result = json.loads(path.read_text())["result"]
            if not isinstance(result, dict):
                raise TypeError(f"result is {type(result).__name__}, not an object")
            return result
        except (OSError, ValueError, KeyError, TypeError) as err:
            discard(path, f"{type(err).__name__}: {err}")
            return None

    def get_or_compute(self, params: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Return the cached result for `params`, or compute, store atomically and return it."""
        cached = self.get(params)
        if cached is not None:
            return cached
        result = compute()
        write_json_atomic(self.path(params), {"params": params, "result": result, "finished": _now()})
        return result


class Manifest:
    """What produced each output file; saved as `manifest.json` in the output folder."""

    def __init__(self, folder: Path, **common: Any) -> None:
        self.path = Path(folder) / "manifest.json"
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.files: dict[str, Any] = previous.get("files", {})
        self.common = {**common, "versions": package_versions()}
        self.machine = machine_name()

    def record(self, files: list[Path] | Path, step: str, **params: Any) -> None:
        """Note that `step` with `params` wrote `files`, and save the manifest at once."""
        for file in [files] if isinstance(files, Path) else files:
            name = str(Path(file).resolve().relative_to(self.path.parent.resolve()))
            self.files[name] = {"step": step, "params": params, "machine": self.machine, "written": _now()}
        write_json_atomic(self.path, {**self.common, "files": dict(sorted(self.files.items()))})


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
