"""A fixed-size ring replay buffer in numpy, sampled with a seeded ``np.random.Generator``."""

from __future__ import annotations

import numpy as np
import torch

FIELDS = ("obs", "action", "reward", "next_obs", "done")


class ReplayBuffer:
    """Transitions (obs, action in [-1, 1], reward, next_obs, done) in preallocated float32 arrays."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int = 1) -> None:
        if capacity <= 0:
            raise ValueError(f"replay capacity {capacity} must be > 0")
        self.capacity = capacity
        self.data = {
            "obs": np.zeros((capacity, obs_dim), np.float32),
            "action": np.zeros((capacity, action_dim), np.float32),
            "reward": np.zeros((capacity,), np.float32),
            "next_obs": np.zeros((capacity, obs_dim), np.float32),
            "done": np.zeros((capacity,), np.float32),
        }
        self.ptr = 0  # next row to write
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, done: bool) -> None:
        for key, value in zip(FIELDS, (obs, action, reward, next_obs, float(done)), strict=True):
            self.data[key][self.ptr] = value
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, self.size, size=batch_size)
        return {k: torch.from_numpy(v[idx]) for k, v in self.data.items()}

    def state_tensors(self, prefix: str = "replay.") -> dict[str, torch.Tensor]:
        """The filled rows as tensors (for a safetensors checkpoint); ``ptr``/``size`` go to JSON."""
        return {prefix + k: torch.from_numpy(np.ascontiguousarray(v[: self.size])) for k, v in self.data.items()}

    def load_state(self, tensors: dict[str, torch.Tensor], ptr: int, size: int, prefix: str = "replay.") -> None:
        for k, v in self.data.items():
            rows = tensors[prefix + k].numpy()
            if rows.shape[0] != size or rows.shape[1:] != v.shape[1:]:
                raise ValueError(f"replay field {k!r} has shape {list(rows.shape)}; expected [{size}, *{v.shape[1:]}]")
            v[:size] = rows
        self.ptr, self.size = int(ptr), int(size)
