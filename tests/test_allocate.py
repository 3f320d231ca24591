"""allocate(): budget-exact deterministic allocations, greedy fill, clear errors, policy files."""

import numpy as np
import pandas as pd
import pytest

from ramp.allocate import (
    PolicyError,
    allocate,
    fill_by_margin,
    load_policy,
    policy_observations,
    policy_walk,
    save_policy,
)
from ramp.allocation import AllocationError, matrix_bytes, min_matrix_bytes, uniform
from ramp.features import FEATURES, Standardizer
from ramp.knapsack import greedy_knapsack
from ramp.sac.agent import SACAgent, SACConfig, policy_from_agent, torch_threads
from ramp.sac.env import SyntheticTask

FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def task():
    return SyntheticTask.make(n_slots=10, seed=2, formats=FORMATS)


def feature_table(task, shift: float = 0.0) -> pd.DataFrame:
    df = pd.DataFrame(task.features.astype(np.float64) + shift, columns=list(FEATURES))
    df.insert(0, "gguf_name", [s.gguf_name for s in task.slots])
    return df


def policy_for(task, seed: int = 0, standardizer=None):
    agent = SACAgent(11 + 3, SACConfig(seed=seed))
    return policy_from_agent(agent, FEATURES, {"wall": True, "bpw_norm": 16.0}, standardizer)


def smallest_step(slots, alloc):
    steps = [
        s.file_bytes(s.formats[s.formats.index(alloc[s.gguf_name]) + 1]) - s.file_bytes(alloc[s.gguf_name])
        for s in slots
        if alloc[s.gguf_name] != s.formats[-1]
    ]
    return min(steps) if steps else None


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", ["min", "Q3_K+123", "Q4_K", "Q6_K-1", "Q8_0", "Q8_0+4096"])
def test_never_above_budget_and_nothing_left_that_fits(task, seed, budget):
    slots = list(task.slots)
    fmt, sign, delta = budget.replace("-", "+-").partition("+")
    nbytes = min_matrix_bytes(slots) if fmt == "min" else matrix_bytes(slots, uniform(slots, fmt))
    nbytes += int(delta) if sign else 0
    alloc = allocate(policy_for(task, seed), slots, task.features, nbytes)
    used = matrix_bytes(slots, alloc)
    assert used <= nbytes
    step = smallest_step(slots, alloc)
    assert step is None or nbytes - used < step  # the greedy fill left no affordable one-step upgrade


def test_budget_below_minimum_names_both_numbers(task):
    slots = list(task.slots)
    low = min_matrix_bytes(slots) - 32
    with pytest.raises(
        AllocationError, match=f"budget {low:,d} B is below the smallest legal allocation {low + 32:,d} B"
    ):
        allocate(policy_for(task), slots, task.features, low)


def test_feature_table_errors_name_the_column(task):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    policy = policy_for(task)
    with pytest.raises(PolicyError, match=r"lacks columns \['w_kurtosis'\]"):
        allocate(policy, slots, feature_table(task).drop(columns=["w_kurtosis"]), budget)
    df = feature_table(task)
    df.loc[3, "depth"] = np.nan
    with pytest.raises(PolicyError, match=r"feature 'depth' is NaN for 1 matrices, e.g. blk.3.synthetic.weight"):
        allocate(policy, slots, df, budget)
    with pytest.raises(PolicyError, match="no row for 1 matrices"):
        allocate(policy, slots, feature_table(task).iloc[1:], budget)


def test_dataframe_and_array_agree_and_standardizer_is_applied(task):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    raw = feature_table(task, shift=3.0)
    std = Standardizer().fit(raw)
    with_stats = policy_for(task, standardizer=std.to_dict())
    a = allocate(with_stats, slots, raw.sample(frac=1.0, random_state=0), budget)  # row order does not matter
    b = allocate(policy_for(task), slots, std.transform(raw), budget)
    assert a == b


def test_model_mode_standardises_each_model_by_its_own_statistics(task):
    """A policy (mode ``model``, the default) sees a model whose every feature is shifted and scaled alike as the
    same model; mode ``pooled`` applies the stored statistics, so the shift moves its observations."""
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    raw = feature_table(task)
    moved = raw.copy()
    moved[list(FEATURES)] = raw[list(FEATURES)] * 3.0 + 7.0
    stats = Standardizer().fit(raw).to_dict()
    per_model = policy_for(task, seed=5, standardizer=stats)
    assert allocate(per_model, slots, moved, budget) == allocate(per_model, slots, raw, budget)
    pooled = policy_for(task, seed=5, standardizer={**stats, "mode": "pooled"})
    assert allocate(pooled, slots, raw, budget) == allocate(per_model, slots, raw, budget)  # fit on these rows
    x_raw = policy_observations(pooled, slots, raw)
    x_moved = policy_observations(pooled, slots, moved)
    assert not np.allclose(x_raw, x_moved)
    np.testing.assert_allclose(policy_observations(per_model, slots, moved), x_raw, rtol=1e-5, atol=1e-5)
    with pytest.raises(PolicyError, match="'zscore'"):
        policy_observations(policy_for(task, standardizer={**stats, "mode": "zscore"}), slots, raw)


def test_save_load_round_trip_and_feature_mismatch(task, tmp_path):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    raw = feature_table(task)
    policy = policy_for(task, seed=4, standardizer=Standardizer().fit(raw).to_dict())
    save_policy(policy, tmp_path / "p")
    loaded = load_policy(tmp_path / "p", feature_names=FEATURES)
    assert allocate(loaded, slots, raw, budget) == allocate(policy, slots, raw, budget)
    with pytest.raises(PolicyError, match="trained on features"):
        load_policy(tmp_path / "p", feature_names=FEATURES[::-1])
    with pytest.raises(PolicyError, match="no policy here"):
        load_policy(tmp_path / "missing")


def test_fill_cost_uses_greedy_knapsack(task):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K")) + 5000
    cost = {
        (s.gguf_name, f): float(task.sensitivity[s.block] * 2.0**-i) for s in slots for i, f in enumerate(s.formats)
    }
    policy = policy_for(task)
    walk, _ = policy_walk(policy, slots, task.features, budget)
    filled = allocate(policy, slots, task.features, budget, fill_cost=cost)
    assert filled == greedy_knapsack(slots, cost, budget, start=walk)
    assert matrix_bytes(slots, walk) <= matrix_bytes(slots, filled) <= budget


def test_fill_by_margin_upgrades_most_wanted_first(task):
    slots = list(task.slots)[:3]
    alloc = {s.gguf_name: "Q2_K" for s in slots}
    step = slots[1].file_bytes("Q3_K") - slots[1].file_bytes("Q2_K")
    budget = matrix_bytes(slots, alloc) + step
    out = fill_by_margin(slots, alloc, [-3.0, 2.0, 0.0], budget)
    assert out[slots[1].gguf_name] == "Q3_K" and out[slots[0].gguf_name] == out[slots[2].gguf_name] == "Q2_K"


def test_fill_never_takes_a_same_size_step():
    """IQ4_NL and Q4_0 cost the same bytes: a fill step between them spends nothing and is not an upgrade."""
    from ramp.allocation import matrix_bytes, slots_for
    from ramp.models.loader import MatrixInfo

    slots = slots_for([MatrixInfo(0, "q", "q", f"blk.{i}.attn_q.weight", (64, 576)) for i in range(3)])
    assert slots[0].formats[:2] == ("IQ4_NL", "Q4_0")
    start = {s.gguf_name: "IQ4_NL" for s in slots}
    budget = matrix_bytes(slots, start) + slots[0].file_bytes("Q5_0") - slots[0].file_bytes("IQ4_NL")
    out = fill_by_margin(slots, start, [3.0, 2.0, 1.0], budget)
    assert sorted(out.values()) == ["IQ4_NL", "IQ4_NL", "Q5_0"] and out["blk.0.attn_q.weight"] == "Q5_0"
    with pytest.raises(PolicyError, match="2 pre-squash actions for 3 slots"):
        fill_by_margin(slots, start, [1.0, 2.0], budget)


def test_level_action_map_travels_with_the_policy(task, tmp_path):
    """A policy trained under the "level" action map walks and fills under it after a save/load round trip."""
    from ramp.sac.env import AllocationEnv, EnvConfig

    slots = list(task.slots)
    agent = SACAgent(11 + 3, SACConfig(seed=4))
    policy = load_policy(save_policy(policy_from_agent(agent, FEATURES, {"action_map": "level"}), tmp_path / "p"))
    assert policy.env_config["action_map"] == "level"
    budget = matrix_bytes(slots, uniform(slots, "Q4_K")) + 777
    walk, _ = policy_walk(policy, slots, task.features, budget)
    env = AllocationEnv(slots, task.features, budget, config=EnvConfig(action_map="level"), feature_names=FEATURES)
    obs, done = env.reset(), False
    while not done:
        obs, _, done, info = env.step(float(policy.actions(obs[None])[0][0]))
    assert walk == info["allocation"]
    filled = allocate(policy, slots, task.features, budget)
    step = smallest_step(slots, filled)
    assert matrix_bytes(slots, filled) <= budget and (step is None or budget - matrix_bytes(slots, filled) < step)


def test_fill_thresholds_follow_the_action_map(task):
    """Room for one upgrade: A (Q3_K -> Q4_K) is past its next edge under the level map (2/9) but short of it under
    the index map (2/6); B (Q5_K -> Q6_K) is past its edge (4/6 = 6/9) by the same amount under both maps."""
    a, b = task.slots[0], task.slots[2]
    start = {a.gguf_name: "Q3_K", b.gguf_name: "Q5_K"}
    steps = [a.file_bytes("Q4_K") - a.file_bytes("Q3_K"), b.file_bytes("Q6_K") - b.file_bytes("Q5_K")]
    room = matrix_bytes([a, b], start) + max(steps)
    pre = [float(np.arctanh(2 * 0.28 - 1)), float(np.arctanh(2 * (4 / 6 + 0.03) - 1))]
    level = fill_by_margin([a, b], start, pre, room, "level")
    index = fill_by_margin([a, b], start, pre, room, "index")
    assert (level[a.gguf_name], level[b.gguf_name]) == ("Q4_K", "Q5_K")
    assert (index[a.gguf_name], index[b.gguf_name]) == ("Q3_K", "Q6_K")


def greedy_policy(task, bias: float):
    """A policy whose every pre-squash action is ``bias`` (weights zeroed): it asks for the same format everywhere."""
    import torch

    policy = policy_for(task)
    last = policy.actor.net[-1]
    with torch.no_grad():
        for layer in policy.actor.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
        last.bias.zero_()
        last.bias[0] = bias
    return policy


def test_fit_walk_shifts_an_overspending_policy_instead_of_starving_the_last_slots(task):
    from ramp.allocate import fit_shift

    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    policy = greedy_policy(task, 3.0)  # wants Q8_0 everywhere: twice the budget
    walled, _ = policy_walk(policy, slots, task.features, budget)
    assert walled[slots[0].gguf_name] == "Q8_0" and walled[slots[-1].gguf_name] == "Q2_K"  # the wall's damage
    shift = fit_shift(policy, slots, task.features, budget)
    assert shift < 0
    fitted, _ = policy_walk(policy, slots, task.features, budget, shift=shift, wall=False)
    assert matrix_bytes(slots, fitted) <= budget
    assert len(set(fitted.values())) == 1  # one common action: one format everywhere, not Q8_0 then Q2_K
    over, _ = policy_walk(policy, slots, task.features, budget, shift=shift + 2e-3, wall=False)
    assert matrix_bytes(slots, over) > budget  # the largest fitting shift, to the bisection's tolerance
    alloc = allocate(policy, slots, task.features, budget, walk="fit")
    assert matrix_bytes(slots, alloc) <= budget and set(alloc.values()) <= {"Q4_K", "Q5_K"}
    assert fit_shift(greedy_policy(task, -3.0), slots, task.features, budget) == 0.0  # fits: not shifted


def test_clip_bounds_the_features_the_policy_sees(task):
    slots = list(task.slots)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K"))
    policy = policy_for(task, 1)
    far = task.features.copy()
    far[3] = 40.0  # one matrix 40 standard deviations out on every feature
    clipped = allocate(policy, slots, far, budget, clip=2.5)
    assert clipped == allocate(policy, slots, np.clip(far, -2.5, 2.5), budget)
    assert allocate(policy, slots, far, budget, clip=100.0) == allocate(policy, slots, far, budget)


@pytest.mark.parametrize(("kwargs", "match"), [({"walk": "greedy"}, "walk 'greedy'"), ({"clip": 0.0}, "clip 0.0")])
def test_bad_walk_settings_name_the_value(task, kwargs, match):
    slots = list(task.slots)
    with pytest.raises(PolicyError, match=match):
        allocate(policy_for(task), slots, task.features, matrix_bytes(slots, uniform(slots, "Q4_K")), **kwargs)


def residual_policy(task, bias: float, tmp_path):
    """A residual-map policy (saved and loaded) whose every pre-squash action is ``bias``."""
    import torch

    agent = SACAgent(11 + 4, SACConfig(seed=5))
    policy = load_policy(save_policy(policy_from_agent(agent, FEATURES, {"action_map": "residual"}), tmp_path / "r"))
    with torch.no_grad():
        for layer in policy.actor.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
        policy.actor.net[-1].bias.zero_()
        policy.actor.net[-1].bias[0] = bias
    return policy


def proxy_cost(task):
    """A cost table from the synthetic sensitivities (what the fold stage's proxy is on a real model)."""
    from ramp.formats import get_format

    return {
        (s.gguf_name, f): float(task.sensitivity[i] * 2.0 ** -get_format(f).bpw)
        for i, s in enumerate(task.slots)
        for f in s.formats
    }


def test_residual_policy_steps_from_the_uniform_fill_of_the_model_it_allocates(task, tmp_path):
    from ramp.allocate import residual_prior
    from ramp.knapsack import knapsack_starts

    slots = list(task.slots)
    cost = proxy_cost(task)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K")) + 5000
    prior = residual_prior(slots, cost, budget)
    fill = knapsack_starts(slots, cost, budget, ["uniform"])["uniform"]
    assert [s.formats[k] for s, k in zip(slots, prior, strict=True)] == [fill[s.gguf_name] for s in slots]
    # a policy that keeps every prior (action 0.5, pre-squash 0) allocates the uniform-fill itself
    keep = residual_policy(task, 0.0, tmp_path)
    assert allocate(keep, slots, task.features, budget, prior_cost=cost) == fill
    assert allocate(keep, slots, task.features, budget, fill_cost=cost) == fill  # the fill table serves as prior
    # one that asks a step down everywhere (pre-squash -0.5: action 0.27, the -1 part) is filled back to the budget
    down, _ = policy_walk(residual_policy(task, -0.5, tmp_path), slots, task.features, budget, prior=prior)
    assert all(s.formats.index(down[s.gguf_name]) == max(k - 1, 0) for s, k in zip(slots, prior, strict=True))
    filled = allocate(residual_policy(task, -0.5, tmp_path), slots, task.features, budget, fill_cost=cost)
    assert matrix_bytes(slots, down) < matrix_bytes(slots, filled) <= budget
    with pytest.raises(PolicyError, match="residual policy needs the proxy cost table"):
        allocate(keep, slots, task.features, budget)


def test_a_policy_file_with_an_unknown_action_map_is_named(task, tmp_path):
    import json

    folder = save_policy(policy_for(task), tmp_path / "p")
    meta = json.loads((folder / "policy.json").read_text())
    meta["env"]["action_map"] = "bits"
    (folder / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyError, match="env.action_map 'bits'"):
        load_policy(folder)
    meta["env"]["action_map"] = "residual"  # 14 inputs, but a residual policy observes 15
    (folder / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyError, match="obs_dim 14 must be the 11 feature names \\(strings\\) \\+ 4"):
        load_policy(folder)


def test_prior_walk_is_the_residual_prior_and_ignores_the_corrections(task, tmp_path):
    from ramp.knapsack import knapsack_starts

    slots = list(task.slots)
    cost = proxy_cost(task)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K")) + 5000
    fill = knapsack_starts(slots, cost, budget, ["uniform"])["uniform"]
    down = residual_policy(task, -0.5, tmp_path)  # its own walk steps every slot down
    assert allocate(down, slots, task.features, budget, fill_cost=cost) != fill
    assert allocate(down, slots, task.features, budget, walk="prior", fill_cost=cost) == fill
    with pytest.raises(PolicyError, match="walk 'prior' needs a residual-map policy; this one uses the 'index' map"):
        allocate(policy_for(task), slots, task.features, budget, walk="prior", fill_cost=cost)
    with pytest.raises(PolicyError, match="clip 3.0 clips the policy's observations, which walk 'prior' does not use"):
        allocate(down, slots, task.features, budget, walk="prior", fill_cost=cost, clip=3.0)
    # the prior reads no feature: a table the policy could not observe still gives it
    assert allocate(down, slots, np.full((len(slots), 1), np.nan), budget, walk="prior", fill_cost=cost) == fill


def test_auto_walk_is_the_prior_for_a_residual_policy_and_fit_for_any_other(task, tmp_path):
    from ramp.allocate import ZERO_SHOT_WALK, resolve_walk

    slots, cost = list(task.slots), proxy_cost(task)
    budget = matrix_bytes(slots, uniform(slots, "Q4_K")) + 5000
    down, index = residual_policy(task, -0.5, tmp_path), policy_for(task)
    assert (resolve_walk(down, "auto"), resolve_walk(index, "auto"), resolve_walk(down, "wall")) == (
        "prior",
        "fit",
        "wall",
    )
    assert ZERO_SHOT_WALK["walk"] == "auto"
    for policy in (down, index):
        auto = allocate(policy, slots, task.features, budget, walk="auto", fill_cost=cost)
        assert auto == allocate(policy, slots, task.features, budget, walk=resolve_walk(policy, "auto"), fill_cost=cost)
    with pytest.raises(PolicyError, match="walk 'fast' is not one of \\['wall', 'fit', 'prior', 'auto'\\]"):
        allocate(index, slots, task.features, budget, walk="fast", fill_cost=cost)


def test_cost_gains_travel_with_the_policy_and_price_the_proxy_per_role(task, tmp_path):
    import dataclasses
    import json

    from ramp.allocate import policy_costs
    from ramp.knapsack import knapsack_starts

    slots = list(task.slots)
    cost = proxy_cost(task)
    table = feature_table(task)
    table["role"] = ["down" if i % 2 else "q" for i in range(len(slots))]
    plain = residual_policy(task, 0.0, tmp_path)
    assert policy_costs(plain, slots, table, cost) is cost  # no gains: the proxy as it is
    gains = {"down": 2.0, "q": -1.0}
    policy = load_policy(save_policy(dataclasses.replace(plain, cost_gains=gains), tmp_path / "g"))
    assert policy.cost_gains == gains
    priced = policy_costs(policy, slots, table, cost)
    for i, s in enumerate(slots):
        for f in s.formats:
            assert priced[(s.gguf_name, f)] == pytest.approx(cost[(s.gguf_name, f)] * np.exp(gains[table.role[i]]))
    # the priced table is the prior: the walk of a keep-everything policy is the uniform-fill on it
    budget = matrix_bytes(slots, uniform(slots, "Q4_K")) + 5000
    expected = knapsack_starts(slots, priced, budget, ["uniform"])["uniform"]
    assert allocate(policy, slots, table, budget, prior_cost=priced, fill_cost=priced) == expected
    with pytest.raises(PolicyError, match="role 'up' has no cost gain"):
        policy_costs(policy, slots, table.assign(role="up"), cost)
    with pytest.raises(PolicyError, match="has no 'role' column"):
        policy_costs(policy, slots, table.drop(columns="role"), cost)
    # ramp quantize --policy champion predicts the embedding type only from a champion with an embedding gain
    from ramp.cli import zero_shot_embedding_type

    assert zero_shot_embedding_type(tmp_path / "g") is None
    assert zero_shot_embedding_type(save_policy(plain, tmp_path / "plain")) is None
    with_embedding = dataclasses.replace(plain, cost_gains={**gains, "embedding": 4.5})
    assert zero_shot_embedding_type(save_policy(with_embedding, tmp_path / "e")) == "predicted"
    meta = json.loads((tmp_path / "g" / "policy.json").read_text())
    for bad in ({"down": "x"}, ["down"], {"down": float("inf")}):
        meta["cost_gains"] = bad
        (tmp_path / "g" / "policy.json").write_text(json.dumps(meta))
        with pytest.raises(PolicyError, match="policy.json"):
            load_policy(tmp_path / "g")


def test_a_fisher_basis_travels_with_the_policy_and_prices_the_fisher_table(task, tmp_path):
    import dataclasses
    import json

    from ramp.allocate import policy_costs
    from ramp.sensitivity import best_knapsack

    slots = list(task.slots)
    cost = proxy_cost(task)
    # a table that ranks the matrices otherwise than the proxy: the last matrix is the dear one here
    fisher = {k: v * (1e4 if k[0] == slots[-1].gguf_name else 1.0) for k, v in cost.items()}
    fisher[("not.offered.weight", "Q8_0")] = 1.0  # pairs outside the action space are dropped
    table = feature_table(task)
    table["role"] = "q"
    plain = residual_policy(task, 0.0, tmp_path)
    saved = save_policy(dataclasses.replace(plain, cost_basis="fisher"), tmp_path / "f")
    policy = load_policy(saved)
    assert policy.cost_basis == "fisher" and load_policy(save_policy(plain, tmp_path / "p")).cost_basis == "proxy"
    assert "cost_basis" not in json.loads((tmp_path / "p" / "policy.json").read_text())  # older policies read alike
    offered = {k: v for k, v in fisher.items() if k[0] != "not.offered.weight"}
    assert policy_costs(policy, slots, table, cost, fisher) == offered
    gained = policy_costs(dataclasses.replace(policy, cost_gains={"q": 1.0}), slots, table, cost, fisher)
    assert all(gained[k] == pytest.approx(fisher[k] * np.e) for k in gained)
    with pytest.raises(PolicyError, match="fold.fisher_windows > 0"):
        policy_costs(policy, slots, table, cost)
    # the prior walks the table it prices: more bytes for the matrix the Fisher table calls dear
    budget = matrix_bytes(slots, uniform(slots, "Q4_K")) + 70000
    on_proxy = allocate(plain, slots, table, budget, prior_cost=cost, fill_cost=cost)
    priced = policy_costs(policy, slots, table, cost, fisher)
    on_fisher = allocate(policy, slots, table, budget, prior_cost=priced, fill_cost=priced)
    assert on_fisher == best_knapsack(slots, priced, budget)  # a table in KLD on every matrix: its knapsack
    last = slots[-1]
    assert last.file_bytes(on_fisher[last.gguf_name]) > last.file_bytes(on_proxy[last.gguf_name])
    meta = json.loads((tmp_path / "f" / "policy.json").read_text())
    meta["cost_basis"] = "gradient"
    (tmp_path / "f" / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyError, match="cost_basis 'gradient' is not one of \\['proxy', 'fisher'\\]"):
        load_policy(tmp_path / "f")
