"""The allocation environment and the reward: observations, the budget wall, caching, penalties, the cliff."""

import math

import numpy as np
import pytest

from ramp.allocation import AllocationError, matrix_bytes, min_matrix_bytes, uniform
from ramp.formats import get_format
from ramp.sac.env import (
    BPW_LEVELS,
    AllocationEnv,
    EnvConfig,
    EnvError,
    SyntheticTask,
    action_map,
)
from ramp.sac.reward import RewardConfig, RewardError, RewardModel
from ramp.sac.train import demonstration_actions


@pytest.fixture
def task():
    return SyntheticTask.make(n_slots=6, seed=3)


def walk(env, actions):
    env.reset()
    for a in actions:
        obs, r, done, info = env.step(a)
    assert done
    return obs, r, info


@pytest.mark.parametrize(("action", "k"), [(0.0, 0), (0.16, 0), (0.17, 1), (0.5, 3), (0.999, 5), (1.0, 5), (1.5, 5)])
def test_format_index_splits_unit_interval_evenly(action, k):
    assert action_map(["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]).format_index(action) == k


FULL = ("Q2_K", "Q3_K", "Q4_0", "IQ4_NL", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0", "F16")


def test_level_map_gives_each_bpw_level_an_equal_part_and_ties_share_it():
    g = len(BPW_LEVELS)
    assert g == 9
    m = action_map(FULL, "level")
    np.testing.assert_allclose(m.edges[:3], [0, 1 / g, 2 / g])
    np.testing.assert_allclose(m.edges[3:5], [2 / g + 1 / (3 * g), 2 / g + 2 / (3 * g)])  # three formats at 4.5 bpw
    assert FULL[m.format_index(0.999)] == "F16" and FULL[m.format_index(0.0)] == "Q2_K"
    for k in range(len(FULL)):
        assert m.format_index(m.centre(k)) == k
        assert m.tanh_start(k) == pytest.approx(2 * m.edges[k] - 1)


def test_level_map_means_the_same_bpw_on_a_pruned_list():
    pruned = ("Q3_K", "IQ4_NL", "Q5_0", "Q8_0")
    full, short = action_map(FULL, "level"), action_map(pruned, "level")
    levels = {get_format(f).bpw for f in pruned}
    seen = set()
    for a in np.linspace(0, 1, 1001):
        want = get_format(FULL[full.format_index(a)]).bpw
        got = get_format(pruned[short.format_index(a)]).bpw
        if want in levels:
            assert got == want, a
        seen.add(got)
    assert seen == levels
    # under the index map the same action means different bpw: 0.2 is Q4_0 on the full list, Q3_K on the short one
    assert FULL[action_map(FULL).format_index(0.2)] == "Q4_0"
    assert pruned[action_map(pruned).format_index(0.2)] == "Q3_K"


def test_level_map_errors_name_the_bad_value():
    with pytest.raises(EnvError, match="'bits'"):
        action_map(FULL, "bits")
    with pytest.raises(EnvError, match="not ordered"):
        action_map(("Q8_0", "Q2_K"), "level")


def test_level_map_env_walks_demonstrations_and_fits_its_budget_level(task):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    env = AllocationEnv(slots, task.features, budget, task.degradation, config=EnvConfig(action_map="level"))
    level = env.budget_level()
    _, _, info = walk(env, [level] * len(slots))
    assert info["used_bytes"] <= budget and set(info["allocation"].values()) == {"Q4_K"}
    mixed = {s.gguf_name: s.formats[i % len(s.formats)] for i, s in enumerate(slots)}
    off = AllocationEnv(slots, task.features, 10**9, task.degradation, config=EnvConfig(wall=False, action_map="level"))
    _, _, info = walk(off, demonstration_actions(off, mixed))
    assert info["allocation"] == mixed


def test_observation_is_features_plus_budget_state(task):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    env = AllocationEnv(slots, task.features, budget, task.degradation)
    obs = env.reset()
    assert obs.dtype == np.float32 and obs.shape == (11 + 3,)
    np.testing.assert_array_equal(obs[:11], task.features[0])
    np.testing.assert_allclose(obs[11:], [1.0, 1.0, 0.0])
    obs, r, done, info = env.step(0.0)  # cheapest format (Q2_K, 2.625 bpw)
    assert not done and r == 0.0 and info["format"] == "Q2_K"
    np.testing.assert_array_equal(obs[:11], task.features[1])
    spent = slots[0].file_bytes("Q2_K")
    np.testing.assert_allclose(obs[11:], [(budget - spent) / budget, 5 / 6, 2.625 / 16], rtol=1e-6)


@pytest.mark.parametrize("budget_fmt", ["Q2_K", "Q3_K", "Q4_K", "Q6_K"])
def test_wall_keeps_every_greedy_walk_within_budget(task, budget_fmt):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, budget_fmt)) + 100
    env = AllocationEnv(slots, task.features, budget, task.degradation)
    _, _, info = walk(env, [1.0] * len(slots))  # always asks for the dearest format
    assert info["used_bytes"] == matrix_bytes(slots, info["allocation"]) <= budget
    # the wall clamps only as much as needed: the first slots get the dearest format while it fits
    assert info["allocation"][slots[0].gguf_name] == ("Q8_0" if budget_fmt != "Q2_K" else "Q2_K")
    assert budget - info["used_bytes"] < max(s.file_bytes("Q8_0") for s in slots)


def test_wall_off_lets_the_walk_exceed_and_hit_the_cliff(task):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q3_K"))
    env = AllocationEnv(slots, task.features, budget, task.degradation, RewardConfig(cliff=-7.5), EnvConfig(wall=False))
    _, r, info = walk(env, [1.0] * len(slots))
    assert info["used_bytes"] > budget
    assert r == -7.5 and info["outcome"].degradation is None and env.rewards.evaluations == 0


def test_budget_below_minimum_names_both_numbers(task):
    slots = list(task.slots)
    low = min_matrix_bytes(slots) - 1
    with pytest.raises(
        AllocationError, match=f"budget {low:,d} B is below the smallest legal allocation {low + 1:,d} B"
    ):
        AllocationEnv(slots, task.features, low, task.degradation)


def test_bad_features_are_named(task):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    bad = task.features.copy()
    bad[2, 4] = np.nan
    with pytest.raises(EnvError, match=r"feature 'x4' of slot 2 is nan"):
        AllocationEnv(slots, bad, budget, task.degradation)
    with pytest.raises(EnvError, match=r"shape \[6, 10\]; expected \[6 slots, 11 features\]"):
        AllocationEnv(
            slots, task.features[:, :10], budget, task.degradation, feature_names=[f"f{i}" for i in range(11)]
        )


def test_reward_is_cached_per_allocation(task):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    calls = []

    def quality(alloc):
        calls.append(dict(alloc))
        return task.degradation(alloc)

    env = AllocationEnv(slots, task.features, budget, quality)
    _, r1, info1 = walk(env, [0.5] * 6)
    _, r2, info2 = walk(env, [0.5] * 6)
    _, r3, _ = walk(env, [0.0] * 6)
    assert len(calls) == 2 == env.rewards.evaluations
    assert r1 == r2 and info1["outcome"].evaluated and not info2["outcome"].evaluated
    assert r3 < r1  # all Q2_K is worse than all Q4_K


def test_reward_terms_are_asymmetric_and_documented_values():
    cfg = RewardConfig(quality="linear", reference=0.1, scale=2.0, unused_weight=0.5, over_weight=20.0, tolerance=0.05)
    model = RewardModel(lambda a: 0.05, cfg)
    at = model({"a": "Q4_K"}, 1000, 1000).reward
    assert at == pytest.approx(-2.0 * 0.5)
    under = model({"a": "Q4_K"}, 900, 1000).reward
    over = model({"a": "Q4_K"}, 1040, 1000).reward
    assert under == pytest.approx(at - 0.5 * 0.1)
    assert over == pytest.approx(at - 20.0 * 0.04)
    assert at - over > 10 * (at - under) / 2.5  # exceeding by 4 % costs far more than leaving 10 % unused
    assert model({"a": "Q4_K"}, 1060, 1000).reward == cfg.cliff
    log_model = RewardModel(lambda a: 0.05, RewardConfig(reference=0.05))
    assert log_model({"a": "Q4_K"}, 1000, 1000).reward == pytest.approx(-math.log(2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quality": "cubic"}, "quality term 'cubic' unknown"),
        ({"reference": 0}, "reference=0"),
        ({"over_weight": -1}, "over_weight=-1"),
    ],
)
def test_reward_config_rejects_bad_terms(kwargs, match):
    with pytest.raises(RewardError, match=match):
        RewardConfig(**kwargs)


def test_non_finite_quality_is_an_error():
    model = RewardModel(lambda a: float("nan"))
    with pytest.raises(RewardError, match="non-finite degradation nan"):
        model({"a": "Q4_K"}, 10, 10)


def test_synthetic_optimum_beats_every_uniform_allocation_within_budget(task):
    slots = list(task.slots)
    for fmt in slots[0].formats:
        alloc = uniform(slots, fmt)
        budget = matrix_bytes(slots, alloc)
        best, opt = task.optimum(budget)
        assert matrix_bytes(slots, opt) <= budget
        assert best == pytest.approx(task.degradation(opt)) and best <= task.degradation(alloc) + 1e-15


def test_synthetic_optimum_equals_brute_force():
    import itertools

    task = SyntheticTask.make(n_slots=5, seed=11, formats=("Q2_K", "Q3_K", "Q4_K", "Q6_K"))
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q3_K")) + 5000
    best = min(
        task.degradation(a)
        for combo in itertools.product(*(s.formats for s in slots))
        if matrix_bytes(slots, a := {s.gguf_name: f for s, f in zip(slots, combo, strict=True)}) <= budget
    )
    assert task.optimum(budget)[0] == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("prior", range(6))
def test_residual_map_steps_from_the_prior_and_its_middle_is_the_prior(prior):
    amap = action_map(FULL, "residual", prior)
    assert amap.format_index(0.5) == prior and amap.centre(prior) == 0.5
    # the five equal parts step -2 .. +2 formats from the prior, clamped to the list
    picks = [amap.format_index((j + 0.5) / 5) for j in range(5)]
    assert picks == [min(max(prior + d, 0), len(FULL) - 1) for d in (-2, -1, 0, 1, 2)]
    assert {amap.format_index(a) for a in np.linspace(0, 1, 101)} == set(picks)
    for k in range(len(FULL)):
        reach = min(max(k, prior - 2), prior + 2)  # a demonstration out of reach lands on the nearest reachable
        assert amap.format_index(amap.centre(k)) == reach
        assert (amap.width(k) > 0) == (k in picks)
    assert sum(amap.width(k) for k in range(len(FULL))) == pytest.approx(1.0)


def test_residual_map_needs_a_prior_in_range():
    for bad in (None, -1, len(FULL)):
        with pytest.raises(EnvError, match=f"prior format index in \\[0, {len(FULL)}\\); got {bad}"):
            action_map(FULL, "residual", bad)


def test_residual_env_observes_the_prior_and_its_middle_walk_is_the_prior(task):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q5_K"))
    prior = [i % 4 for i in range(len(slots))]
    config = EnvConfig(action_map="residual")
    with pytest.raises(EnvError, match="one prior format index per slot \\(6\\); got None"):
        AllocationEnv(slots, task.features, budget, task.degradation, config=config)
    with pytest.raises(EnvError, match="per slot \\(6\\); got 2"):
        AllocationEnv(slots, task.features, budget, task.degradation, config=config, prior=[0, 1])
    env = AllocationEnv(slots, task.features, budget, task.degradation, config=config, prior=prior)
    obs = env.reset()
    assert obs.shape == (11 + 4,) and env.obs_dim == 15
    assert obs[-1] == pytest.approx(get_format(slots[0].formats[prior[0]]).bpw / 16)
    assert env.budget_level() == 0.5
    _, _, info = walk(env, [0.5] * len(slots))
    assert info["allocation"] == {s.gguf_name: s.formats[k] for s, k in zip(slots, prior, strict=True)}
    # the prior is part of what defines the task
    other = AllocationEnv(slots, task.features, budget, task.degradation, config=config, prior=prior[::-1])
    assert other.fingerprint() != env.fingerprint()
