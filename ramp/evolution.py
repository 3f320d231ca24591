"""Evolutionary search with KLD fitness (EvoPress-style), a baseline that spends the same KLD evaluations as SAC.

One parent allocation; each generation makes ``offspring`` children by budget-keeping level switches (raise
1..``max_switches`` random matrices one format up; to pay for it, lower other random matrices one format down until
the bytes are within the budget again), screens them on the first ``screen_windows`` calibration windows (a
cheaper, noisier fitness, as EvoPress selects on growing token counts), scores the ``survivors`` best on all
windows, and keeps the best of parent and survivors (elitist). ``evaluations`` is the budget in full-window
evaluations: a screen costs ``screen_windows / windows`` of one. Seeded: the same inputs give the same search.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from ramp.allocation import Allocation, AllocationError, Slot, matrix_bytes

log = logging.getLogger(__name__)

Fitness = Callable[[Allocation], float]


@dataclass(frozen=True)
class EvolutionConfig:
    evaluations: float = 60.0  # full-window KLD evaluations to spend (the starting parent's included)
    offspring: int = 6
    survivors: int = 1
    max_switches: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.evaluations < 1 or self.offspring < 1 or not 1 <= self.survivors <= self.offspring:
            raise ValueError(
                f"evolution needs evaluations >= 1, offspring >= 1 and 1 <= survivors <= offspring; got "
                f"{self.evaluations}, {self.offspring}, {self.survivors}"
            )
        if self.max_switches < 1:
            raise ValueError(f"max_switches={self.max_switches} must be >= 1")


@dataclass
class EvolutionResult:
    allocation: Allocation
    fitness: float  # full-window KLD of ``allocation``
    evaluations: float  # full-window evaluations spent
    generations: int
    history: list[dict] = field(default_factory=list)


def mutate(
    slots: Sequence[Slot], parent: Allocation, budget_matrix_bytes: int, rng: np.random.Generator, max_switches: int
) -> Allocation:
    """A child of ``parent`` within ``budget_matrix_bytes``: 1..``max_switches`` random matrices one format up,
    other random matrices one format down until it fits (the parent itself when nothing can move)."""
    child = dict(parent)
    index = {s.gguf_name: s.formats.index(parent[s.gguf_name]) for s in slots}
    used = matrix_bytes(list(slots), child)
    raised: set[str] = set()
    for _ in range(int(rng.integers(1, max_switches + 1))):
        up = [s for s in slots if index[s.gguf_name] + 1 < len(s.formats) and s.gguf_name not in raised]
        if not up:
            break
        s = up[int(rng.integers(len(up)))]
        k = index[s.gguf_name]
        used += s.file_bytes(s.formats[k + 1]) - s.file_bytes(s.formats[k])
        index[s.gguf_name] = k + 1
        raised.add(s.gguf_name)
        while used > budget_matrix_bytes:
            down = [x for x in slots if index[x.gguf_name] > 0 and x.gguf_name not in raised]
            if not down:
                return dict(parent)
            x = down[int(rng.integers(len(down)))]
            j = index[x.gguf_name]
            used -= x.file_bytes(x.formats[j]) - x.file_bytes(x.formats[j - 1])
            index[x.gguf_name] = j - 1
    for s in slots:
        child[s.gguf_name] = s.formats[index[s.gguf_name]]
    return child


def evolve(
    slots: Sequence[Slot],
    start: Allocation,
    budget_matrix_bytes: int,
    fitness: Fitness,
    screen: Fitness,
    screen_cost: float,
    config: EvolutionConfig = EvolutionConfig(),
    progress: bool = True,
) -> EvolutionResult:
    """Search from ``start`` (within the budget). ``fitness``: KLD on all windows (cost 1); ``screen``: KLD on the
    first windows (cost ``screen_cost`` in (0, 1])."""
    slots = list(slots)
    if matrix_bytes(slots, start) > budget_matrix_bytes:
        raise AllocationError(f"evolution start uses more than the budget {budget_matrix_bytes:,d} B")
    if not 0.0 < screen_cost <= 1.0:
        raise ValueError(f"screen_cost={screen_cost} must be in (0, 1]")
    rng = np.random.default_rng(config.seed)
    parent, best = dict(start), fitness(start)
    spent, generation = 1.0, 0
    history = [{"generation": 0, "fitness": best, "evaluations": spent}]
    per_generation = config.offspring * screen_cost + config.survivors
    bar = tqdm(total=int(config.evaluations), desc="evolution", unit="eval", disable=not progress)
    bar.update(1)
    while spent + per_generation <= config.evaluations + 1e-9:
        generation += 1
        children = [
            mutate(slots, parent, budget_matrix_bytes, rng, config.max_switches) for _ in range(config.offspring)
        ]
        screened = sorted(((screen(c), i) for i, c in enumerate(children)), key=lambda t: t)
        for _, i in screened[: config.survivors]:
            f = fitness(children[i])
            if f < best:
                parent, best = children[i], f
        spent += per_generation
        bar.update(round(spent) - bar.n)
        bar.set_postfix(kld=f"{best:.5f}")
        history.append({"generation": generation, "fitness": best, "evaluations": spent})
    bar.close()
    log.info("evolution: %d generations, %.1f evaluations, KLD %.6f", generation, spent, best)
    return EvolutionResult(parent, best, spent, generation, history)
