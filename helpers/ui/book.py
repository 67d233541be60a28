"""The rendered book: execute every lesson once, stage it with the gallery and tables, build it with Jupyter Book."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from helpers.infra.storage import FIGURES_DIR, REPO_ROOT, atomic_path
from helpers.models.loading import model_label

BOOK_DIR = REPO_ROOT / "book"  # committed sources: _config.yml, _toc.yml, index.md
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DOCS_DIR = REPO_ROOT / "docs"
DOCS_PAGES = (
    "method",
    "findings",
    "speed",
    "streaming",
    "recovery",
    "validation",
    "reliability",
    "gemma3",
)  # docs/<name>.md, in book/_toc.yml
DEFAULT_OUT = REPO_ROOT / "_build" / "book"
MODES = {
    "fast": "fast mode (`HELPERS_FAST=1`): every size shrunk so that it runs in minutes; numbers are noisy",
    "reduced": "reduced mode: the notebooks' own settings on the default model (SmolLM2-135M)",
}


@dataclass
class BuildReport:
    """What a build produced: the site's folder, each executed lesson's error outputs, seconds taken per step."""

    html: Path
    errors: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def lesson_paths() -> list[Path]:
    """The lessons in reading order (file name order)."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def mode_banner(mode: str) -> str:
    """The line every page carries, saying which mode built it."""
    target = "book-fast" if mode == "fast" else "book"
    return f"*Built in {MODES[mode]}; `make {target}` builds it again.*"


def execute_lesson(path: Path, out: Path, mode: str, figures_dir: Path) -> list[str]:
    """Run one lesson top to bottom in a fresh kernel, write it with its outputs to `out`; return its errors."""
    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ, MPLBACKEND="module://matplotlib_inline.backend_inline", HELPERS_FIGURES_DIR=str(figures_dir))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env.pop("HELPERS_FAST", None)
    if mode == "fast":
        env["HELPERS_FAST"] = "1"
    client = NotebookClient(
        notebook,
        timeout=1800,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=env)
    errors = [
        f"cell {i}: {o.get('ename')}: {o.get('evalue')}"
        for i, c in enumerate(notebook.cells)
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    notebook.cells.insert(1, nbformat.v4.new_markdown_cell(mode_banner(mode)))
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out)
    return errors


def model_folders(figures: Path) -> list[Path]:
    """Other models' galleries: subfolders that `reproduce --model NAME --out figures/NAME` wrote (with a manifest)."""
    return sorted(p for p in figures.iterdir() if p.is_dir() and (p / "manifest.json").exists())


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").exists() else {}


def _figure_sections(folder: Path, link: str, level: str) -> list[str]:
    """One section per PNG in `folder` (linked as `link`/name) with the settings its manifest records."""
    entries = _manifest(folder).get("files", {})
    lines = []
    for png in sorted(folder.glob("*.png")):
        entry = entries.get(png.name)
        lines += [f"{level} {png.stem.replace('_', ' ')}", "", f"![{png.stem}]({link}/{png.name})", ""]
        if entry:
            params = ", ".join(f"{k} = {v}" for k, v in sorted(entry.get("params", {}).items()))
            machine = f" on {entry['machine']}" if "machine" in entry else ""  # older entries do not name it
            cells = entry.get("cells_machines", [])
            if cells and cells != [entry.get("machine")]:  # built from cached cells computed elsewhere (or earlier)
                machine += f" from cells computed on {', '.join(cells)}"
            settings = f": {params}" if params else ""  # a step without parameters says none
            lines += [f"Step `{entry.get('step')}`, written {entry.get('written')}{machine}{settings}.", ""]
        else:
            lines += ["Not in the manifest (a `make screenshots` screenshot or a benchmark script's figure).", ""]
    return lines


def _table_sections(folder: Path, level: str) -> list[str]:
    """One section per Markdown table in `folder`, pasted as written."""
    lines = []
    for table in sorted(folder.glob("*.md")):
        lines += [f"{level} {table.stem.replace('_', ' ')}", "", table.read_text().strip(), ""]
    return lines


def _model_heading(folder: Path, figures: Path) -> str:
    model = _manifest(folder).get("model", folder.name)
    return f"## {model_label(model)} (`figures/{folder.relative_to(figures)}/`)"


def gallery_page(figures: Path, mode: str) -> str:
    """Markdown for the gallery: every committed figure with the settings its manifest records, other models last."""
    lines = [
        "# Gallery",
        "",
        "The figures committed in `figures/`, written by `python -m helpers reproduce` (reduced size on",
        "SmolLM2-135M-Instruct, Q4_1 weights dequantised to float32), each with the settings its manifest",
        "(`figures/manifest.json`) records. These are the committed figures whatever mode built the lessons.",
        "Other models' galleries (`reproduce --model NAME --out figures/NAME`) follow.",
        "",
        mode_banner(mode),
        "",
        *_figure_sections(figures, "figures", "##"),
    ]
    for folder in model_folders(figures):
        link = f"figures/{folder.relative_to(figures)}"
        lines += [_model_heading(folder, figures), "", *_figure_sections(folder, link, "###")]
    return "\n".join(lines)


def results_page(figures: Path, mode: str) -> str:
    """Markdown for the result tables that `python -m helpers reproduce` writes, other models last."""
    lines = [
        "# Result tables",
        "",
        "The tables committed in `figures/` (reduced size, SmolLM2-135M-Instruct, Q4_1 weights dequantised",
        "to float32); lesson 04 explains how to read them. Other models' tables follow.",
        "",
        mode_banner(mode),
        "",
    ]
    lines += _table_sections(figures, "##")
    for folder in model_folders(figures):
        lines += [_model_heading(folder, figures), "", *_table_sections(folder, "###")]
    return "\n".join(lines)


def docs_page(name: str, mode: str) -> str:
    """A reference page from docs/`name`.md, with the line saying which mode built the book."""
    return (DOCS_DIR / f"{name}.md").read_text() + "\n" + mode_banner(mode) + "\n"


def stage(src: Path, mode: str, figures: Path = FIGURES_DIR) -> BuildReport:
    """Fill `src` with the book's sources, executing every lesson into it; returns the per-lesson errors."""
    src.mkdir(parents=True, exist_ok=True)
    for item in BOOK_DIR.iterdir():
        shutil.copy2(item, src / item.name)
    index = src / "index.md"
    index.write_text(index.read_text().replace("{{ mode }}", mode_banner(mode)))
    shutil.copytree(figures, src / "figures", dirs_exist_ok=True)
    (src / "gallery.md").write_text(gallery_page(figures, mode))
    (src / "results.md").write_text(results_page(figures, mode))
    for name in DOCS_PAGES:
        (src / f"{name}.md").write_text(docs_page(name, mode))
    report = BuildReport(html=src.parent / "_build" / "html")
    scratch = src.parent / "lesson_figures"  # the lessons read the committed tables and write here, not figures/
    shutil.copytree(figures, scratch, dirs_exist_ok=True)
    for path in lesson_paths():
        start = time.perf_counter()
        report.errors[path.stem] = execute_lesson(path, src / path.name, mode, scratch)
        report.seconds[path.stem] = time.perf_counter() - start
    return report


def jupyter_book(src: Path, out: Path) -> None:
    """Build the staged sources in `src` (with their _config.yml) by Jupyter Book into `out`/_build/html."""
    cli = "from jupyter_book.cli.main import main; main()"  # the package has no __main__
    done = subprocess.run(
        [sys.executable, "-c", cli, "build", str(src), "--path-output", str(out)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def build(mode: str = "reduced", out: Path = DEFAULT_OUT, figures: Path = FIGURES_DIR) -> BuildReport:
    """Execute the lessons in `mode`, stage everything under `out` and build the HTML site into `out/_build/html`."""
    if mode not in MODES:
        raise ValueError(f"unknown book mode {mode!r}; choose one of {sorted(MODES)}")
    with atomic_path(out, kind="book") as tmp:  # an existing folder is replaced only if it is an earlier book
        tmp.mkdir(parents=True)
        report = stage(tmp / "src", mode, figures)
        start = time.perf_counter()
        jupyter_book(tmp / "src", tmp)
        report.seconds["jupyter-book"] = time.perf_counter() - start
    report.html = out / "_build" / "html"
    return report
