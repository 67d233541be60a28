"""Infrastructure every stage uses: atomic storage, integrity checks, text corpora and windows."""
