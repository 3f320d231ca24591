"""GGUF tensor types as quantizers: one module per family, one registry.

``FORMATS`` maps the GGUF type name to its :class:`QuantFormat`; ``allowed_formats(shape)`` lists the
formats legal for a weight of that shape, ordered by bits per weight.
"""

from __future__ import annotations

import torch

from ramp.formats import float_types, iq4_nl, legacy, q2_k, q3_k, q4_k, q6_k
from ramp.formats.base import FormatError, QuantFormat

_FAMILIES = (q2_k, q3_k, q4_k, q6_k, legacy, iq4_nl, float_types)

FORMATS: dict[str, QuantFormat] = {f.name: f for fam in _FAMILIES for f in fam.FORMATS}

# Formats the allocator may choose for a quantizable matrix (F32/BF16 are storage types, not choices).
QUANT_CHOICES: tuple[str, ...] = (
    "Q2_K",
    "Q3_K",
    "Q4_0",
    "Q4_1",
    "IQ4_NL",
    "Q4_K",
    "Q5_0",
    "Q5_1",
    "Q5_K",
    "Q6_K",
    "Q8_0",
    "F16",
)


def get_format(name: str) -> QuantFormat:
    """The format called ``name`` (a GGUF type name such as ``"Q4_K"``)."""
    try:
        return FORMATS[name.upper()]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}") from None


def allowed_formats(shape: tuple[int, ...] | torch.Size, choices: tuple[str, ...] = QUANT_CHOICES) -> list[QuantFormat]:
    """Formats in ``choices`` legal for a weight of ``shape``, ordered by bits per weight (then name)."""
    fmts = [FORMATS[c] for c in choices if c in FORMATS and FORMATS[c].is_legal(tuple(shape))]
    return sorted(fmts, key=lambda f: (f.bpw, f.name))


__all__ = ["FORMATS", "FormatError", "QUANT_CHOICES", "QuantFormat", "allowed_formats", "get_format"]
