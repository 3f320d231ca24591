"""Evaluation: perplexity, KL divergence vs the FP model, allocations by weight swapping, commonsense accuracy.

Names are imported lazily so that ``import ramp.evaluate`` stays cheap (commonsense pulls in ``datasets``).
"""

from __future__ import annotations

from ramp.lazy import lazy_getattr

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


__getattr__ = lazy_getattr("ramp.evaluate", _EXPORTS)
