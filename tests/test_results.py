"""Resumable sweep cells and the manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers.experiments.results import CellCache, Manifest
from helpers.infra.integrity import code_fingerprint, machine_name


def test_cell_cache_computes_once_and_survives_an_interrupted_cell(tmp_path):
    cache = CellCache("sweep", root=tmp_path)
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            if value == "boom":
                raise KeyboardInterrupt
            return {"ppl": value}

        return run

    assert cache.get_or_compute({"sp": 0.3, "sb": 0.1}, compute(1)) == {"ppl": 1}
    assert cache.get_or_compute({"sb": 0.1, "sp": 0.3}, compute(2)) == {"ppl": 1}  # key ignores order
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute({"sp": 0.3, "sb": 0.0}, compute("boom"))
    assert cache.get({"sp": 0.3, "sb": 0.0}) is None
    assert calls == [1, "boom"]
    assert len(list(cache.folder.glob("*.json"))) == 1 and not list(cache.folder.glob(".*"))


def test_manifest_records_each_file_with_its_step(tmp_path):
    figure = tmp_path / "fig.png"
    figure.write_bytes(b"png")
    manifest = Manifest(tmp_path, model="smollm2-135m", seed=0)
    manifest.record([figure], "figure1", sp=0.3)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["model"] == "smollm2-135m" and saved["seed"] == 0
    assert saved["files"]["fig.png"]["step"] == "figure1"
    assert saved["files"]["fig.png"]["params"] == {"sp": 0.3}
    assert "torch" in saved["versions"]
    again = Manifest(tmp_path, model="smollm2-135m", seed=0)  # a rerun keeps earlier entries
    assert "fig.png" in again.files


def test_manifest_names_the_machine_each_file_was_made_on(tmp_path, monkeypatch):
    import helpers.experiments.results as results

    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("a")
    second.write_text("b")
    monkeypatch.setattr(results, "machine_name", lambda: "CPU A")
    Manifest(tmp_path, model="m", seed=0).record(first, "table")
    monkeypatch.setattr(results, "machine_name", lambda: "CPU B + GPU")
    Manifest(tmp_path, model="m", seed=0).record(second, "table")  # a later run elsewhere
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert files["a.csv"]["machine"] == "CPU A" and files["b.csv"]["machine"] == "CPU B + GPU"


def test_a_file_built_from_cached_cells_names_the_machines_that_computed_them(tmp_path, monkeypatch):
    import helpers.experiments.results as results

    monkeypatch.setattr(CellCache, "served", {})
    cache = CellCache("cells", root=tmp_path / "cache")
    monkeypatch.setattr(results, "machine_name", lambda: "CPU A")
    cache.get_or_compute({"sp": 0.3}, lambda: {"ppl": 1.0})  # computed on A
    stored = json.loads(cache.path({"sp": 0.3}).read_text())
    assert stored["machine"] == "CPU A"
    old = cache.path({"sp": 0.4})  # an entry cached before cells stored their machine
    old.write_text(json.dumps({"params": {"sp": 0.4}, "result": {"ppl": 2.0}}))

    monkeypatch.setattr(CellCache, "served", {})  # a later run, elsewhere, that reads both from the cache
    monkeypatch.setattr(results, "machine_name", lambda: "CPU B")
    manifest = Manifest(tmp_path, model="m", seed=0)
    assert cache.get_or_compute({"sp": 0.3}, lambda: pytest.fail("recomputed")) == {"ppl": 1.0}
    assert cache.get({"sp": 0.4}) == {"ppl": 2.0}
    cache.get_or_compute({"sp": 0.5}, lambda: {"ppl": 3.0})  # computed here, on B
    table, figure, plain = tmp_path / "t.csv", tmp_path / "f.png", tmp_path / "p.md"
    for path in (table, figure, plain):
        path.write_text("x")
    manifest.record(table, "table", cells=("cells",))
    manifest.record(figure, "figure", cells=("other",))  # a cache that served nothing
    manifest.record(plain, "text")
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert files["t.csv"]["machine"] == "CPU B"
    assert files["t.csv"]["cells_machines"] == ["CPU A", "CPU B", results.NOT_RECORDED]
    assert "cells_machines" not in files["f.png"] and "cells_machines" not in files["p.md"]


def test_cache_key_changes_when_the_computing_function_changes(tmp_path, monkeypatch):
    import importlib
    import sys

    module = tmp_path / "t11_cell_code.py"
    module.write_text("def compute():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    first = code_fingerprint("t11_cell_code")
    assert first == code_fingerprint("t11_cell_code")
    module.write_text("def compute():\n    return 2  # a changed function\n")
    sys.modules.pop("t11_cell_code")
    second = code_fingerprint("t11_cell_code")
    assert second != first
    cache = CellCache("cells", root=tmp_path)
    assert cache.path({"sp": 0.3, "code": first}) != cache.path({"sp": 0.3, "code": second})


def test_fingerprint_of_one_class_ignores_the_rest_of_its_module(tmp_path, monkeypatch):
    """A cell keyed by `Lab`'s source survives an edit to a report function beside it, not an edit to `Lab`."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "t11_lab_code.py"

    def load(lab_body: str, report_body: str):
        lab = f"class Lab:\n    def measure(self):\n        {lab_body}\n"
        module.write_text(f"{lab}\n\ndef report():\n    {report_body}\n")
        sys.modules.pop("t11_lab_code", None)
        importlib.invalidate_caches()
        return importlib.import_module("t11_lab_code")

    first = code_fingerprint(load("return 1", "return 'table v1'").Lab)
    assert code_fingerprint(load("return 1", "return 'table v2, reworded'").Lab) == first
    assert code_fingerprint(load("return 2", "return 'table v2, reworded'").Lab) != first


def test_machine_name_is_the_cpu_lscpu_reports():
    cpuinfo = Path("/proc/cpuinfo")
    if shutil.which("lscpu") is None or not cpuinfo.exists() or "model name" not in cpuinfo.read_text():
        pytest.skip("needs lscpu and an x86 /proc/cpuinfo")
    if torch.cuda.is_available():
        pytest.skip("with CUDA the name also holds the GPU")
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"})
    names = [line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.startswith("Model name:")]
    assert machine_name() == names[0]
