"""Experiments: SB sweeps, the depth-vs-slicing comparison, resumable results, `reproduce`, readings."""
