"""Analysis of a dense model: per-layer capture, Layer Redundancy, depth-pruning block scores."""
