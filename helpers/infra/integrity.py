"""Checks that keep results honest: content fingerprints for cache keys, weight checksums, metadata and device checks.

A cache key built from names goes stale when a file changes under the same name,
so keys here hash content: the text itself, every byte of the model's weights,
the settings and the source of the code that computes the value. Saved models
record a SHA-256 of every file they hold and are verified against it on load.
No check trusts a file's modification time (an edit can restore it).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import platform
import shutil
import struct
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKSUM_FIELD = "checksums"
SETTLED_S = 2.0  # a file unchanged for this long when hashed is hashed once per process (see file_sha256)
FINAL_DIM_FLOOR, FINAL_DIM_FLOOR_FRACTION = 8, 0.01  # a --final-dim below both is almost surely a mistake
FORWARD_DEVICES = ("cpu", "cuda", "mps")  # device types a model forward can run on


class IntegrityError(ValueError):
    """Raised when a saved file does not match what was recorded about it."""


def sha256_text(text: str) -> str:
    """SHA-256 of a text (the cache key of a calibration or evaluation text)."""
    return hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()


_hashed: dict[tuple, str] = {}  # (path, device, inode, size, mtime, ctime) -> SHA-256, for settled files only


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (about 0.6 s for 540 MB with SHA extensions).

    Every process hashes a file afresh. Inside one process a file that had not changed for SETTLED_S
    when it was hashed is not hashed again while its inode, size and times stay the same: any write
    after the hash moves its change time (ctime, which no user call can set back) past the margin.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _hashed:
        return _hashed[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if time.time() - st.st_ctime > SETTLED_S:
        _hashed[key] = digest.hexdigest()
    return digest.hexdigest()


def weights_fingerprint(source: str) -> str:
    """Fingerprint of a model folder's config and weights, or the id itself for a hub model (not on disk)."""
    folder = Path(source)
    if not folder.is_dir():
        return sha256_text(source)
    digest = hashlib.sha256()
    for name in ("config.json", "slicing.json", "pruning.json"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f"{path.name}:{file_sha256(path)}".encode())  # every byte: a zeroed block anywhere counts
    return digest.hexdigest()


def tensor_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of a model in memory: every parameter's name, shape and float64 sum (any retraining moves them)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            digest.update(f"{name}:{tuple(p.shape)}:{p.sum(dtype=torch.float64).item():.17g}".encode())
    return digest.hexdigest()[:16]


PACKAGES = ("torch", "transformers", "numpy", "pandas", "matplotlib")


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that shape the numbers."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """The CPU, and the GPU where CUDA is present: timings depend on both, and so do bfloat16 scores."""
    gpu = f" + {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return cpu_model() + gpu


@functools.cache
def _source_hash(code: ModuleType | type | Callable) -> str:
    """Hash of a module's, class's or function's source as first read in this process (editing the file mid-run
    changes nothing)."""
    return hashlib.sha256(inspect.getsource(code).encode()).hexdigest()


def code_fingerprint(*modules: ModuleType | type | Callable | str) -> str:
    """Hash of the source of the code that computes a cached value, and of the package versions: edited code, or a
    torch/transformers upgrade, computes fresh values instead of reusing old ones.

    Modules (objects or dotted names), or single classes and functions where the rest of their module only
    reports results, so that editing a table's wording does not discard computed cells.
    """
    digest = hashlib.sha256(json.dumps(package_versions(), sort_keys=True).encode())
    for module in modules:
        digest.update(_source_hash(importlib.import_module(module) if isinstance(module, str) else module).encode())
    return digest.hexdigest()[:16]


def _module_file(name: str) -> Path | None:
    """The source file of `helpers` module `name` (a package's __init__.py), or None when `name` is no module."""
    base = Path(__file__).resolve().parents[2].joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def imported_code(root: str, leaves: tuple[str, ...] = ()) -> tuple[str, ...]:
    """`root` and every `helpers` module it imports, directly or through others (read from the source, not run).

    The list of code that keys a cache, derived instead of kept by hand: a module that computes cells imports
    everything its numbers depend on, so editing any of those computes fresh cells. `leaves` are listed but
    not followed (a settings module: its values key the cache already, the code behind its defaults need not).
    """
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        path = None if name in seen else _module_file(name)
        if path is None:
            continue
        seen.add(name)
        if name in leaves:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers"):
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]  # submodules too
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith("helpers")]
    return tuple(sorted(seen - {"helpers"}))


def folder_checksums(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every regular file directly in `folder` (hidden files and `skip` left out)."""
    folder = Path(folder)
    return {
        p.name: file_sha256(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name not in skip
    }


def verify_checksums(folder: str | os.PathLike, meta_file: str, recorded: dict[str, str]) -> None:
    """Compare every file listed in `meta_file` with its recorded SHA-256; IntegrityError names the first bad one."""
    folder = Path(folder)
    for name, expected in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (listed in {folder / meta_file}).")
        if file_sha256(path) != expected:
            raise IntegrityError(
                f"{path} does not match the checksum in {folder / meta_file}: the file is damaged or was changed."
            )


def safetensors_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Every tensor's name and shape from a safetensors file's header, without reading the tensors."""
    return {k: t["shape"] for k, t in check_safetensors(path).items() if k != "__metadata__"}


def check_safetensors(path: str | os.PathLike) -> dict:
    """Check that a safetensors file has a readable header and exactly the bytes it declares (no truncation);
    return the header."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len)) if 8 + header_len <= size else None
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path} has no readable safetensors header ({err}).") from err
    if not isinstance(header, dict):
        raise IntegrityError(f"{path} has no readable safetensors header.")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        raise IntegrityError(f"{path} holds {size} bytes but its header declares {8 + header_len + end}.")
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FIELD_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", _is_int),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
    "ints": ("a list of integers", lambda v: isinstance(v, list) and all(_is_int(x) for x in v)),
    "dict|null": ("an object or null", lambda v: v is None or isinstance(v, dict)),
}


def read_metadata(path: str | os.PathLike, schema: dict[str, str], optional: dict[str, str] | None = None) -> dict:
    """Read a JSON metadata file and check every field's presence and type; errors name the file and the field."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path} is not valid JSON ({err}).") from err
    if not isinstance(meta, dict):
        raise IntegrityError(f"{path} must hold a JSON object, got {type(meta).__name__}.")
    for field, kind in {**schema, **(optional or {})}.items():
        if field not in meta:
            if field in schema:
                raise IntegrityError(f"{path}: field {field!r} is missing.")
            continue
        description, ok = FIELD_TYPES[kind]
        if not ok(meta[field]):
            raise IntegrityError(f"{path}: field {field!r} must be {description}, got {meta[field]!r:.60}.")
    return meta


def discard(path: str | os.PathLike, reason: str) -> None:
    """Report a bad cache entry in one line and remove it, so the caller recomputes it."""
    path = Path(path)
    log.warning("cache entry %s is unusable (%s); removed, recomputing.", path, reason)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_device(spec: str | torch.device, origin: str = "device") -> torch.device:
    """Parse a device and check this machine can run a forward on it (a tiny matmul); a one-line ValueError
    otherwise."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{origin}={spec!r} is not a device; use cpu, cuda, cuda:N or mps.") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{origin}={spec!r} asks for CUDA, but this machine has no usable CUDA GPU; use cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{origin}={spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{origin}={spec!r} asks for Apple MPS, which this machine does not have; use cpu.")
    elif device.type not in FORWARD_DEVICES:  # meta holds shapes only; others are not wired here
        raise ValueError(f"{origin}={spec!r} cannot run a model forward here; use cpu, cuda, cuda:N or mps.")
    if device.type != "cpu":
        try:
            ones = torch.ones(2, 2, device=device)
            (ones @ ones).sum().item()
        except RuntimeError as err:
            raise ValueError(f"{origin}={spec!r} failed a test computation ({str(err).splitlines()[0]}).") from err
    return device


def check_final_dim(final_dim: int, hidden_size: int) -> bool:
    """Warn loudly (and return True) when a head would read fewer than max(8, 1% of d) dimensions."""
    floor = max(FINAL_DIM_FLOOR, math.ceil(FINAL_DIM_FLOOR_FRACTION * hidden_size))
    if final_dim >= floor:
        return False
    log.warning(
        "WARNING: --final-dim %d keeps %d of %d dimensions for the head (below %d = max(8, 1%% of d)): "
        "the model will predict far worse. Check the value; 'last' keeps the last layer's width.",
        final_dim,
        final_dim,
        hidden_size,
        floor,
    )
    return True


def check_calibration_tokens(tokens: int, hidden_size: int, allow_few: bool = False) -> None:
    """Refuse (or with `allow_few` warn loudly) when calibration tokens < hidden size: a rank-deficient covariance."""
    if tokens >= hidden_size:
        return
    message = (
        f"Only {tokens} calibration tokens for hidden size {hidden_size}: the covariance is rank-deficient and "
        f"the slices overfit the calibration text. Use at least {hidden_size} tokens (windows x seqlen)."
    )
    if not allow_few:
        raise ValueError(message + " Pass --allow-few-tokens to slice anyway.")
    log.warning("WARNING: %s", message)
