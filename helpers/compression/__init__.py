"""Compression: slice allocation, rotate-and-slice, layer removal and replacement, the parameter ledger, checkpoints."""
