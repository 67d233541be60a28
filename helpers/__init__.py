"""Reference lab for dynamic LLM slicing by Layer Redundancy.

Subpackages follow the pipeline, each importing only from those below it
(enforced by import-linter, see pyproject.toml): `infra` (storage, integrity,
text) < `models` (loading, adapters, sliced layers, layer hooks) < `analysis`
(capture, LR, block scores) < `compression` (allocation, slicing, depth removal,
replacement, ledger, checkpoints) < `evaluation` (perplexity, zero-shot,
speed, stability, stats) < `ui` (plots, widgets, book) < `experiments`
(sweeps, compare, results, reproduce, readings) < `cli`. Notebooks and the
command line (`python -m helpers ...`) only call into these.
"""

__version__ = "0.1.0"
