"""RAMP's SAC allocator: environment (:mod:`.env`), reward (:mod:`.reward`), agent (:mod:`.agent`), replay buffer
(:mod:`.replay`) and the resumable training loop (:mod:`.train`). Deployment is :func:`ramp.allocate.allocate`."""

from ramp.sac.agent import Policy, SACAgent, SACConfig
from ramp.sac.env import AllocationEnv, EnvConfig, EnvError, SyntheticTask
from ramp.sac.reward import RewardConfig, RewardError, RewardModel, RewardOutcome
from ramp.sac.train import CheckpointError, TrainResult, train_policy

__all__ = [
    "AllocationEnv",
    "CheckpointError",
    "EnvConfig",
    "EnvError",
    "Policy",
    "RewardConfig",
    "RewardError",
    "RewardModel",
    "RewardOutcome",
    "SACAgent",
    "SACConfig",
    "SyntheticTask",
    "TrainResult",
    "train_policy",
]
