"""One policy trained on several models at once: the pooled SAC run behind zero-shot transfer (issue 17).

Each member is an :class:`~ramp.sac.env.AllocationEnv` of one model (its own slots, per-model standardised features,
its own budget in bits per weight and its own reward measure) with that model's demonstrations. All environments
share the observation layout (the 11 features and the budget state) and the action map, so one actor walks any of
them. The run follows :func:`ramp.sac.train.train_policy` with the episodes dealt round-robin over the members:

* every member's demonstrations are measured first; the actor is cloned on each member's best one at once (their
  observations differ, so the clones do not average each other);
* the warm-up episodes explore around each member's demonstrations in turn;
* self-imitation keeps each member's best allocation in the cloning set;
* after the last episode the actor is distilled onto every member's best allocation together, and
  :attr:`PoolResult.policy_matches_best` says per member how many slots its walk reproduces.

A pooled run is not resumable (no checkpoint): its length is that of a single-model run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from ramp.allocation import Allocation
from ramp.sac.agent import Policy, SACAgent, SACConfig, policy_from_agent, torch_threads
from ramp.sac.env import AllocationEnv
from ramp.sac.train import (
    _record,
    clone_set,
    demonstration_actions,
    distill,
    run_episode,
)

log = logging.getLogger(__name__)


@dataclass
class PoolMember:
    """``name``: the model (unique in the pool); ``env``: its environment with a reward measure; ``demonstrations``:
    allocations of ``env.slots`` measured first and cloned."""

    name: str
    env: AllocationEnv
    demonstrations: Sequence[Allocation] = ()


@dataclass
class PoolResult:
    """policy: the one actor for every member (and any other model); log: one dict per episode with ``model``;
    best: per member the lowest degradation within its budget (``degradation``, ``bytes``, ``allocation``,
    ``episode``) or None; evaluations: per member, calls of its quality measure."""

    policy: Policy
    log: list[dict]
    best: dict[str, dict | None]
    evaluations: dict[str, int]
    episodes: int
    agent: SACAgent = field(repr=False)
    policy_matches_best: dict[str, float] = field(default_factory=dict)


def _check_pool(members: Sequence[PoolMember]) -> None:
    if not members:
        raise ValueError("a pooled run needs at least one model")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"pool members must have distinct names, got {names}")
    first = members[0].env
    for m in members:
        if m.env.rewards.quality_fn is None:
            raise ValueError(f"pool member {m.name!r} has no quality_fn (the reward's degradation measure)")
        if tuple(m.env.feature_names) != tuple(first.feature_names) or m.env.obs_dim != first.obs_dim:
            raise ValueError(
                f"pool member {m.name!r} observes {list(m.env.feature_names)}; {members[0].name!r} observes "
                f"{list(first.feature_names)}"
            )
        if m.env.config != first.config:
            raise ValueError(
                f"pool member {m.name!r} has env settings {asdict(m.env.config)}; {members[0].name!r} has "
                f"{asdict(first.config)}"
            )


def train_pool(
    members: Sequence[PoolMember],
    config: SACConfig | None = None,
    progress: bool = True,
    standardizer: dict | None = None,
) -> PoolResult:
    """Train one SAC actor on every member for ``config.episodes`` episodes in all (module docstring)."""
    _check_pool(members)
    config = config or SACConfig()
    first = members[0].env
    agent = SACAgent(first.obs_dim, config)
    states = {m.name: {"episode": 0, "log": [], "best": None} for m in members}
    demo_actions = {m.name: [demonstration_actions(m.env, d) for d in m.demonstrations] for m in members}
    walks: dict[str, tuple[np.ndarray, list[float]]] = {}  # per member the walk the actor is cloned on
    for m in members:
        measured = []
        for i, actions in enumerate(demo_actions[m.name]):
            row = run_episode(m.env, agent, warmup=True, fixed=actions)
            row.update(episode=-1 - i, demo=True, model=m.name)
            obs = row.pop("observations")
            _record(m.env, states[m.name], row)
            measured.append((row["reward"], -i, obs, actions))
            log.info("%s demonstration %d: degradation %s at %d B", m.name, i, row["degradation"], row["bytes"])
        if measured:
            _, _, obs, actions = max(measured, key=lambda w: (w[0], w[1]))
            walks[m.name] = (obs, list(actions))
    if walks:
        agent.set_demonstrations(*clone_set(list(walks.values())))
        with torch_threads(config.threads):
            loss = agent.behaviour_clone(config.bc_steps)
        log.info("behaviour cloning of %d models' best demonstrations: final loss %.4g", len(walks), loss)

    n = len(members)
    bar = tqdm(range(config.episodes), desc=f"SAC episodes ({n} models)", disable=not progress, unit="ep")
    for episode in bar:
        m = members[episode % n]
        warmup = episode < config.random_episodes
        demos = demo_actions[m.name]
        centres = demos[(episode // n) % len(demos)] if warmup and demos else None
        row = run_episode(m.env, agent, warmup=warmup, centres=centres)
        row.update(episode=episode, model=m.name)
        obs = row.pop("observations")
        if _record(m.env, states[m.name], row) and config.self_imitation:
            walks[m.name] = (obs, demonstration_actions(m.env, m.env.allocation()))
            agent.set_demonstrations(*clone_set(list(walks.values())))
        d = row["degradation"]
        bar.set_postfix(model=m.name, reward=f"{row['reward']:.3f}", deg=f"{d:.4g}" if d is not None else "cliff")

    best = {m.name: states[m.name]["best"] for m in members}
    matches = distill(agent, [(m.env, best[m.name]["allocation"]) for m in members if best[m.name]])
    names = [m.name for m in members if best[m.name]]
    policy = policy_from_agent(agent, first.feature_names, asdict(first.config), standardizer)
    rows = sorted((r for s in states.values() for r in s["log"]), key=lambda r: (r["episode"] >= 0, r["episode"]))
    return PoolResult(
        policy=policy,
        log=rows,
        best={k: (dict(v, allocation=dict(v["allocation"])) if v else None) for k, v in best.items()},
        evaluations={m.name: m.env.rewards.evaluations for m in members},
        episodes=config.episodes,
        agent=agent,
        policy_matches_best=dict(zip(names, matches, strict=True)),
    )
