"""One budget type: a size target stated as whole-file bytes or as bits per weight, resolved to matrix bytes.

Two units, never confused:

* ``file_bytes``: the size of the whole exported GGUF file (header, tokenizer, embeddings, norms included);
* ``matrix_bytes``: the padded data bytes of the quantizable matrices, what allocators spend
  (:func:`ramp.allocation.matrix_bytes`). ``file_bytes = overhead_bytes + matrix_bytes``, where the overhead
  (:func:`ramp.gguf_export.file_overhead`) does not depend on the allocation.

``bpw`` is bits per weight of the quantizable matrices: ``matrix_bytes = floor(bpw * n_params / 8)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ramp.allocation import AllocationError, Slot, min_matrix_bytes

MAX_BPW = 32.0  # F32 everywhere: a larger budget is a typo, not a size target


class BudgetError(AllocationError):
    """A budget that is malformed or that no legal allocation of the model fits (the message names the value)."""


@dataclass(frozen=True)
class Budget:
    """What the user asked for: exactly one of ``file_bytes`` and ``bpw``; ``where`` names it in errors."""

    file_bytes: int | None = None
    bpw: float | None = None
    where: str = "budget"

    def __post_init__(self) -> None:
        if (self.file_bytes is None) == (self.bpw is None):
            raise BudgetError(
                f"{self.where}: set exactly one of budget_file_bytes ({self.file_bytes}) and budget_bpw ({self.bpw})"
            )
        if self.file_bytes is not None and (isinstance(self.file_bytes, bool) or self.file_bytes <= 0):
            raise BudgetError(f"{self.where}: budget_file_bytes={self.file_bytes} must be a positive number of bytes")
        if self.bpw is not None and not (math.isfinite(self.bpw) and 0 < self.bpw <= MAX_BPW):
            raise BudgetError(f"{self.where}: budget_bpw={self.bpw} must be in (0, {MAX_BPW}] bits per weight")

    def describe(self) -> str:
        """The budget in the unit the user gave."""
        return f"{self.file_bytes:,d} B (whole file)" if self.file_bytes is not None else f"{self.bpw} bpw"

    def resolve(self, slots: Sequence[Slot], overhead_bytes: int) -> ResolvedBudget:
        """Both units for this model; :class:`BudgetError` when even the smallest legal allocation does not fit."""
        n = sum(s.params for s in slots)
        bpw_bytes = None if self.bpw is None else int(self.bpw * n / 8)
        matrix = self.file_bytes - overhead_bytes if self.file_bytes is not None else bpw_bytes
        floor = min_matrix_bytes(list(slots))
        if matrix < floor:
            raise BudgetError(
                f"{self.where}: budget {self.describe()} leaves {matrix:,d} B for the matrices, below the smallest "
                f"legal allocation of this model: {floor + overhead_bytes:,d} B file, {8 * floor / n:.3f} bpw "
                f"({overhead_bytes:,d} B are header, embeddings and norms)"
            )
        return ResolvedBudget(file_bytes=overhead_bytes + matrix, matrix_bytes=matrix, overhead_bytes=overhead_bytes)


@dataclass(frozen=True)
class ResolvedBudget:
    """A budget in both units for one model: ``file_bytes = overhead_bytes + matrix_bytes``."""

    file_bytes: int
    matrix_bytes: int
    overhead_bytes: int
