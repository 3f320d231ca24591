"""Pooled SAC training (ramp.sac.pool): one policy from several models, used zero-shot on another."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import save

from ramp.allocate import allocate, residual_prior
from ramp.allocation import matrix_bytes, uniform
from ramp.formats import get_format
from ramp.sac.agent import SACConfig, torch_threads
from ramp.sac.env import AllocationEnv, EnvConfig, SyntheticTask
from ramp.sac.pool import PoolMember, train_pool

FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
CONFIG = SACConfig(seed=0, episodes=30, random_episodes=6, batch_size=32, bc_steps=200)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def flat_cost(task: SyntheticTask) -> dict[tuple[str, str], float]:
    """A proxy blind to the sensitivities (every weight alike): its uniform-fill is the residual map's prior."""
    return {(s.gguf_name, f): s.params * 2.0 ** -get_format(f).bpw for s in task.slots for f in s.formats}


def task_env(seed: int, n_slots: int, action_map: str = "level") -> tuple[AllocationEnv, SyntheticTask]:
    task = SyntheticTask.make(n_slots=n_slots, seed=seed, formats=FORMATS)
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    prior = residual_prior(slots, flat_cost(task), budget) if action_map == "residual" else None
    config = EnvConfig(action_map=action_map)
    return AllocationEnv(slots, task.features, budget, task.degradation, config=config, prior=prior), task


def members(n: int = 2, action_map: str = "level") -> tuple[list[PoolMember], list[SyntheticTask]]:
    out, tasks = [], []
    for i in range(n):
        env, task = task_env(seed=10 + i, n_slots=10 + 2 * i, action_map=action_map)
        _, optimum = task.optimum(env.budget_matrix_bytes)
        out.append(PoolMember(f"model{i}", env, [uniform(list(task.slots), "Q4_K"), optimum]))
        tasks.append(task)
    return out, tasks


def zero_shot_gain(result, seeds=(97, 98, 99)) -> list[float]:
    """Per unseen task, how far the policy's allocation goes from uniform Q4_K (0) to the optimum (1)."""
    out = []
    for seed in seeds:
        env, task = task_env(seed=seed, n_slots=14)
        slots = list(task.slots)
        alloc = allocate(result.policy, slots, task.features, env.budget_matrix_bytes, prior_cost=flat_cost(task))
        assert matrix_bytes(slots, alloc) <= env.budget_matrix_bytes
        flat = task.degradation(uniform(slots, "Q4_K"))
        optimum, _ = task.optimum(env.budget_matrix_bytes)
        out.append((flat - task.degradation(alloc)) / (flat - optimum))
    return out


def test_pooled_policy_allocates_unseen_tasks_and_more_sources_transfer_better():
    pool, tasks = members(4)
    res = train_pool(pool, CONFIG, progress=False)
    # every member's best is its optimum demonstration (nothing beats it), measured on that member
    for m, task in zip(pool, tasks, strict=True):
        optimum, _ = task.optimum(m.env.budget_matrix_bytes)
        assert res.best[m.name]["degradation"] == pytest.approx(optimum)
        assert res.evaluations[m.name] == len(m.env.rewards.cache) > 0
    assert {r["model"] for r in res.log} == {m.name for m in pool}
    assert sum(not r.get("demo") for r in res.log) == CONFIG.episodes
    assert min(res.policy_matches_best.values()) >= 0.9
    # zero-shot: tasks the policy never saw, not evaluated once
    gain = zero_shot_gain(res)
    assert min(gain) > 0.5, gain
    one = zero_shot_gain(train_pool(members(1)[0], CONFIG, progress=False))
    assert np.mean(gain) > np.mean(one) + 0.2, (gain, one)


def test_pooled_run_is_deterministic_per_seed():
    def actor(result) -> bytes:
        return save({k: v.contiguous() for k, v in result.policy.actor.state_dict().items()})

    config = SACConfig(**{**CONFIG.__dict__, "episodes": 12})
    a = train_pool(members()[0], config, progress=False)
    b = train_pool(members()[0], config, progress=False)
    assert actor(a) == actor(b) and a.log == b.log
    c = train_pool(members()[0], SACConfig(**{**config.__dict__, "seed": 1}), progress=False)
    assert actor(c) != actor(a)


def test_pool_members_must_be_named_apart_and_walk_alike():
    pool, _ = members()
    with pytest.raises(ValueError, match="distinct names"):
        train_pool([pool[0], PoolMember("model0", pool[1].env)], CONFIG, progress=False)
    other, _ = members(1, action_map="index")
    with pytest.raises(ValueError, match="env settings"):
        train_pool([pool[0], PoolMember("other", other[0].env)], CONFIG, progress=False)
    with pytest.raises(ValueError, match="at least one model"):
        train_pool([], CONFIG, progress=False)
    blind = AllocationEnv(pool[0].env.slots, pool[0].env.features, pool[0].env.budget_matrix_bytes, None)
    with pytest.raises(ValueError, match="no quality_fn"):
        train_pool([PoolMember("blind", blind)], CONFIG, progress=False)


def test_without_demonstrations_the_pool_still_trains_every_member():
    pool, tasks = members()
    bare = [PoolMember(m.name, m.env) for m in pool]
    res = train_pool(bare, SACConfig(**{**CONFIG.__dict__, "episodes": 10}), progress=False)
    assert [r["model"] for r in res.log] == ["model0", "model1"] * 5
    for m, task in zip(bare, tasks, strict=True):
        best = res.best[m.name]
        assert best is not None and best["bytes"] <= m.env.budget_matrix_bytes
        assert task.degradation(best["allocation"]) == pytest.approx(best["degradation"])
    assert np.isfinite([r["reward"] for r in res.log]).all()


def test_residual_pool_learns_corrections_that_transfer():
    """Under the residual map the policy learns steps away from each model's uniform-fill: on unseen tasks they
    move the allocation most of the way to the optimum, as the level map's whole allocations do."""
    pool, _ = members(4, action_map="residual")
    res = train_pool(pool, CONFIG, progress=False)
    assert res.policy.env_config["action_map"] == "residual"
    gain = zero_shot_gain(res)
    assert min(gain) > 0.5, gain
