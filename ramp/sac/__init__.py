"""RAMP's SAC allocator: environment (:mod:`.env`), reward (:mod:`.reward`), agent (:mod:`.agent`), replay buffer
(:mod:`.replay`), the resumable training loop (:mod:`.train`) and their configuration (:mod:`.config`, no torch).
Deployment is :func:`ramp.allocate.allocate`.

Names are imported lazily, so that ``import ramp.sac.config`` (params loading) does not load torch or the agent.
"""

from __future__ import annotations

from ramp.lazy import lazy_getattr

_EXPORTS = {
    "AllocationEnv": "env",
    "EnvConfig": "env",
    "EnvError": "env",
    "SyntheticTask": "env",
    "Policy": "agent",
    "SACAgent": "agent",
    "SACConfig": "config",
    "RewardConfig": "config",
    "RewardError": "config",
    "RewardModel": "reward",
    "RewardOutcome": "reward",
    "CheckpointError": "train",
    "TrainResult": "train",
    "train_policy": "train",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("ramp.sac", _EXPORTS)
