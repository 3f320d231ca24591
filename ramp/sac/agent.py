"""Soft Actor-Critic for one continuous action in [0, 1]: twin Q networks with Polyak-averaged targets, a
tanh-squashed Gaussian actor, automatic entropy tuning. Every random draw comes from the agent's own
``torch.Generator`` (action noise) or ``np.random.Generator`` (warm-up actions, replay sampling), so a seed fixes
the run; :meth:`SACAgent.state_tensors` / :meth:`SACAgent.state_json` capture everything needed to resume exactly.

Internally actions live in [-1, 1] (tanh output); the environment gets ``(a + 1) / 2``.
"""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ramp.sac.config import CREDIT_MODES, SACConfig
from ramp.sac.replay import ReplayBuffer

__all__ = ["CREDIT_MODES", "SACConfig"]  # defined in ramp.sac.config (params load it without torch)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
    )


class Actor(nn.Module):
    """obs -> (mean, log_std) of a Gaussian over the pre-squash action u; the action is tanh(u) in (-1, 1)."""

    def __init__(self, obs_dim: int, hidden: int, log_std_min: float = -5.0, log_std_max: float = 2.0) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, 2)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = self.net(obs).chunk(2, dim=-1)
        # tanh keeps log_std in [min, max] with a gradient everywhere (a hard clamp would stall at the bounds)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(raw) + 1)
        return mean, log_std

    def sample(self, obs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action in (-1, 1) and its log-probability (tanh change of variables included)."""
        mean, log_std = self(obs)
        eps = torch.randn(mean.shape, generator=generator)
        u = mean + log_std.exp() * eps
        action = torch.tanh(u)
        log_prob = -0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = log_prob - torch.log(1 - action.pow(2) + 1e-6)
        return action, log_prob.sum(-1, keepdim=True)


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = mlp(obs_dim + 1, hidden, 1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], dim=-1))


def flatten_optimizer(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-ready tensors plus the JSON-able rest (param groups, which keys exist)."""
    sd = opt.state_dict()
    tensors, layout = {}, {}
    for idx, st in sd["state"].items():
        layout[str(idx)] = sorted(st)
        for key, value in st.items():
            tensors[f"opt.{name}.{idx}.{key}"] = torch.as_tensor(value).clone().contiguous()
    return tensors, {"param_groups": sd["param_groups"], "state": layout}


def unflatten_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {
        int(idx): {k: tensors[f"opt.{name}.{idx}.{k}"].clone() for k in keys} for idx, keys in meta["state"].items()
    }
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def generator_state_b64(gen: torch.Generator | None = None) -> str:
    state = gen.get_state() if gen is not None else torch.get_rng_state()
    return base64.b64encode(state.numpy().tobytes()).decode()


def state_from_b64(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


class SACAgent:
    """Twin-Q SAC with automatic entropy tuning on observations of size ``obs_dim`` and one action."""

    def __init__(self, obs_dim: int, config: SACConfig = SACConfig()) -> None:
        self.config = c = config
        self.obs_dim = obs_dim
        torch.manual_seed(c.seed)  # network initialisation draws from the global generator
        self.actor = Actor(obs_dim, c.hidden, c.log_std_min, c.log_std_max)
        self.q1, self.q2 = QNetwork(obs_dim, c.hidden), QNetwork(obs_dim, c.hidden)
        self.q1_target, self.q2_target = QNetwork(obs_dim, c.hidden), QNetwork(obs_dim, c.hidden)
        self.q1_target.load_state_dict(self.q1.state_dict())
        self.q2_target.load_state_dict(self.q2.state_dict())
        self.log_alpha = torch.tensor([math.log(c.init_alpha)], requires_grad=True)
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr)
        self.opt_critic = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=c.critic_lr)
        self.opt_alpha = torch.optim.Adam([self.log_alpha], lr=c.alpha_lr)
        self.gen = torch.Generator().manual_seed(c.seed)
        self.rng = np.random.default_rng(c.seed)
        self.replay = ReplayBuffer(c.buffer_size, obs_dim)
        # demonstrations for behaviour cloning: observations and their actions in [-1, 1]
        self.demo_obs = torch.zeros((0, obs_dim))
        self.demo_action = torch.zeros((0, 1))
        self.updates = 0
        self.last_stats: dict[str, float] = {}

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def act(self, obs: np.ndarray, explore: bool, random: bool = False, centre: float | None = None) -> float:
        """An action in [-1, 1]: random (warm-up: uniform, or normal around ``centre`` in [0, 1] with
        ``warmup_spread``), sampled from the actor, or its mean (``explore=False``)."""
        if random and centre is not None and self.config.warmup_spread > 0:
            a = centre + self.config.warmup_spread * self.rng.standard_normal()
            return float(np.clip(2 * a - 1, -1.0, 1.0))
        if random:
            return float(self.rng.uniform(-1.0, 1.0))
        with torch.no_grad():
            x = torch.from_numpy(np.asarray(obs, np.float32))[None]
            if explore:
                return float(self.actor.sample(x, self.gen)[0][0, 0])
            return float(torch.tanh(self.actor(x)[0])[0, 0])

    def set_demonstrations(self, obs: np.ndarray, actions: np.ndarray) -> None:
        """Observations float32[n, obs_dim] and their demonstrated actions in [-1, 1] (float32[n]) to clone."""
        self.demo_obs = torch.as_tensor(np.asarray(obs, np.float32)).reshape(-1, self.obs_dim).clone()
        self.demo_action = torch.as_tensor(np.asarray(actions, np.float32)).reshape(-1, 1).clone()

    def _bc_loss(self) -> torch.Tensor:
        """Squared error between the actor's mean action and the demonstrated one, on a seeded demo batch."""
        idx = torch.from_numpy(self.rng.integers(0, len(self.demo_obs), size=self.config.batch_size))
        mean, _ = self.actor(self.demo_obs[idx])
        return (torch.tanh(mean) - self.demo_action[idx]).pow(2).mean()

    def behaviour_clone(self, steps: int) -> float:
        """``steps`` Adam steps of the actor on the cloning loss alone; returns the last loss (0 without demos)."""
        loss = torch.zeros(())
        for _ in range(steps if len(self.demo_obs) else 0):
            loss = self._bc_loss()
            self.opt_actor.zero_grad()
            loss.backward()
            self.opt_actor.step()
        return float(loss.detach())

    def update(self) -> dict[str, float]:
        """One gradient step on both critics, the actor and the temperature, then a Polyak target update."""
        c = self.config
        b = self.replay.sample(c.batch_size, self.rng)
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_a, next_logp = self.actor.sample(b["next_obs"], self.gen)
            q_next = torch.min(self.q1_target(b["next_obs"], next_a), self.q2_target(b["next_obs"], next_a))
            target = b["reward"][:, None] + c.gamma * (1 - b["done"][:, None]) * (q_next - alpha * next_logp)
        q1, q2 = self.q1(b["obs"], b["action"]), self.q2(b["obs"], b["action"])
        critic_loss = nn.functional.mse_loss(q1, target) + nn.functional.mse_loss(q2, target)
        self.opt_critic.zero_grad()
        critic_loss.backward()
        self.opt_critic.step()

        a, logp = self.actor.sample(b["obs"], self.gen)
        actor_loss = (alpha * logp - torch.min(self.q1(b["obs"], a), self.q2(b["obs"], a))).mean()
        if c.bc_weight > 0 and len(self.demo_obs):
            actor_loss = actor_loss + c.bc_weight * self._bc_loss()
        self.opt_actor.zero_grad()
        actor_loss.backward()
        self.opt_actor.step()

        alpha_loss = -(self.log_alpha * (logp.detach() + c.target_entropy)).mean()
        self.opt_alpha.zero_grad()
        alpha_loss.backward()
        self.opt_alpha.step()

        with torch.no_grad():
            for net, tgt in ((self.q1, self.q1_target), (self.q2, self.q2_target)):
                for p, tp in zip(net.parameters(), tgt.parameters(), strict=True):
                    tp.mul_(1 - c.tau).add_(p, alpha=c.tau)
        self.updates += 1
        self.last_stats = {
            "critic_loss": critic_loss.item(),
            "actor_loss": actor_loss.item(),
            "alpha": self.alpha,
            "entropy": -logp.detach().mean().item(),
        }
        return self.last_stats

    NETWORKS = ("actor", "q1", "q2", "q1_target", "q2_target")
    OPTIMIZERS = ("actor", "critic", "alpha")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the agent: networks, temperature, optimizer moments, replay rows, RNG states."""
        out = {}
        for name in self.NETWORKS:
            for k, v in getattr(self, name).state_dict().items():
                out[f"{name}.{k}"] = v.detach().clone().contiguous()
        out["log_alpha"] = self.log_alpha.detach().clone()
        out["demo.obs"] = self.demo_obs.clone().contiguous()
        out["demo.action"] = self.demo_action.clone().contiguous()
        for name in self.OPTIMIZERS:
            out.update(flatten_optimizer(name, getattr(self, f"opt_{name}"))[0])
        out.update(self.replay.state_tensors())
        return out

    def state_json(self) -> dict:
        return {
            "optimizers": {n: flatten_optimizer(n, getattr(self, f"opt_{n}"))[1] for n in self.OPTIMIZERS},
            "replay": {"ptr": self.replay.ptr, "size": self.replay.size},
            "updates": self.updates,
            "rng": {
                "torch_global": generator_state_b64(),
                "torch_generator": generator_state_b64(self.gen),
                "numpy": self.rng.bit_generator.state,
            },
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for name in self.NETWORKS:
            net = getattr(self, name)
            net.load_state_dict({k: tensors[f"{name}.{k}"] for k in net.state_dict()})
        with torch.no_grad():
            self.log_alpha.copy_(tensors["log_alpha"])
        self.demo_obs, self.demo_action = tensors["demo.obs"].clone(), tensors["demo.action"].clone()
        for name in self.OPTIMIZERS:
            unflatten_optimizer(name, getattr(self, f"opt_{name}"), tensors, meta["optimizers"][name])
        self.replay.load_state(tensors, meta["replay"]["ptr"], meta["replay"]["size"])
        self.updates = int(meta["updates"])
        torch.set_rng_state(state_from_b64(meta["rng"]["torch_global"]))
        self.gen.set_state(state_from_b64(meta["rng"]["torch_generator"]))
        self.rng.bit_generator.state = meta["rng"]["numpy"]


@dataclass
class Policy:
    """The deployable part of a trained agent: the actor plus what is needed to build its observations.

    feature_names: the embedding columns the actor was trained on, in order.
    standardizer: :class:`ramp.features.Standardizer` statistics (``to_dict()``) used on the training model, or
        None when the features given to :func:`ramp.allocate.allocate` are already standardised.
    cost_gains: per role, the log price of a unit of proxy error learned from the training models' measured tables
        (:func:`ramp.sensitivity.role_gains`, ``train.cost_gain: role``), or None: the proxy as it is. The residual
        map's prior and the proxy fill of :func:`ramp.allocate.allocate` then price the proxy with them.
    cost_basis: the fold stage's table those priors and fills price (``train.cost_basis``): ``proxy`` (the
        action space's imatrix-weighted error) or ``fisher`` (its Fisher estimate in KLD, :mod:`ramp.fisher`).
    """

    actor: Actor
    feature_names: tuple[str, ...]
    sac_config: SACConfig
    env_config: dict = field(default_factory=dict)
    standardizer: dict | None = None
    cost_gains: dict[str, float] | None = None
    cost_basis: str = "proxy"

    def actions(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Deterministic actions in [0, 1] and the pre-squash means, for observations float32[n, obs_dim]."""
        with torch.no_grad():
            mean = self.actor(torch.from_numpy(np.asarray(obs, np.float32)).reshape(-1, self.actor.net[0].in_features))[
                0
            ]
        u = mean[:, 0].numpy().astype(np.float64)
        return (np.tanh(u) + 1) / 2, u

    def config_dict(self) -> dict:
        return {
            "sac": asdict(self.sac_config),
            "env": dict(self.env_config),
            "feature_names": list(self.feature_names),
            "standardizer": self.standardizer,
            "obs_dim": self.actor.net[0].in_features,
            **({"cost_gains": dict(self.cost_gains)} if self.cost_gains is not None else {}),
            **({"cost_basis": self.cost_basis} if self.cost_basis != "proxy" else {}),
        }


def policy_from_agent(
    agent: SACAgent, feature_names: Sequence[str], env_config: dict, standardizer: dict | None = None
) -> Policy:
    actor = Actor(agent.obs_dim, agent.config.hidden, agent.config.log_std_min, agent.config.log_std_max)
    actor.load_state_dict(agent.actor.state_dict())
    actor.eval()
    return Policy(actor, tuple(feature_names), agent.config, dict(env_config), standardizer)


def ensemble_policy(policies: Sequence[Policy]) -> Policy:
    """One policy whose pre-squash mean is the average of ``policies``' (seeds of one training run): their actors
    side by side in one wider actor (hidden layers stacked, the second one block-diagonal, the output averaged), so
    it saves, loads and walks like any policy. Members must agree on features, environment, standardiser and cost
    gains."""
    if not policies:
        raise ValueError("an ensemble needs at least one policy")
    first = policies[0]
    for i, p in enumerate(policies):
        same = (p.feature_names, p.env_config, p.standardizer, p.cost_gains, p.cost_basis) == (
            first.feature_names,
            first.env_config,
            first.standardizer,
            first.cost_gains,
            first.cost_basis,
        )
        if not same or p.actor.net[0].in_features != first.actor.net[0].in_features:
            raise ValueError(
                f"ensemble member {i} differs from member 0 in its features, environment, standardiser or cost table"
            )
        if (p.actor.log_std_min, p.actor.log_std_max) != (first.actor.log_std_min, first.actor.log_std_max):
            raise ValueError(f"ensemble member {i} has other log-std bounds than member 0")
    if len(policies) == 1:
        return first
    k = len(policies)
    layers = [[p.actor.net[j] for p in policies] for j in (0, 2, 4)]
    hidden = sum(layer.out_features for layer in layers[0])
    config = SACConfig(**{**asdict(first.sac_config), "hidden": hidden})
    actor = Actor(first.actor.net[0].in_features, hidden, first.actor.log_std_min, first.actor.log_std_max)
    with torch.no_grad():
        actor.net[0].weight.copy_(torch.cat([m.weight for m in layers[0]]))
        actor.net[0].bias.copy_(torch.cat([m.bias for m in layers[0]]))
        actor.net[2].weight.copy_(torch.block_diag(*[m.weight for m in layers[1]]))
        actor.net[2].bias.copy_(torch.cat([m.bias for m in layers[1]]))
        actor.net[4].weight.copy_(torch.cat([m.weight for m in layers[2]], dim=1) / k)
        actor.net[4].bias.copy_(torch.stack([m.bias for m in layers[2]]).mean(0))
    actor.eval()
    return Policy(
        actor,
        first.feature_names,
        config,
        dict(first.env_config),
        first.standardizer,
        first.cost_gains,
        first.cost_basis,
    )
