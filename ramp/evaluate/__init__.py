"""Evaluation: perplexity, KL divergence, commonsense accuracy."""
