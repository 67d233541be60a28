#!/usr/bin/env bash
# Debian's Chromium for the browser tests (Voila sliders, JupyterLab, the book); Playwright drives it, never downloads one.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi
/usr/bin/chromium --version
