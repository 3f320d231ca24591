"""Training: learns a synthetic knapsack with known sensitivities, same seed = same bytes, exact resume."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save

from ramp.allocate import allocate, policy_walk
from ramp.allocation import matrix_bytes, uniform
from ramp.sac.agent import SACConfig, torch_threads
from ramp.sac.env import AllocationEnv, SyntheticTask
from ramp.sac.reward import RewardConfig
from ramp.sac.train import CheckpointError, train_policy

FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q6_K")
QUICK = SACConfig(seed=0, episodes=24, random_episodes=4, batch_size=32, checkpoint_every=5)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def make_env(
    n_slots: int = 8, seed: int = 0, reward: RewardConfig | None = None
) -> tuple[AllocationEnv, SyntheticTask]:
    task = SyntheticTask.make(n_slots=n_slots, seed=seed, formats=FORMATS)
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    return AllocationEnv(slots, task.features, budget, task.degradation, reward), task


def actor_bytes(result) -> bytes:
    return save({k: v.contiguous() for k, v in result.policy.actor.state_dict().items()})


def test_learns_synthetic_knapsack_within_two_percent_of_optimum():
    env, task = make_env()
    slots = list(task.slots)
    optimum, _ = task.optimum(env.budget_matrix_bytes)
    res = train_policy(env, SACConfig(seed=0, episodes=300), progress=False)
    assert res.best_degradation <= 1.02 * optimum
    assert matrix_bytes(slots, res.best_allocation) <= env.budget_matrix_bytes
    assert task.degradation(res.best_allocation) == pytest.approx(res.best_degradation)
    # the policy itself improved on the random warm-up and its greedy-filled output beats uniform Q4_K
    degs = [row["degradation"] for row in res.log]
    assert np.mean(degs[-30:]) < 0.75 * np.mean(degs[:10])
    alloc = allocate(res.policy, slots, task.features, env.budget_matrix_bytes)
    assert matrix_bytes(slots, alloc) <= env.budget_matrix_bytes
    assert task.degradation(alloc) < task.degradation(uniform(slots, "Q4_K"))
    # each distinct allocation was evaluated once: repeats are cache hits
    assert res.evaluations == len(env.rewards.cache) == sum(row["evaluated"] for row in res.log) < 300


def test_same_seed_same_weights_and_allocation():
    a = train_policy(make_env()[0], QUICK, progress=False)
    b = train_policy(make_env()[0], QUICK, progress=False)
    assert actor_bytes(a) == actor_bytes(b)
    assert a.log == b.log and a.best_allocation == b.best_allocation
    env, task = make_env()
    slots = list(task.slots)
    assert allocate(a.policy, slots, task.features, env.budget_matrix_bytes) == allocate(
        b.policy, slots, task.features, env.budget_matrix_bytes
    )
    c = train_policy(make_env()[0], SACConfig(**{**QUICK.__dict__, "seed": 1}), progress=False)
    assert actor_bytes(c) != actor_bytes(a)


def test_resume_equals_uninterrupted(tmp_path):
    full = train_policy(make_env()[0], QUICK, checkpoint_dir=tmp_path / "full", progress=False)
    part = train_policy(make_env()[0], QUICK, checkpoint_dir=tmp_path / "split", progress=False, stop_after_episodes=13)
    assert part.episodes == 13
    rest = train_policy(make_env()[0], QUICK, checkpoint_dir=tmp_path / "split", resume=True, progress=False)
    assert rest.episodes == QUICK.episodes
    assert actor_bytes(rest) == actor_bytes(full)
    assert rest.log == full.log and rest.evaluations == full.evaluations
    assert rest.best_allocation == full.best_allocation
    for name in ("q1", "q2", "q1_target", "q2_target"):
        for p, q in zip(getattr(full.agent, name).parameters(), getattr(rest.agent, name).parameters(), strict=True):
            assert torch.equal(p, q)
    meta = json.loads((tmp_path / "split" / "state.json").read_text())
    assert meta["episode"] == QUICK.episodes and len(meta["reward_cache"]) == full.evaluations


def test_checkpoint_from_another_config_names_the_keys(tmp_path):
    train_policy(make_env()[0], QUICK, checkpoint_dir=tmp_path, progress=False, stop_after_episodes=5)
    other = SACConfig(**{**QUICK.__dict__, "tau": 0.5})
    with pytest.raises(CheckpointError, match=r"another config; differing keys: sac.tau: checkpoint 0.01 vs now 0.5"):
        train_policy(make_env()[0], other, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"reward.unused_weight"):
        train_policy(make_env(reward=RewardConfig(unused_weight=1.0))[0], QUICK, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="another task"):
        train_policy(make_env(seed=5)[0], QUICK, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train_policy(make_env()[0], QUICK, checkpoint_dir=tmp_path / "empty", resume=True, progress=False)


def test_log_has_reward_degradation_bpw_entropy():
    res = train_policy(make_env()[0], QUICK, progress=False)
    row = res.log[-1]
    assert {"episode", "reward", "degradation", "bytes", "bpw", "alpha", "entropy", "evaluations"} <= set(row)
    assert row["episode"] == QUICK.episodes - 1 and 2.6 < row["bpw"] < 6.6 and row["entropy"] is not None
    assert res.log[0]["entropy"] is None  # no update during the random warm-up


DEMO = SACConfig(**{**QUICK.__dict__, "bc_steps": 400, "bc_weight": 1.0, "warmup_spread": 0.1})


def test_demonstration_is_measured_cloned_and_explored_around():
    env, task = make_env()
    slots = list(task.slots)
    _, optimum = task.optimum(env.budget_matrix_bytes)
    flat = uniform(slots, "Q4_K")
    res = train_policy(env, DEMO, progress=False, demonstrations=[flat, optimum])
    demo_rows = [r for r in res.log if r.get("demo")]
    assert [r["episode"] for r in demo_rows] == [-1, -2]
    assert demo_rows[0]["degradation"] == pytest.approx(task.degradation(flat))
    assert demo_rows[1]["degradation"] == pytest.approx(task.degradation(optimum))
    assert res.episodes == DEMO.episodes and len(res.log) == DEMO.episodes + 2
    # the demonstration is the optimum, so nothing seen can beat it
    assert res.best_degradation == pytest.approx(task.degradation(optimum))
    # cloning (of the better demonstration) plus the TD3+BC term keep the deterministic walk on it
    alloc = allocate(res.policy, slots, task.features, env.budget_matrix_bytes)
    same = sum(alloc[s.gguf_name] == optimum[s.gguf_name] for s in slots)
    assert same >= len(slots) - 1
    # a run without the demonstration does not land there by chance in 24 episodes
    plain = train_policy(make_env()[0], QUICK, progress=False)
    plain_alloc = allocate(plain.policy, slots, task.features, env.budget_matrix_bytes)
    assert task.degradation(alloc) < task.degradation(plain_alloc)


def test_resume_with_demonstrations_equals_uninterrupted(tmp_path):
    env, task = make_env()
    demo = [task.optimum(env.budget_matrix_bytes)[1]]
    full = train_policy(make_env()[0], DEMO, checkpoint_dir=tmp_path / "full", progress=False, demonstrations=demo)
    train_policy(
        make_env()[0], DEMO, checkpoint_dir=tmp_path / "s", progress=False, stop_after_episodes=7, demonstrations=demo
    )
    rest = train_policy(
        make_env()[0], DEMO, checkpoint_dir=tmp_path / "s", resume=True, progress=False, demonstrations=demo
    )
    assert actor_bytes(rest) == actor_bytes(full) and rest.log == full.log
    with pytest.raises(CheckpointError, match="other demonstrations"):
        train_policy(make_env()[0], DEMO, checkpoint_dir=tmp_path / "s", resume=True, progress=False)


def test_demonstration_with_an_illegal_format_is_named():
    env, task = make_env()
    bad = {s.gguf_name: "Q4_K" for s in task.slots}
    bad[task.slots[3].gguf_name] = "Q8_0"
    with pytest.raises(ValueError, match=r"blk\.3\.synthetic\.weight format 'Q8_0'"):
        train_policy(env, DEMO, progress=False, demonstrations=[bad])


def test_self_imitation_makes_the_policy_follow_the_best_allocation_found():
    env, task = make_env()
    slots = list(task.slots)
    flat = uniform(slots, "Q4_K")
    cfg = SACConfig(**{**DEMO.__dict__, "episodes": 60, "self_imitation": True})
    res = train_policy(env, cfg, progress=False, demonstrations=[flat])
    assert res.best_degradation < task.degradation(flat)  # exploration found better than the demonstration
    alloc = allocate(res.policy, slots, task.features, env.budget_matrix_bytes)
    # the deterministic walk follows the best allocation seen, not the (worse) demonstration it was cloned on
    assert task.degradation(alloc) <= 1.02 * res.best_degradation < task.degradation(flat)
    # after the last episode the actor is distilled onto the best allocation: its walk reproduces it exactly
    assert res.policy_matches_best == 1.0
    assert policy_walk(res.policy, slots, task.features, env.budget_matrix_bytes)[0] == res.best_allocation
    # ... also without self-imitation, where the cloning term held it on the demonstration during training
    plain = train_policy(
        make_env()[0], SACConfig(**{**cfg.__dict__, "self_imitation": False}), progress=False, demonstrations=[flat]
    )
    assert plain.policy_matches_best == 1.0 and plain.best_allocation != flat
    assert policy_walk(plain.policy, slots, task.features, env.budget_matrix_bytes)[0] == plain.best_allocation


def test_rescoring_picks_the_best_candidate_on_the_other_measure_and_the_policy_follows_it(tmp_path):
    env, task = make_env()
    slots = list(task.slots)
    other = SyntheticTask.make(n_slots=8, seed=5, formats=FORMATS)  # another sensitivity: "held-out windows"
    measured = []

    def rescore(alloc):
        measured.append(dict(alloc))
        return other.degradation(alloc)

    cfg = SACConfig(**{**DEMO.__dict__, "episodes": 30, "self_imitation": True})
    demo = [uniform(slots, "Q4_K")]
    res = train_policy(env, cfg, progress=False, demonstrations=demo, rescore=rescore, rescore_top=5)
    assert len(res.rescored) == len(measured) == 5
    assert len({tuple(sorted(a.items())) for a in measured}) == 5  # distinct candidates
    # the candidates are the run's 5 lowest degradations on its own measure, best first
    within = sorted(
        {r["degradation"] for r in res.log if r["degradation"] is not None and r["bytes"] <= env.budget_matrix_bytes}
    )
    assert [r["degradation"] for r in res.rescored] == pytest.approx(within[:5])
    chosen = min(range(5), key=lambda i: res.rescored[i]["rescored"])
    assert res.best_allocation == measured[chosen]
    assert res.best_degradation == pytest.approx(res.rescored[chosen]["degradation"])
    assert policy_walk(res.policy, slots, task.features, env.budget_matrix_bytes)[0] == res.best_allocation
    # resumable: the candidates travel in the checkpoint
    full = train_policy(
        make_env()[0],
        cfg,
        checkpoint_dir=tmp_path / "f",
        progress=False,
        demonstrations=demo,
        rescore=other.degradation,
        rescore_top=5,
    )
    train_policy(
        make_env()[0],
        cfg,
        checkpoint_dir=tmp_path / "s",
        progress=False,
        demonstrations=demo,
        rescore=other.degradation,
        rescore_top=5,
        stop_after_episodes=11,
    )
    rest = train_policy(
        make_env()[0],
        cfg,
        checkpoint_dir=tmp_path / "s",
        resume=True,
        progress=False,
        demonstrations=demo,
        rescore=other.degradation,
        rescore_top=5,
    )
    assert actor_bytes(rest) == actor_bytes(full) and rest.rescored == full.rescored
    with pytest.raises(ValueError, match="rescore_top=3 needs a rescore measure"):
        train_policy(make_env()[0], cfg, progress=False, rescore_top=3)
