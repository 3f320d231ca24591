"""The SAC allocator's configuration dataclasses, importable without torch (``params.yaml`` loads them):
:class:`SACConfig` (the agent and its training loop), :class:`RewardConfig` (the reward's terms) and the action
maps an environment can use (:data:`ACTION_MAPS`, implemented in :mod:`ramp.sac.env`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ramp.errors import RampError

ACTION_MAPS = ("index", "level", "residual")


def _episode_credit(rewards: list[float], dones: list[bool]) -> tuple[list[float], list[bool]]:
    return [rewards[-1]] * len(rewards), [True] * len(rewards)


def _td_credit(rewards: list[float], dones: list[bool]) -> tuple[list[float], list[bool]]:
    return list(rewards), list(dones)


# credit mode -> (per-step rewards, dones) of a finished episode -> what goes into the replay buffer
CREDIT_MODES = {"episode": _episode_credit, "td": _td_credit}


@dataclass(frozen=True)
class SACConfig:
    """Hyper-parameters of SAC and its training loop (units: episodes = full walks over the model's matrices,
    steps = one matrix each).

    seed: seeds network init, action noise, warm-up actions and replay sampling.
    episodes: training episodes; each ends with one (cached) quality evaluation.
    hidden: width of the two hidden layers of the actor and of each Q network.
    credit: how the terminal reward reaches the steps, a key of CREDIT_MODES: "episode" gives every transition
        of the episode the terminal reward and makes it terminal (HAQ-style Monte Carlo credit: the observation
        does not carry the formats already chosen, so bootstrapping from the next state cannot tell which
        earlier choice caused the final quality); "td" stores 0 rewards and bootstraps with ``gamma``.
    gamma: discount per step in "td" credit (1.0: only the episode's end is rewarded).
    tau: Polyak factor for the target Q networks (target <- tau * online + (1 - tau) * target).
    actor_lr, critic_lr, alpha_lr: Adam learning rates.
    batch_size: transitions per gradient step.
    buffer_size: replay capacity in transitions.
    random_episodes: first episodes use random actions (exploration before the actor means anything).
    warmup_spread: 0 = warm-up actions uniform on [0, 1]; > 0 = normal around the environment's budget level
        (:meth:`ramp.sac.env.AllocationEnv.budget_level`, the constant action that fits the budget) with this
        standard deviation in action units, so warm-up episodes do not spend the budget on the first matrices.
    updates_per_step: gradient steps after each episode, per step of the episode (rounded), once learning started.
    init_alpha: starting entropy temperature.
    target_entropy: entropy target of the 1-D squashed Gaussian (SAC's usual -action_dim).
    log_std_min, log_std_max: bounds of the actor's log standard deviation.
    bc_steps: behaviour-cloning gradient steps of the actor on the demonstrations (allocations given to
        :func:`ramp.sac.train.train_policy`, e.g. the greedy knapsack's) before the first episode; 0 = none.
    bc_weight: weight of the same cloning loss (squared action error on a demonstration batch) added to the
        actor's SAC loss at every update, as TD3+BC does: it keeps the policy near the demonstrations where the
        few measured rewards say nothing; 0 = pure SAC after the warm start.
    self_imitation: the cloning target of ``bc_weight`` follows the best episode so far (demonstrations
        included): when an episode beats it, that walk's observations and the middle actions of its formats
        replace the target, so the deterministic policy tracks the best allocation found (self-imitation
        learning, Oh et al. 2018); needs ``bc_weight`` > 0 to have an effect.
    checkpoint_every: episodes between checkpoints when a checkpoint folder is given.
    threads: torch threads for acting and updates (small MLPs run fastest on one; the quality function keeps
        the process's setting).
    """

    seed: int = 0
    episodes: int = 300
    hidden: int = 64
    credit: str = "episode"
    gamma: float = 1.0
    tau: float = 0.01
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    alpha_lr: float = 3e-4
    batch_size: int = 128
    buffer_size: int = 100_000
    random_episodes: int = 10
    warmup_spread: float = 0.0
    updates_per_step: float = 1.0
    init_alpha: float = 0.1
    target_entropy: float = -1.0
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    bc_steps: int = 0
    bc_weight: float = 0.0
    self_imitation: bool = False
    checkpoint_every: int = 50
    threads: int = 1

    def __post_init__(self) -> None:
        for name in (
            "episodes",
            "hidden",
            "batch_size",
            "buffer_size",
            "updates_per_step",
            "checkpoint_every",
            "threads",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"SACConfig.{name}={getattr(self, name)} must be > 0")
        if not 0 < self.tau <= 1 or not 0 <= self.gamma <= 1:
            raise ValueError(f"SACConfig tau={self.tau} must be in (0, 1] and gamma={self.gamma} in [0, 1]")
        if self.bc_steps < 0 or self.bc_weight < 0:
            raise ValueError(f"SACConfig bc_steps={self.bc_steps} and bc_weight={self.bc_weight} must be >= 0")
        if self.warmup_spread < 0:
            raise ValueError(f"SACConfig.warmup_spread={self.warmup_spread} must be >= 0")
        if self.random_episodes < 0:
            raise ValueError(f"SACConfig.random_episodes={self.random_episodes} must be >= 0")
        if self.credit not in CREDIT_MODES:
            raise ValueError(f"SACConfig.credit={self.credit!r}; expected one of {sorted(CREDIT_MODES)}")


# Quality term of the reward, by name: maps (degradation, reference) -> a penalty that grows with degradation.
QUALITY_TERMS: dict[str, Callable[[float, float], float]] = {
    "log": lambda d, ref: math.log1p(d / ref),  # scale-free: halving the KLD is worth the same anywhere
    "linear": lambda d, ref: d / ref,
}


class RewardError(RampError, ValueError):
    """A reward configuration or quality value that cannot be used."""


@dataclass(frozen=True)
class RewardConfig:
    """Every term of the reward (see the module docstring).

    quality: name of the quality term in :data:`QUALITY_TERMS` ("log" = log(1 + d/reference), "linear" = d/reference).
    reference: degradation unit (same unit as quality_fn: KLD nats per token); 0.05 is a good 4-bit-ish KLD.
    scale: weight of the quality term.
    unused_weight: penalty per unit fraction of the budget left unused.
    over_weight: penalty per unit fraction of the budget exceeded (asymmetric: much larger than unused_weight).
    tolerance: fraction of the budget that may be exceeded before the cliff.
    cliff: the reward of an allocation more than ``tolerance`` over budget (not evaluated).
    """

    quality: str = "log"
    reference: float = 0.05
    scale: float = 1.0
    unused_weight: float = 0.5
    over_weight: float = 20.0
    tolerance: float = 0.01
    cliff: float = -20.0

    def __post_init__(self) -> None:
        if self.quality not in QUALITY_TERMS:
            raise RewardError(f"reward quality term {self.quality!r} unknown; expected one of {sorted(QUALITY_TERMS)}")
        for name in ("reference", "scale"):
            if not getattr(self, name) > 0:
                raise RewardError(f"reward {name}={getattr(self, name)} must be > 0")
        for name in ("unused_weight", "over_weight", "tolerance"):
            if not getattr(self, name) >= 0:
                raise RewardError(f"reward {name}={getattr(self, name)} must be >= 0")
