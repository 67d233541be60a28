"""What the browser tests share: a free local port, waiting for a server to listen, the slider app's readout, keys."""

from __future__ import annotations

import re
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listened on port {port} within {timeout} s")


def readout_values(text: str) -> tuple[float, float, float, float]:
    """(realised mean, requested SP, requested SB, SP sliced at) parsed from the app's readout.

    At the matched size the formula runs at the SP that holds constant slicing's parameter count; at
    the nominal size that is the requested SP.
    """
    found = re.search(
        r"realised mean slice: ([\d.]+) \(.*?requested SP ([\d.]+),(?: sliced at SP ([\d.]+),)? SB ([\d.]+)", text
    )
    assert found, f"readout not understood: {text!r}"
    realised, sp, sliced, sb = found.groups()
    return float(realised), float(sp), float(sb), float(sliced or sp)


def press(page, handle, key: str, times: int) -> None:
    handle.focus()
    for _ in range(times):
        page.keyboard.press(key)
