"""Evolutionary search: children stay legal and within budget, the search improves on its start under the
evaluation budget it is given, and a seed fixes the result."""

import numpy as np
import pytest

from ramp.allocation import AllocationError, matrix_bytes, min_matrix_bytes
from ramp.evolution import EvolutionConfig, evolve, mutate
from ramp.sac.env import SyntheticTask


def _task():
    task = SyntheticTask.make(n_slots=16, seed=3, spread=2.0)
    slots = list(task.slots)
    cheapest = {s.gguf_name: s.formats[0] for s in slots}
    budget = (
        min_matrix_bytes(slots)
        + (matrix_bytes(slots, {s.gguf_name: s.formats[-1] for s in slots}) - min_matrix_bytes(slots)) // 3
    )
    return task, slots, cheapest, budget


def test_mutations_stay_legal_and_within_budget():
    task, slots, start, budget = _task()
    rng = np.random.default_rng(0)
    parent = dict(start)
    changed = 0
    for _ in range(200):
        child = mutate(slots, parent, budget, rng, max_switches=3)
        assert matrix_bytes(slots, child) <= budget  # validates legality too
        changed += child != parent
        parent = child
    assert changed > 150


def test_evolution_beats_its_start_within_its_evaluation_budget():
    task, slots, start, budget = _task()
    calls = {"full": 0, "screen": 0}

    def full(a):
        calls["full"] += 1
        return task.degradation(a)

    def screen(a):
        calls["screen"] += 1
        return task.degradation(a) * 1.01

    cfg = EvolutionConfig(evaluations=40, offspring=4, survivors=1, seed=1)
    res = evolve(slots, start, budget, full, screen, 0.5, cfg, progress=False)
    assert res.fitness < task.degradation(start)
    assert res.fitness == pytest.approx(task.degradation(res.allocation))
    assert matrix_bytes(slots, res.allocation) <= budget
    assert res.evaluations <= 40 and calls["full"] + 0.5 * calls["screen"] == pytest.approx(res.evaluations)
    again = evolve(slots, start, budget, task.degradation, task.degradation, 0.5, cfg, progress=False)
    assert (
        again.allocation
        == evolve(slots, start, budget, task.degradation, task.degradation, 0.5, cfg, progress=False).allocation
    )


def test_bad_inputs_are_refused():
    task, slots, start, budget = _task()
    with pytest.raises(ValueError, match="survivors"):
        EvolutionConfig(offspring=2, survivors=3)
    with pytest.raises(AllocationError, match="budget"):
        evolve(slots, {s.gguf_name: s.formats[-1] for s in slots}, budget, task.degradation, task.degradation, 0.5)
    with pytest.raises(ValueError, match="screen_cost"):
        evolve(slots, start, budget, task.degradation, task.degradation, 0.0)
