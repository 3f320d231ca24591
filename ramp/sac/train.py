"""Training loop: episodes of :class:`ramp.sac.env.AllocationEnv` feeding :class:`ramp.sac.agent.SACAgent`,
with a per-episode log, the best allocation seen, and exact resume from safetensors + JSON checkpoints.

A checkpoint is two files in ``checkpoint_dir``: ``state.safetensors`` (networks, temperature, Adam moments,
replay rows) and ``state.json`` (configs, episode counter, RNG states, optimizer param groups, reward cache,
log, best allocation, and the sha256 of the tensor file). The JSON is written last, so it commits the pair.
Resuming from the checkpoint after K episodes gives bit-identical weights to an uninterrupted run.

Demonstrations (optional): allocations from another method (e.g. the greedy knapsack) are walked through the
environment once each before training, so they are measured like any episode (logged with ``"demo": True``,
not counted in ``episodes``, eligible as the best allocation) and their transitions enter the replay buffer.
The actor is then cloned on the best-rewarded one for ``SACConfig.bc_steps`` steps (and kept near it by
``SACConfig.bc_weight``), and the warm-up episodes explore around all of them (the demonstrated action of
each slot, cycled over the demonstrations, plus ``warmup_spread`` noise) instead of around the budget level.

After the last episode the actor is distilled onto the best allocation measured (rounds of behaviour cloning, at
most :data:`DISTILL_ROUNDS`, until its mean-action walk at the training budget reproduces it): the
policy's own allocation at its training budget is then the best one the run found (HAQ and AMC likewise keep their
best-rewarded episode), and ``TrainResult.policy_matches_best`` says how many slots agree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ramp.allocation import Allocation, bits_per_weight
from ramp.errors import RampError
from ramp.io import atomic_path, atomic_write_text, sha256_file
from ramp.sac.agent import CREDIT_MODES, Policy, SACAgent, SACConfig, policy_from_agent, torch_threads
from ramp.sac.env import AllocationEnv

log = logging.getLogger(__name__)

CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_JSON = "state.json"
CHECKPOINT_VERSION = 1
# after the last episode: at most DISTILL_ROUNDS rounds of max(bc_steps, DISTILL_STEPS) cloning steps on the best
DISTILL_ROUNDS = 8
DISTILL_STEPS = 250


class CheckpointError(RampError, ValueError):
    """A checkpoint that cannot be resumed here (other config, other task, missing or corrupt files)."""


@dataclass
class TrainResult:
    """policy: the trained actor (use :func:`ramp.allocate.allocate` for its deterministic allocation).
    log: one dict per episode (episode, reward, degradation, bytes, bpw, alpha, entropy, evaluated, evaluations).
    best_allocation: lowest degradation seen within the budget (None if no episode finished within budget).
    evaluations: calls of quality_fn so far (cache hits excluded)."""

    policy: Policy
    log: list[dict]
    best_allocation: Allocation | None
    best_degradation: float | None
    best_bytes: int | None
    evaluations: int
    episodes: int
    agent: SACAgent = field(repr=False)
    policy_matches_best: float | None = None  # fraction of slots where the policy's walk gives the best allocation
    # with a rescore measure: the run's best few allocations measured again (``degradation`` on the reward's
    # windows, ``rescored`` on the rescore measure's, ``episode``), the best allocation being the best rescored
    rescored: list[dict] | None = None


def _flat(prefix: str, d: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in d.items()}


def run_config(env: AllocationEnv, config: SACConfig) -> dict:
    """Everything that defines a training run, as plain JSON values (compared on resume)."""
    return {
        **_flat("sac", asdict(config)),
        **_flat("reward", asdict(env.reward_config)),
        **_flat("env", asdict(env.config)),
    }


def save_checkpoint(folder: Path, env: AllocationEnv, agent: SACAgent, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors_path = folder / CHECKPOINT_TENSORS
    with atomic_path(tensors_path) as tmp:
        save_file(agent.state_tensors(), str(tmp))
    meta = {
        "version": CHECKPOINT_VERSION,
        "config": run_config(env, agent.config),
        "task": env.fingerprint(),
        "tensors_sha256": sha256_file(tensors_path),
        "agent": agent.state_json(),
        "reward_cache": env.rewards.cache,
        "evaluations": env.rewards.evaluations,
        **state,
    }
    atomic_write_text(folder / CHECKPOINT_JSON, json.dumps(meta, indent=1) + "\n")


def load_checkpoint(folder: Path, env: AllocationEnv, agent: SACAgent) -> dict:
    """Restore ``agent`` and the env's reward cache; returns the loop state (episode, log, best)."""
    json_path, tensors_path = folder / CHECKPOINT_JSON, folder / CHECKPOINT_TENSORS
    if not json_path.exists() or not tensors_path.exists():
        raise CheckpointError(f"{folder}: no checkpoint to resume ({CHECKPOINT_JSON} + {CHECKPOINT_TENSORS})")
    meta = json.loads(json_path.read_text())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{json_path}: checkpoint version {meta.get('version')}; expected {CHECKPOINT_VERSION}")
    want = run_config(env, agent.config)
    have = meta["config"]
    diff = sorted(k for k in set(want) | set(have) if want.get(k, "<missing>") != have.get(k, "<missing>"))
    if diff:
        detail = ", ".join(
            f"{k}: checkpoint {have.get(k, '<missing>')!r} vs now {want.get(k, '<missing>')!r}" for k in diff
        )
        raise CheckpointError(f"{folder}: checkpoint is from another config; differing keys: {detail}")
    if meta["task"] != env.fingerprint():
        raise CheckpointError(f"{folder}: checkpoint is from another task (slots, features or budget differ)")
    if sha256_file(tensors_path) != meta["tensors_sha256"]:
        raise CheckpointError(f"{tensors_path}: does not match the sha256 recorded in {CHECKPOINT_JSON}")
    agent.load_state(load_file(str(tensors_path)), meta["agent"])
    env.rewards.cache = dict(meta["reward_cache"])
    env.rewards.evaluations = int(meta["evaluations"])
    return meta


def train_policy(
    env: AllocationEnv | Callable[[], AllocationEnv],
    config: SACConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    standardizer: dict | None = None,
    stop_after_episodes: int | None = None,
    demonstrations: Sequence[Allocation] | None = None,
    rescore: Callable[[Allocation], float] | None = None,
    rescore_top: int = 0,
) -> TrainResult:
    """Train SAC on ``env`` (or ``env()``) for ``config.episodes`` episodes.

    checkpoint_dir: write a checkpoint every ``config.checkpoint_every`` episodes and at the end.
    resume: continue from the checkpoint in ``checkpoint_dir`` (error if there is none, or if it was written
        with another config or task).
    standardizer: feature statistics stored with the policy (see :class:`ramp.sac.agent.Policy`).
    stop_after_episodes: stop after this many episodes in this call (checkpointed), e.g. to split a run.
    demonstrations: allocations of ``env.slots`` to measure, clone and explore around (see the module docstring);
        on resume they must be the ones the checkpoint was started with.
    rescore, rescore_top: the ``rescore_top`` distinct within-budget allocations of lowest degradation the run
        measured (demonstrations included) are measured again by ``rescore`` (e.g. the KLD on more windows than
        the reward's) after the last episode, and the best of them by that measure becomes the best allocation
        the policy is distilled onto: picking the best of many candidates on a few windows overfits them.
    """
    env = env if isinstance(env, AllocationEnv) else env()
    config = config or SACConfig()
    if env.rewards.quality_fn is None:
        raise ValueError("training needs an AllocationEnv with a quality_fn (the reward's degradation measure)")
    agent = SACAgent(env.obs_dim, config)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    demo_actions = [demonstration_actions(env, d) for d in demonstrations or ()]
    if rescore_top < 0 or (rescore_top > 0) != (rescore is not None):
        raise ValueError(f"rescore_top={rescore_top} needs a rescore measure (and a measure needs rescore_top > 0)")
    state: dict = {"episode": 0, "log": [], "best": None, "demo_actions": demo_actions}
    if rescore_top:
        state.update(top=[], top_n=rescore_top)
    if resume:
        if folder is None:
            raise CheckpointError("resume=True needs a checkpoint_dir")
        meta = load_checkpoint(folder, env, agent)
        if meta.get("demo_actions", []) != demo_actions:
            raise CheckpointError(f"{folder}: checkpoint was started with other demonstrations than these")
        state = {"episode": meta["episode"], "log": meta["log"], "best": meta["best"], "demo_actions": demo_actions}
        if rescore_top:
            if meta.get("top_n") != rescore_top:
                raise CheckpointError(f"{folder}: checkpoint kept {meta.get('top_n')} candidates, not {rescore_top}")
            state.update(top=meta["top"], top_n=rescore_top)
        log.info("resumed from %s at episode %d", folder, state["episode"])
    elif demo_actions:
        _measure_demonstrations(env, agent, demo_actions, state)
    end = (
        config.episodes if stop_after_episodes is None else min(config.episodes, state["episode"] + stop_after_episodes)
    )

    bar = tqdm(range(state["episode"], end), desc="SAC episodes", disable=not progress, unit="ep")
    for episode in bar:
        warmup = episode < config.random_episodes
        centres = demo_actions[episode % len(demo_actions)] if warmup and demo_actions else None
        row = run_episode(env, agent, warmup=warmup, centres=centres)
        row["episode"] = episode
        obs = row.pop("observations")
        if _record(env, state, row) and config.self_imitation:
            agent.set_demonstrations(*clone_set([(obs, demonstration_actions(env, env.allocation()))]))
        d = row["degradation"]
        state["episode"] = episode + 1
        bar.set_postfix(
            reward=f"{row['reward']:.3f}", deg=f"{d:.4g}" if d is not None else "cliff", evals=row["evaluations"]
        )
        if folder is not None and (state["episode"] % config.checkpoint_every == 0 or state["episode"] == end):
            save_checkpoint(folder, env, agent, state)

    best, rescored = state["best"], None
    if rescore is not None and state["top"]:
        scored = [(float(rescore(c["allocation"])), i, c) for i, c in enumerate(state["top"])]
        rescored = [{"degradation": c["degradation"], "rescored": v, "episode": c["episode"]} for v, _, c in scored]
        best = min(scored, key=lambda x: (x[0], x[1]))[2]
        log.info(
            "rescored the best %d allocations: picked episode %d (%.5g on the reward windows, %.5g rescored)",
            len(scored),
            best["episode"],
            best["degradation"],
            min(v for v, _, _ in scored),
        )
    matches = distill_best(env, agent, best["allocation"]) if best else None
    policy = policy_from_agent(agent, env.feature_names, asdict(env.config), standardizer)
    return TrainResult(
        policy=policy,
        log=state["log"],
        best_allocation=dict(best["allocation"]) if best else None,
        best_degradation=best["degradation"] if best else None,
        best_bytes=best["bytes"] if best else None,
        evaluations=env.rewards.evaluations,
        episodes=state["episode"],
        agent=agent,
        policy_matches_best=matches,
        rescored=rescored,
    )


def _unscored_walk(env: AllocationEnv, choose: Callable[[np.ndarray, int], float]) -> tuple[Allocation, np.ndarray]:
    """Walk ``env`` with ``choose(observation, t)`` -> action in [0, 1], without scoring the allocation at the end:
    (allocation, observations float32[n_slots, obs_dim])."""
    quality_fn, env.rewards.quality_fn = env.rewards.quality_fn, None
    try:
        obs, done, seen, info = env.reset(), False, [], {}
        while not done:
            seen.append(obs)
            obs, _, done, info = env.step(choose(obs, len(seen) - 1))
    finally:
        env.rewards.quality_fn = quality_fn
    return info["allocation"], np.stack(seen)


def mean_walk(env: AllocationEnv, agent: SACAgent) -> Allocation:
    """The actor's mean-action walk under the budget wall, without scoring it."""
    with torch_threads(agent.config.threads):
        return _unscored_walk(env, lambda obs, _t: (agent.act(obs, explore=False) + 1) / 2)[0]


def distill_best(env: AllocationEnv, agent: SACAgent, best: Allocation) -> float:
    """Clone ``best`` until the actor's mean walk reproduces it (:func:`distill`); returns the fraction of slots
    where the walk gives ``best``'s format."""
    return distill(agent, [(env, best)])[0]


def distill(agent: SACAgent, targets: Sequence[tuple[AllocationEnv, Allocation]]) -> list[float]:
    """Clone every (env, allocation) pair at once, on the observations along each allocation's own walk, until each
    env's mean walk reproduces its allocation (at most DISTILL_ROUNDS rounds of cloning steps); returns per pair the
    fraction of slots that agree."""
    if not targets:
        return []
    walks = []
    for env, best in targets:
        actions = demonstration_actions(env, best)
        _, seen = _unscored_walk(env, lambda _obs, t, a=actions: a[t])
        walks.append((seen, actions))
    agent.set_demonstrations(*clone_set(walks))

    def agreement() -> list[float]:
        out = []
        for env, best in targets:
            walk = mean_walk(env, agent)
            out.append(sum(walk[s.gguf_name] == best[s.gguf_name] for s in env.slots) / len(env.slots))
        return out

    match = agreement()
    for _ in range(DISTILL_ROUNDS):
        if min(match) == 1.0:
            break
        with torch_threads(agent.config.threads):
            agent.behaviour_clone(max(agent.config.bc_steps, DISTILL_STEPS))
        match = agreement()
    log.info("the policy's walk reproduces the best allocation on %s of the slots", [f"{x:.1%}" for x in match])
    return match


def clone_set(walks: Sequence[tuple[np.ndarray, Sequence[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """The behaviour-cloning set of (observations along a walk, its actions in [0, 1]) pairs, in order:
    (observations, actions in [-1, 1]), for :meth:`SACAgent.set_demonstrations`."""
    obs = np.concatenate([np.asarray(o) for o, _ in walks])
    actions = np.concatenate([2 * np.asarray(a, np.float64) - 1 for _, a in walks])
    return obs, actions


def demonstration_actions(env: AllocationEnv, allocation: Allocation) -> list[float]:
    """Per slot, the action in [0, 1] at the middle of the demonstrated format's interval (the walk with the
    budget wall may still clamp it); raises naming a slot the allocation lacks or gives an illegal format."""
    out = []
    for s, amap in zip(env.slots, env.action_maps, strict=True):
        fmt = allocation.get(s.gguf_name)
        if fmt not in s.formats:
            raise ValueError(
                f"demonstration gives {s.gguf_name} format {fmt!r}; expected one of its formats {list(s.formats)}"
            )
        out.append(amap.centre(s.formats.index(fmt)))
    return out


def _record(env: AllocationEnv, state: dict, row: dict) -> bool:
    """Append an episode's row to the log and keep the best within-budget allocation; True if this is it now."""
    state["log"].append(row)
    best, d = state["best"], row["degradation"]
    if "top" in state and d is not None and row["bytes"] <= env.budget_matrix_bytes:
        _keep_top(state, d, row, env.allocation())
    if d is not None and row["bytes"] <= env.budget_matrix_bytes and (best is None or d < best["degradation"]):
        state["best"] = {
            "degradation": d,
            "bytes": row["bytes"],
            "allocation": env.allocation(),
            "episode": row["episode"],
        }
        return True
    return False


def _keep_top(state: dict, degradation: float, row: dict, allocation: Allocation) -> None:
    """Keep ``state["top"]``: the ``top_n`` distinct allocations of lowest degradation, first measured first."""
    top = state["top"]
    if any(c["allocation"] == allocation for c in top):
        return
    top.append(
        {"degradation": degradation, "bytes": row["bytes"], "allocation": dict(allocation), "episode": row["episode"]}
    )
    top.sort(key=lambda c: c["degradation"])  # stable: ties keep the earlier one first
    del top[state["top_n"] :]


def _measure_demonstrations(env: AllocationEnv, agent: SACAgent, demo_actions: list[list[float]], state: dict) -> None:
    """Walk each demonstration once (measured, into the replay buffer), then clone the actor on them."""
    walks = []
    for i, actions in enumerate(demo_actions):
        row = run_episode(env, agent, warmup=True, fixed=actions)
        row.update(episode=-1 - i, demo=True)
        obs = row.pop("observations")
        _record(env, state, row)
        walks.append((row["reward"], -i, obs, actions))
        log.info("demonstration %d: degradation %s at %d B", i, row["degradation"], row["bytes"])
    # clone the best-rewarded demonstration only: two different demonstrations of the same slots would teach
    # the actor their average, which neither of them is
    reward, i, obs, actions = max(walks, key=lambda w: (w[0], w[1]))
    agent.set_demonstrations(*clone_set([(obs, actions)]))
    with torch_threads(agent.config.threads):
        loss = agent.behaviour_clone(agent.config.bc_steps)
    log.info(
        "behaviour cloning of demonstration %d (reward %.4g): %d steps, final loss %.4g",
        -i,
        reward,
        agent.config.bc_steps,
        loss,
    )


def run_episode(
    env: AllocationEnv,
    agent: SACAgent,
    warmup: bool,
    centres: Sequence[float] | None = None,
    fixed: Sequence[float] | None = None,
) -> dict:
    """One exploring episode; its transitions enter the replay buffer with the configured credit, then
    ``updates_per_step`` x steps gradient steps run (after the warm-up, once a batch is there).

    centres: per-slot warm-up centres in [0, 1] (a demonstration's actions) instead of the budget level.
    fixed: per-slot actions in [0, 1] to take as they are (a demonstration walk; no updates follow it).
    The row also carries the walk's ``observations`` (float32[n_slots, obs_dim]; callers pop them before logging).
    """
    c = agent.config
    obs = env.reset()
    done, info, clamped = False, {}, 0
    steps = []
    centre = env.budget_level() if warmup and c.warmup_spread > 0 and centres is None else None
    while not done:
        if fixed is not None:
            action = 2 * float(fixed[env.t]) - 1
        else:
            with torch_threads(c.threads):
                here = centres[env.t] if centres is not None else centre
                action = agent.act(obs, explore=True, random=warmup, centre=here)
        next_obs, reward, done, info = env.step((action + 1) / 2)
        steps.append((obs, action, reward, next_obs, done))
        clamped += info["clamped"]
        obs = next_obs
    rewards, dones = CREDIT_MODES[c.credit]([s[2] for s in steps], [s[4] for s in steps])
    for (o, a, _, o2, _), r, d in zip(steps, rewards, dones, strict=True):
        agent.replay.add(o, np.array([a], np.float32), r, o2, d)
    if not warmup and len(agent.replay) >= c.batch_size:
        with torch_threads(c.threads):
            for _ in range(max(1, round(c.updates_per_step * len(steps)))):
                agent.update()
    outcome = info["outcome"]
    stats = agent.last_stats
    row = {
        "reward": outcome.reward,
        "degradation": outcome.degradation,
        "bytes": outcome.used_bytes,
        "bpw": bits_per_weight(env.slots, info["allocation"]),
        "clamped": clamped,
        "evaluated": outcome.evaluated,
        "evaluations": env.rewards.evaluations,
        "alpha": agent.alpha,
        "entropy": stats.get("entropy"),  # None until the first update
        "critic_loss": stats.get("critic_loss"),
    }
    row["observations"] = np.stack([s[0] for s in steps])
    return row
