"""Progress bars: nested bars in a log (not a tty) print no cursor-up codes; on a terminal they all show."""

from __future__ import annotations

import io
import os

from tqdm.std import tqdm

from helpers.infra.progress import in_jupyter, progress_bar

CURSOR_UP = "\x1b[A"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def nested(bar, stream: io.StringIO) -> str:
    """Run an outer loop of 3 with an inner `leave=False` loop of 2 (as the evaluation loops do); return the output."""
    for _ in bar(range(3), desc="outer", file=stream, mininterval=0):
        for _ in bar(range(2), desc="inner", leave=False, file=stream, mininterval=0):
            pass
    return stream.getvalue()


def test_plain_tqdm_moves_the_cursor_up_for_nested_bars_in_a_log():
    assert CURSOR_UP in nested(tqdm, io.StringIO())  # what made `make setup`'s log unreadable


def test_nested_bars_in_a_log_print_no_cursor_codes_and_the_outer_bar_shows():
    out = nested(progress_bar, io.StringIO())
    assert CURSOR_UP not in out
    assert "outer: 100%" in out and "inner" not in out


def test_on_a_terminal_nested_bars_still_show():
    out = nested(progress_bar, Terminal())
    assert "outer: 100%" in out and "inner" in out


def test_outside_a_kernel_bars_are_text():
    assert not in_jupyter()
    assert type(progress_bar(range(1), file=io.StringIO())) is tqdm


def test_in_a_jupyter_kernel_bars_are_notebook_widgets():
    import nbformat
    from nbclient import NotebookClient

    from helpers.infra.storage import REPO_ROOT

    code = "from helpers.infra.progress import progress_bar\nprint(type(progress_bar(range(2), desc='x')).__module__)"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    client = NotebookClient(notebook, timeout=120, kernel_name="python3")
    client.execute(env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    printed = "".join(o.get("text", "") for o in notebook.cells[0].outputs if o.get("name") == "stdout")
    widgets = [o for o in notebook.cells[0].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert printed.strip() == "tqdm.notebook" and widgets, notebook.cells[0].outputs
