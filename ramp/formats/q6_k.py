"""Placeholder: filled by the quantizer work (issue 4)."""

FORMATS: tuple = ()
