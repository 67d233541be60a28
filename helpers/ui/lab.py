"""JupyterLab on the lessons as `make lab` starts it: localhost only, the .venv's kernel, `.py` lessons as notebooks."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from helpers.infra.storage import REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
# Committed JupyterLab defaults (labconfig/default_setting_overrides.json): a jupytext `.py` lesson opens as a notebook.
LAB_CONFIG_DIR = REPO_ROOT / "jupyter"
DEFAULT_PORT = 8888


# JupyterLab's short options that set the same traits as ours (it refuses a trait given twice).
ALIASES = {"--ip": "--ServerApp.ip", "--port": "--ServerApp.port", "--notebook-dir": "--ServerApp.root_dir"}


def lab_command(port: int = DEFAULT_PORT, extra: Sequence[str] = ()) -> list[str]:
    """The JupyterLab command line: this interpreter, on 127.0.0.1:`port`, in notebooks/; `extra` options win."""
    ours = {
        "--ServerApp.ip": "127.0.0.1",
        "--ServerApp.port": str(port),
        "--ServerApp.port_retries": "0",  # the port asked for or a clear error: the URL printed before start holds
        "--ServerApp.root_dir": str(NOTEBOOKS_DIR),
    }
    given = {ALIASES.get(option.split("=", 1)[0], option.split("=", 1)[0]) for option in extra}
    command = [sys.executable, "-m", "jupyterlab", *(f"{k}={v}" for k, v in ours.items() if k not in given)]
    if getattr(os, "geteuid", lambda: -1)() == 0 and "--allow-root" not in extra:  # containers and CI run as root
        command.append("--allow-root")
    return command + list(extra)


def lab_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for JupyterLab: this checkout's `helpers` and lab defaults, the .venv's kernels before the user's."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(filter(None, [str(LAB_CONFIG_DIR), env.get("JUPYTER_CONFIG_PATH")]))
    env["JUPYTER_PREFER_ENV_PATH"] = "1"  # a `python3` kernel in ~/.local/share/jupyter must not shadow the .venv's
    return env
