"""Where the lab keeps its files, and writes that never leave half a file behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]  # helpers/infra/storage.py -> the repository
DATA_DIR = Path(os.environ.get("HELPERS_DATA_DIR", REPO_ROOT / "data"))
FIGURES_DIR = Path(os.environ.get("HELPERS_FIGURES_DIR", REPO_ROOT / "figures"))
CACHE_DIR = DATA_DIR / "cache"
RUNS_DIR = DATA_DIR / "runs"  # single commands write here by default; only `reproduce` writes into figures/


MARKER = ".lab-output"  # names the kind of a folder this lab wrote, so only such a folder is ever replaced
FIGURE_SUFFIXES = (".png", ".svg")


class OutputExistsError(ValueError):
    """Raised instead of replacing a file or folder that the command did not make."""


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of lab output a folder is ("sliced", "pruned", a marker's text), or None for anything else."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return None
    if (path / MARKER).is_file():
        return (path / MARKER).read_text().strip() or None
    if (path / "slicing.json").is_file():
        return "sliced"
    if (path / "pruning.json").is_file():
        return "pruned"
    return None


def _owner_alive(partial: Path) -> bool:
    """Whether the process that started a `.partial` folder still runs (its pid is written inside)."""
    try:
        os.kill(int((partial / ".owner").read_text()), 0)
    except PermissionError:
        return True  # someone else's live process
    except (OSError, ValueError):
        return False  # no owner file, or its process is gone
    return True


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Delete the `.partial` folders that killed saves to `path` left next to it; return them."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"[A-Za-z0-9_]{8}\.partial")
    stale = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            if pattern.fullmatch(entry.name) and entry.is_dir() and not _owner_alive(entry):
                shutil.rmtree(entry, ignore_errors=True)
                stale.append(entry)
    return stale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it into place only if the block succeeds.

    Works for files (`kind=None`) and folders (`kind` names the output, stored in a
    marker file). An interrupted write leaves `path` as it was; an existing folder is
    replaced only when it is a lab output of the same `kind` (OutputExistsError otherwise).
    Leftover partial folders of killed writes to `path` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    _check_replaceable(path, kind)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    (tmp / ".owner").write_text(str(os.getpid()))
    target = tmp / path.name
    try:
        yield target
        if kind is not None:
            (target / MARKER).write_text(kind + "\n")
        _check_replaceable(path, kind)
        if path.is_dir() and not path.is_symlink():
            os.replace(path, tmp / "previous")  # two renames: the old folder is never half deleted
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(path: Path, kind: str | None) -> None:
    """Refuse to put a folder over a file, a file over a folder, or a folder over a foreign folder."""
    if not path.exists() or path.is_symlink():
        return
    if path.is_dir() and kind is None:
        raise OutputExistsError(f"{path} is a folder but this output is a file; refusing to replace the folder.")
    if path.is_dir() and output_kind(path) != kind:
        raise OutputExistsError(
            f"{path} is a folder this lab did not write as a {kind} output (no slicing.json, pruning.json "
            f"or {MARKER} marker); refusing to replace it."
        )
    if not path.is_dir() and kind is not None:
        raise OutputExistsError(f"{path} is a file; a {kind} output is a folder, refusing to replace it.")


def check_output(path: str | os.PathLike, overwrite: bool = False, kind: str | None = None) -> Path:
    """Pre-flight check of an output path: refuse existing paths without `overwrite`, and unwritable places."""
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it or choose another path.")
        _check_replaceable(path, kind)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(f"Cannot write {path}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write {path}: no write permission in {parent}.")
    return path


def check_not_input(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuse an output path that is an input or a folder holding one (writing would destroy it)."""
    target = Path(out).expanduser().resolve()
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue
        source = Path(item).expanduser().resolve()
        if source == target or target in source.parents:
            raise OutputExistsError(f"The output {out} is the input {item}; choose a different output path.")


def figure_stem(table_path: str | os.PathLike) -> Path:
    """Where the figure of a table goes: same name without suffix, or `NAME_plot` if the table has an image suffix."""
    path = Path(table_path)
    return path.with_name(path.stem + "_plot") if path.suffix.lower() in FIGURE_SUFFIXES else path.with_suffix("")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv_atomic(table, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return Path(path)


def markdown_table(header: str, rows: list[list[Any]]) -> str:
    """A Markdown table from a header "a | b | c", its separator, and one line per row (cells through str())."""
    lines = [f"| {header} |", "|" + "---|" * len(header.split(" | "))]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(table, stem: str | os.PathLike, digits: int = 3) -> list[Path]:
    """Write a DataFrame as `stem`.csv and as a Markdown table `stem`.md (fixed precision), both atomically."""
    stem = Path(stem)
    markdown = table.to_markdown(index=False, floatfmt=f".{digits}f") + "\n"
    return [write_csv_atomic(table, stem.with_suffix(".csv")), write_text_atomic(stem.with_suffix(".md"), markdown)]


def cache_key(**parts: Any) -> str:
    """A short, stable, filesystem-safe key for a set of named parameters."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """Make a readable file-name fragment out of a model or text name."""
    keep = [c if c.isalnum() or c in "-_." else "-" for c in str(text)]
    return "".join(keep).strip("-.")[:60] or "x"
