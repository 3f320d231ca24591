"""SAC agent: the squashed-Gaussian log-probability, seeded determinism, exact state round trip."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from ramp.sac.agent import SACAgent, SACConfig, torch_threads
from ramp.sac.replay import ReplayBuffer

OBS = 14


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):  # tiny MLPs: one thread is fastest and keeps the shared CPU free
        yield


def filled(agent: SACAgent, n: int = 256, seed: int = 0) -> SACAgent:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        agent.replay.add(
            rng.normal(size=OBS), rng.uniform(-1, 1, size=1), rng.normal(), rng.normal(size=OBS), rng.random() < 0.3
        )
    return agent


def weights_bytes(agent: SACAgent) -> bytes:
    return save({k: v for k, v in agent.state_tensors().items() if not k.startswith("replay.")})


def test_log_prob_matches_torch_tanh_transformed_normal():
    agent = SACAgent(OBS, SACConfig(seed=1))
    obs = torch.randn(64, OBS, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(5)
    action, logp = agent.actor.sample(obs, gen)
    mean, log_std = agent.actor(obs)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()]
    )
    ref = dist.log_prob(action.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1, keepdim=True)
    mask = action.abs() < 0.99  # where the 1e-6 guard of the tanh Jacobian is negligible
    torch.testing.assert_close(logp[mask], ref[mask], atol=2e-3, rtol=1e-3)
    assert action.abs().max() < 1


def test_same_seed_same_updates_bit_for_bit():
    a, b = (
        filled(SACAgent(OBS, SACConfig(seed=7, batch_size=32))),
        filled(SACAgent(OBS, SACConfig(seed=7, batch_size=32))),
    )
    for _ in range(20):
        sa, sb = a.update(), b.update()
        assert sa == sb
    assert weights_bytes(a) == weights_bytes(b)
    c = filled(SACAgent(OBS, SACConfig(seed=8, batch_size=32)))
    for _ in range(20):
        c.update()
    assert weights_bytes(c) != weights_bytes(a)


def test_state_round_trip_continues_identically():
    cfg = SACConfig(seed=3, batch_size=32)
    a = filled(SACAgent(OBS, cfg))
    for _ in range(10):
        a.update()
    tensors = load(save(a.state_tensors()))  # through safetensors bytes, as a checkpoint does
    meta = a.state_json()
    b = SACAgent(OBS, cfg)
    b.load_state(tensors, meta)
    for _ in range(10):
        assert a.update() == b.update()
        assert a.act(np.ones(OBS), explore=True) == b.act(np.ones(OBS), explore=True)
    assert weights_bytes(a) == weights_bytes(b)
    assert torch.equal(a.replay.sample(8, a.rng)["obs"], b.replay.sample(8, b.rng)["obs"])


def test_critic_learns_a_reward_that_depends_on_the_action():
    # Terminal transitions with reward = -(a - 0.4)^2: the actor's mean must move toward 0.4.
    cfg = SACConfig(seed=0, batch_size=64, actor_lr=3e-3, critic_lr=3e-3, init_alpha=0.01)
    agent = SACAgent(OBS, cfg)
    obs = np.zeros(OBS, np.float32)
    rng = np.random.default_rng(0)
    for _ in range(512):
        a = rng.uniform(-1, 1)
        agent.replay.add(obs, np.array([a]), -((a - 0.4) ** 2), obs, True)
    for _ in range(300):
        agent.update()
    assert agent.act(obs, explore=False) == pytest.approx(0.4, abs=0.1)


def test_replay_ring_overwrites_oldest_and_samples_in_range():
    buf = ReplayBuffer(4, 2)
    for i in range(6):
        buf.add(np.full(2, i), np.zeros(1), float(i), np.zeros(2), False)
    assert len(buf) == 4 and buf.ptr == 2
    assert sorted(buf.data["reward"].tolist()) == [2.0, 3.0, 4.0, 5.0]
    s = buf.sample(100, np.random.default_rng(0))
    assert set(s["reward"].tolist()) <= {2.0, 3.0, 4.0, 5.0}


@pytest.mark.parametrize(("field", "value"), [("episodes", 0), ("tau", 1.5), ("credit", "mc")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SACConfig(**{field: value})


def test_alpha_starts_at_init_alpha():
    assert SACAgent(OBS, SACConfig(init_alpha=0.25)).alpha == pytest.approx(0.25)
    assert math.isclose(SACConfig().target_entropy, -1.0)


def test_ensemble_policy_averages_its_members_and_saves_like_one(tmp_path):
    from ramp.allocate import load_policy, save_policy
    from ramp.features import FEATURES
    from ramp.sac.agent import ensemble_policy, policy_from_agent

    env = {"action_map": "level"}
    members = [policy_from_agent(SACAgent(11 + 3, SACConfig(seed=s)), FEATURES, env) for s in (0, 1, 2)]
    merged = ensemble_policy(members)
    assert merged.sac_config.hidden == 3 * 64 and merged.env_config == env
    obs = np.random.default_rng(0).standard_normal((50, 14)).astype(np.float32)
    mean_u = np.mean([p.actions(obs)[1] for p in members], axis=0)
    np.testing.assert_allclose(merged.actions(obs)[1], mean_u, rtol=1e-5, atol=1e-6)
    assert not np.allclose(members[0].actions(obs)[1], mean_u, atol=1e-3)  # the members do differ
    loaded = load_policy(save_policy(merged, tmp_path / "p"))
    np.testing.assert_array_equal(loaded.actions(obs)[1], merged.actions(obs)[1])
    assert ensemble_policy(members[:1]) is members[0]
    other = policy_from_agent(SACAgent(11 + 3, SACConfig(seed=3)), FEATURES, {"action_map": "index"})
    with pytest.raises(ValueError, match="member 1 differs from member 0"):
        ensemble_policy([members[0], other])
    with pytest.raises(ValueError, match="at least one policy"):
        ensemble_policy([])
