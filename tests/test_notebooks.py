"""Every notebook is committed paired and stripped (tests/test_book.py runs them, once, in fast mode)."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_paired_in_sync_and_stripped(path: Path):
    paired = path.with_suffix(".py")
    assert paired.exists(), f"{path.name} has no paired percent script"
    ipynb = nbformat.read(path, as_version=4)
    script = jupytext.read(paired)
    assert [c.source for c in ipynb.cells] == [c.source for c in script.cells], "run `jupytext --sync` on it"
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "commit notebooks with outputs stripped"
    assert any("parameters" in c.metadata.get("tags", []) for c in ipynb.cells), "needs a papermill parameters cell"


# Executing every notebook in fast mode is tests/test_book.py's job: it builds the book from that one execution.


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lesson_opens_with_objectives_and_closes_with_exercises(path: Path):
    text = path.with_suffix(".py").read_text()
    opening, closing = text[: len(text) // 3], text[len(text) // 2 :]
    assert "**You will be able to**" in opening and "arxiv.org/abs/" in opening, "objectives and paper links first"
    questions, exercises = closing.find("## Questionnaire"), closing.find("## Exercises")
    assert 0 <= questions < exercises, "a questionnaire, then a section headed Exercises, at the end"
    solutions = closing[exercises:].count("<details><summary>Solution</summary>")
    assert 2 <= solutions <= 3 and closing.count("</details>") == solutions, "two or three folded solutions"
