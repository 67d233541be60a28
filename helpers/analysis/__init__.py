"""Analysis of a dense model: hooks, Layer Redundancy, depth-pruning block scores."""
