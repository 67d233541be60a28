"""Models: load by name or folder, one adapter per family, the family-free sliced modules."""
