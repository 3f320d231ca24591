"""Reward for one finished allocation: quality first, asymmetric budget penalties, a cliff past the tolerance.

``reward = -scale * quality_term(degradation) - unused_weight * unused_fraction - over_weight * over_fraction``

* ``degradation`` comes from ``quality_fn(allocation)`` (lower is better: KLD in nats per token, or delta
  log-perplexity vs the FP model on calibration tokens); it is evaluated once per distinct allocation (cached by
  :func:`ramp.allocation.allocation_hash`) and ``evaluations`` counts the real calls.
* ``unused_fraction = max(0, budget - used) / budget``: leaving bytes on the table costs a little.
* ``over_fraction = max(0, used - budget) / budget``: exceeding the budget costs far more; beyond
  ``tolerance`` the episode gets the flat ``cliff`` reward and the allocation is not evaluated at all (with the
  budget wall on, this cannot happen; it exists for the wall-off ablation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ramp.allocation import Allocation, allocation_hash
from ramp.sac.config import QUALITY_TERMS, RewardConfig, RewardError

QualityFn = Callable[[Allocation], float]


@dataclass(frozen=True)
class RewardOutcome:
    """The reward of one allocation; ``degradation`` is None when the cliff applied (never evaluated)."""

    reward: float
    degradation: float | None
    used_bytes: int
    budget_matrix_bytes: int
    evaluated: bool  # True when quality_fn ran for this call (False: cache hit or cliff)

    @property
    def within_budget(self) -> bool:
        return self.used_bytes <= self.budget_matrix_bytes


class RewardModel:
    """Turns a finished allocation into a reward, calling ``quality_fn`` at most once per distinct allocation."""

    def __init__(self, quality_fn: QualityFn | None, config: RewardConfig = RewardConfig()) -> None:
        self.quality_fn = quality_fn
        self.config = config
        self.cache: dict[str, float] = {}  # allocation_hash -> degradation
        self.evaluations = 0

    def degradation(self, allocation: Mapping[str, str]) -> tuple[float, bool]:
        """(degradation, whether quality_fn ran now)."""
        key = allocation_hash(allocation)
        if key in self.cache:
            return self.cache[key], False
        if self.quality_fn is None:
            raise RewardError("this environment has no quality_fn, so it cannot score allocations")
        value = self.quality_fn(dict(allocation))
        try:
            d = float(value)
        except (TypeError, ValueError) as e:
            raise RewardError(f"quality_fn returned {value!r}; expected a float degradation") from e
        if not math.isfinite(d):
            raise RewardError(f"quality_fn returned a non-finite degradation {d} for allocation {key[:12]}")
        if self.config.quality == "log" and d <= -self.config.reference:
            raise RewardError(f"degradation {d} is <= -reference ({-self.config.reference}); log term undefined")
        self.cache[key] = d
        self.evaluations += 1
        return d, True

    def __call__(self, allocation: Mapping[str, str], used_bytes: int, budget_matrix_bytes: int) -> RewardOutcome:
        c = self.config
        over = max(0, used_bytes - budget_matrix_bytes) / budget_matrix_bytes
        unused = max(0, budget_matrix_bytes - used_bytes) / budget_matrix_bytes
        if over > c.tolerance:
            return RewardOutcome(c.cliff, None, used_bytes, budget_matrix_bytes, False)
        d, evaluated = self.degradation(allocation)
        r = -c.scale * QUALITY_TERMS[c.quality](d, c.reference) - c.unused_weight * unused - c.over_weight * over
        return RewardOutcome(float(r), d, used_bytes, budget_matrix_bytes, evaluated)
