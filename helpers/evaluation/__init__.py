"""Evaluation of any model: perplexity, zero-shot tasks, speed, stability, uncertainty."""
