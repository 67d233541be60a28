"""Where the lab keeps its files, and writes that never leave half a file behind."""

from __future__ import annotations

import contextlib
import errno
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


NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV)  # os.link's errors where a filesystem has none
MARKER = ".lab-output"  # names the kind of a folder this lab wrote, so only such a folder is ever replaced
FIGURE_SUFFIXES = (".png", ".svg")


class OutputExistsError(ValueError):
    """Raised instead of replacing a file or folder that the command did not make."""


class OutputConflictError(OutputExistsError):
    """Raised when a claimed output appeared or changed while the run worked; both results are kept."""


# The user-named outputs of the running command, as `check_output` found them before the work began:
# path -> identity (None: absent). `atomic_path` refuses to replace what changed since (a concurrent run).
_claims: dict[Path, tuple | None] = {}


def _identity(path: Path) -> tuple | None:
    """What tells one file or folder from another at the same path (device, inode, size, times); None if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@contextlib.contextmanager
def output_claims() -> Iterator[None]:
    """Scope of one command: outputs checked by `check_output` inside it are claimed until it ends."""
    _claims.clear()
    try:
        yield
    finally:
        _claims.clear()


def _kept_name(path: Path) -> Path:
    """A free name next to `path` for this run's result when `path` was taken meanwhile (NAME-PID.SUFFIX)."""
    stem, suffix = (path.stem, path.suffix) if path.suffix and not path.is_dir() else (path.name, "")
    candidate, n = path.with_name(f"{stem}-{os.getpid()}{suffix}"), 0
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{stem}-{os.getpid()}-{n}{suffix}")
    return candidate


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
    path = Path(path).expanduser().resolve()  # a symlink's target is what gets written
    claimed, expected = path in _claims, _claims.pop(path, None)
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
        if claimed:
            _move_claimed(target, path, expected, tmp)
            return
        if path.is_dir():
            os.replace(path, tmp / "previous")  # two renames: the old folder is never half deleted
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_claimed(target: Path, path: Path, expected: tuple | None, tmp: Path) -> None:
    """Move a claimed output into place only over what was there when the run began; else keep both.

    A path that was absent is taken without replacing (a hard link for a file, a rename that fails over a
    non-empty folder), so two runs writing one --out never lose a result: the later one keeps its own
    under another name and says so in one line (OutputConflictError).
    """
    try:
        if _identity(path) != expected:
            raise FileExistsError(errno.EEXIST, "changed since the run began", str(path))
        if expected is None and target.is_dir():
            os.rename(target, path)  # fails (ENOTEMPTY) if a finished folder appeared since the check above
        elif expected is None:
            try:
                os.link(target, path)  # fails (EEXIST) if the name was taken since the check above
            except OSError as err:  # a filesystem without hard links: the small window of a plain rename
                if err.errno not in NO_HARD_LINKS or os.path.lexists(path):
                    raise
                os.replace(target, path)
        else:
            if path.is_dir():
                os.replace(path, tmp / "previous")
            os.replace(target, path)
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        kept = _kept_name(path)
        os.replace(target, kept)
        raise OutputConflictError(
            f"{path} appeared or changed while this run worked (another run writing the same --out?): "
            f"left it as it is and kept this run's result as {kept}."
        ) from None


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
    """Pre-flight check of an output path (symlinks resolved): refuse existing paths without `overwrite`, and
    places where a probe file cannot be created; claim it (see `output_claims`). Returns the resolved path."""
    given = Path(path).expanduser()
    path = given.resolve()
    if os.path.lexists(given) or path.exists():
        if not overwrite:
            raise OutputExistsError(f"{given} already exists; pass --overwrite to replace it or choose another path.")
        _check_replaceable(path, kind)
    probe_folder(path.parent, f"Cannot write {given}")
    _claims[path] = _identity(path)
    return path


def probe_folder(folder: str | os.PathLike, context: str) -> None:
    """Prove that files can be created in `folder` (or its nearest existing ancestor): create and remove a probe.

    `os.access` says yes for /proc and /sys as root; only a real file creation tells.
    """
    folder = Path(folder).expanduser().resolve()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputExistsError(f"{context}: {folder} is a file, not a folder.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"{context}: cannot create a file in {folder} ({err.strerror}).") from None


def check_not_input(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuse an output path that is an input, a folder holding one, or lies inside an input folder."""
    target = Path(out).expanduser().resolve()
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue
        source = Path(item).expanduser().resolve()
        if source == target or target in source.parents:
            raise OutputExistsError(f"The output {out} is the input {item}; choose a different output path.")
        if source.is_dir() and source in target.parents:
            raise OutputExistsError(
                f"The output {out} is inside the input folder {item}; writing there would change the input."
            )


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
