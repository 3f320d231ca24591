"""Evaluation: perplexity, KL divergence vs the FP model, allocations by weight swapping, commonsense accuracy.

Names are imported lazily so that ``import ramp.evaluate`` stays cheap (commonsense pulls in ``datasets``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvaluationError": "perplexity",
    "PerplexityResult": "perplexity",
    "make_windows": "perplexity",
    "perplexity": "perplexity",
    "FPReference": "kld",
    "KLDResult": "kld",
    "fp_reference": "kld",
    "kl_divergence": "kld",
    "windows_for": "kld",
    "QuantCache": "quantized",
    "swap_allocation": "quantized",
    "AllocationEvaluator": "quantized",
    "TASKS": "commonsense",
    "evaluate_commonsense": "commonsense",
    "retained": "commonsense",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ramp.evaluate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ramp.evaluate.{_EXPORTS[name]}"), name)
