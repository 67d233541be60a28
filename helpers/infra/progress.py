"""Every progress bar in the lab: widget bars inside Jupyter, text bars in a terminal, no cursor codes in logs."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.std import tqdm as text_bar


def in_jupyter() -> bool:
    """True inside a Jupyter kernel (JupyterLab, Voila, the book's executor) where ipywidgets can draw a bar."""
    if "ipykernel.zmqshell" not in sys.modules:
        return False
    from IPython import get_ipython

    try:
        import ipywidgets  # noqa: F401  (tqdm's notebook bars are ipywidgets)
    except ImportError:
        return False
    return type(get_ipython()).__name__ == "ZMQInteractiveShell"


def progress_bar(iterable: Any = None, **options: Any) -> text_bar:
    """A tqdm bar over `iterable` (tqdm's keyword arguments), drawn the way the place it runs in can show it.

    In a notebook it is a widget; on a terminal a text bar, nested ones below it; in a log or CI output
    (not a tty) only the outermost bar prints, because a nested bar moves the cursor up with `ESC [A`.
    """
    if in_jupyter():
        from tqdm.notebook import tqdm as widget_bar

        return widget_bar(iterable, **options)
    stream = options.get("file") or sys.stderr
    nested = any(not bar.disable for bar in list(text_bar._instances))
    if nested and not getattr(stream, "isatty", lambda: False)():
        options["disable"] = True
    return text_bar(iterable, **options)
