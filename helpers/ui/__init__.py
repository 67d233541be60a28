"""What the reader sees: figures, the slider app, the book build."""
