"""Thin DVC stage scripts: each parses its own params.yaml section, calls ``ramp``, writes outputs atomically."""
