"""Model loading and per-architecture tables."""
