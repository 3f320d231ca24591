"""Run a trained policy on any model's embedding and budget: a budget-exact allocation.

:func:`allocate` walks the slots with the policy's mean action (no sampling), under the same budget wall as
training, then spends what is left by a final greedy fill: with a cost table through
:func:`ramp.knapsack.greedy_knapsack`, otherwise by upgrading, one format step at a time, the slots whose
pre-squash action was closest to (or past) the next format's threshold. The result is never above
``budget_matrix_bytes`` (exact padded file bytes of the matrices; the caller subtracts the fixed file overhead).

Walks (``walk``):

* ``"wall"``: the policy's actions as they are; a slot the budget can no longer pay for is clamped to what leaves
  every later slot its cheapest format. On the model it was trained on a policy paces itself; on another model it
  may overspend early, and the wall then pushes the last matrices (often the most sensitive) to their cheapest
  formats.
* ``"fit"``: every pre-squash action is shifted down by one common amount, the smallest (to 1e-3) whose walk
  without the wall fits the budget (:func:`fit_shift`), so the wall never acts and the policy's relative
  preferences decide; a walk that already fits is not shifted.
* ``"prior"``: a residual-map policy's prior alone (every action 0.5, the policy's corrections left out): the
  zero-evaluation allocation the policy corrects, for measuring what the corrections are worth.
* ``"auto"``: ``"prior"`` for a residual-map policy, ``"fit"`` for any other (:func:`resolve_walk`): the walk of a
  policy trained on other models (:data:`ZERO_SHOT_WALK`).

A policy with cost gains (``Policy.cost_gains``, learned from the training models' measured tables) prices the proxy
table by them (:func:`policy_costs`) wherever the proxy is used: the residual map's prior and the proxy fill.

``clip`` bounds every standardised feature to [-clip, clip] before the walk: a model whose statistics lie far
outside the training models' (e.g. an activation-outlier fraction 9 standard deviations out where the training saw
at most 6) is not extrapolated to.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ramp.allocation import Allocation, AllocationError, Slot, matrix_bytes, min_matrix_bytes
from ramp.errors import RampError
from ramp.io import atomic_path, atomic_write_text
from ramp.params import COST_BASES
from ramp.sac.agent import Actor, Policy, SACConfig
from ramp.sac.config import ACTION_MAPS
from ramp.sac.env import AllocationEnv, EnvConfig, check_features, state_names
from ramp.sac.env import action_map as env_action_map

log = logging.getLogger(__name__)
POLICY_WEIGHTS = "policy.safetensors"
POLICY_JSON = "policy.json"


class PolicyError(RampError, ValueError):
    """A policy file or a feature table that does not fit the policy."""


def policy_observations(policy: Policy, slots: Sequence[Slot], features: pd.DataFrame | np.ndarray) -> np.ndarray:
    """The policy's feature block, float32[n_slots, n_features], in slot order.

    A DataFrame must have ``gguf_name`` and every column of ``policy.feature_names`` (raw values, standardised here
    when the policy has a standardiser: by these rows' own statistics in mode ``model``, the default and what a
    single-model training does, or by the stored pooled statistics in mode ``pooled``); an array is taken as
    already standardised.
    """
    names = policy.feature_names
    if isinstance(features, pd.DataFrame):
        missing = [c for c in ("gguf_name", *names) if c not in features.columns]
        if missing:
            raise PolicyError(f"feature table lacks columns {missing}; the policy was trained on {list(names)}")
        table = features.set_index("gguf_name")
        absent = [s.gguf_name for s in slots if s.gguf_name not in table.index]
        if absent:
            raise PolicyError(f"feature table has no row for {len(absent)} matrices, e.g. {absent[:3]}")
        table = table.loc[[s.gguf_name for s in slots]].reset_index()
        nan = table[list(names)].isna()
        if nan.to_numpy().any():
            col = nan.any().idxmax()
            raise PolicyError(
                f"feature {col!r} is NaN for {int(nan[col].sum())} matrices, e.g. {table.gguf_name[nan[col]].iloc[0]}"
            )
        if policy.standardizer is not None:
            from ramp.features import Standardizer

            mode = policy.standardizer.get("mode", "model")
            if mode == "model":  # this model's own statistics, as every training model's were
                x = Standardizer().fit(table).transform(table)
            elif mode == "pooled":
                x = Standardizer.from_dict(policy.standardizer).transform(table)
            else:
                raise PolicyError(f"policy standardizer mode {mode!r} is not one of ['model', 'pooled']")
        else:
            x = table[list(names)].to_numpy(np.float32)
    else:
        x = np.asarray(features, np.float32)
    return check_features(x, len(slots), names)


WALKS = ("wall", "fit", "prior", "auto")
# the walk for a policy trained on other models; ``ramp quantize --policy champion`` and bench-transfer use it.
# results/transfer.json, SmolLM2 from Gemma-3. Level-map policies (SAC seeds 0, 1, 2), fit: KLD 0.0924, 0.1133,
# 0.1004 (seed 0 with the walk of training: 0.2014); clip 3 on top gave 0.0657, 0.1042, 0.1547: seed-dependent, so
# not part of it. Residual-map policies, fit: 0.0569, 0.0528, 0.0608 (Q3_K_M size); with role cost gains the prior
# alone is never worse than their corrections: 0.0522 (Q3_K_M), 0.0797 (Q4_0, fit: 0.0962), 0.1814 (Q2_K)
ZERO_SHOT_WALK = {"walk": "auto", "fill": "proxy", "clip": None}


def resolve_walk(policy: Policy, walk: str) -> str:
    """``walk`` as :func:`allocate` walks ``policy``: ``auto`` is ``prior`` for a residual-map policy, else ``fit``."""
    if walk != "auto":
        return walk
    return "prior" if policy_env_config(policy).action_map == "residual" else "fit"


def allocate(
    policy: Policy,
    slots: Sequence[Slot],
    features: pd.DataFrame | np.ndarray,
    budget_matrix_bytes: int,
    fill_cost: Mapping[tuple[str, str], float] | None = None,
    walk: str = "wall",
    clip: float | None = None,
    prior_cost: Mapping[tuple[str, str], float] | None = None,
) -> Allocation:
    """The policy's deterministic allocation of ``slots`` within ``budget_matrix_bytes`` (``walk``: module
    docstring), greedily filled. A policy of the residual action map steps from :func:`residual_prior` on
    ``prior_cost`` (default ``fill_cost``), the cost table of the policy's basis (:func:`policy_costs`): the
    uniform-fill on the proxy, the knapsack on the Fisher table.

    Raises :class:`AllocationError` when the budget is below every slot at its cheapest format, and
    :class:`PolicyError` for features with missing columns or NaN values, an unknown ``walk``, a ``clip`` that
    is not positive, or a residual policy without a cost table.
    """
    if walk not in WALKS:
        raise PolicyError(f"walk {walk!r} is not one of {list(WALKS)}")
    walk = resolve_walk(policy, walk)
    if clip is not None and not clip > 0:
        raise PolicyError(f"clip {clip!r} must be a positive number of standard deviations (or None)")
    if clip is not None and walk == "prior":
        raise PolicyError(f"clip {clip!r} clips the policy's observations, which walk 'prior' does not use: use None")
    slots = list(slots)
    minimum = min_matrix_bytes(slots)
    if budget_matrix_bytes < minimum:
        raise AllocationError(
            f"budget {budget_matrix_bytes:,d} B is below the smallest legal allocation {minimum:,d} B "
            f"({len(slots)} matrices at their cheapest formats)"
        )
    # the prior walk reads no observation of the policy (and clip was refused for it above)
    x = policy_observations(policy, slots, features) if walk != "prior" else None
    if clip is not None:
        x = np.clip(x, -clip, clip)
    prior = None
    if policy_env_config(policy).action_map == "residual":
        table = prior_cost if prior_cost is not None else fill_cost
        if table is None:
            raise PolicyError("a residual policy needs the proxy cost table for its prior (prior_cost)")
        prior = residual_prior(slots, table, budget_matrix_bytes, knapsack=policy.cost_basis == "fisher")
    if walk == "prior":
        if prior is None:
            kind = policy_env_config(policy).action_map
            raise PolicyError(f"walk 'prior' needs a residual-map policy; this one uses the {kind!r} map")
        alloc, pre = {s.gguf_name: s.formats[k] for s, k in zip(slots, prior, strict=True)}, [0.0] * len(slots)
    elif walk == "fit":
        shift = fit_shift(policy, slots, x, budget_matrix_bytes, prior=prior)
        log.info("fit walk: the policy's pre-squash actions shifted by %+.3f to fit the budget", shift)
        alloc, pre = policy_walk(policy, slots, x, budget_matrix_bytes, shift=shift, prior=prior)
    else:
        alloc, pre = policy_walk(policy, slots, x, budget_matrix_bytes, prior=prior)
    if fill_cost is not None:
        from ramp.knapsack import greedy_knapsack

        alloc = greedy_knapsack(slots, fill_cost, budget_matrix_bytes, start=alloc)
    else:
        alloc = fill_by_margin(slots, alloc, pre, budget_matrix_bytes, policy_env_config(policy).action_map, prior)
    used = matrix_bytes(slots, alloc)
    if used > budget_matrix_bytes:  # a fill that overspends is a bug, never a result
        raise AllocationError(f"greedy fill produced {used:,d} B, above the budget {budget_matrix_bytes:,d} B")
    return alloc


def policy_costs(
    policy: Policy,
    slots: Sequence[Slot],
    features: pd.DataFrame,
    proxy: Mapping[tuple[str, str], float],
    fisher: Mapping[tuple[str, str], float] | None = None,
) -> Mapping[tuple[str, str], float]:
    """The cost table ``policy`` allocates with: the fold stage's table of its ``cost_basis`` (``proxy``, or
    ``fisher``: the Fisher table, which the caller must then give), priced by the policy's cost gains per role
    (``features``' ``role`` column) when it has them. A matrix without a role or a role without a gain, or a Fisher
    basis without the table, is a :class:`PolicyError` naming it."""
    if policy.cost_basis == "fisher":
        if fisher is None:
            raise PolicyError(
                "the policy prices the fold stage's Fisher table (train.cost_basis fisher), and this model's fold "
                "stage has none: run it with fold.fisher_windows > 0"
            )
        offered = {(s.gguf_name, f) for s in slots for f in s.formats}
        proxy = {k: v for k, v in fisher.items() if k in offered}
    if policy.cost_gains is None:
        return proxy
    from ramp.sensitivity import gained_table, role_map

    names = {s.gguf_name for s in slots}
    try:
        return gained_table({k: v for k, v in proxy.items() if k[0] in names}, role_map(features), policy.cost_gains)
    except ValueError as e:
        raise PolicyError(str(e)) from e


def policy_env_config(policy: Policy) -> EnvConfig:
    """The environment settings a policy was trained with (defaults for keys older policies lack), wall on."""
    return EnvConfig(**{**asdict(EnvConfig()), **policy.env_config, "wall": True})


def policy_walk(
    policy: Policy,
    slots: Sequence[Slot],
    features: pd.DataFrame | np.ndarray,
    budget_matrix_bytes: int,
    shift: float = 0.0,
    wall: bool = True,
    prior: Sequence[int] | None = None,
) -> tuple[Allocation, list[float]]:
    """The policy's mean-action walk, each pre-squash action plus ``shift``, under the budget wall (``wall``) or
    without it, before any fill: (allocation, shifted pre-squash actions). Without the wall the allocation may be
    above the budget. ``prior``: the residual map's format index per slot (:func:`residual_prior`)."""
    x = policy_observations(policy, slots, features)
    env_config = replace(policy_env_config(policy), wall=wall)
    env = AllocationEnv(
        list(slots), x, budget_matrix_bytes, None, config=env_config, feature_names=policy.feature_names, prior=prior
    )
    obs, done, pre, info = env.reset(), False, [], {}
    while not done:
        a, u = policy.actions(obs[None])
        v = float(u[0]) + shift
        pre.append(v)
        # unshifted: the policy's own squashed action, bit for bit what the walk of training steps with
        obs, _, done, info = env.step(float(a[0]) if shift == 0.0 else float((np.tanh(v) + 1) / 2))
    return info["allocation"], pre


def fit_shift(
    policy: Policy,
    slots: Sequence[Slot],
    features: pd.DataFrame | np.ndarray,
    budget_matrix_bytes: int,
    prior: Sequence[int] | None = None,
) -> float:
    """The shift (<= 0) of the policy's pre-squash actions for the ``fit`` walk: 0 when the unshifted walk without
    the wall fits ``budget_matrix_bytes``, else the largest shift found by bisection (to 1e-3) whose walk fits.

    Later observations depend on earlier choices, so bytes need not fall monotonically with the shift; the
    returned shift's walk fits regardless. Raises :class:`AllocationError` when no shift down to -1024 fits (a
    budget below every slot at its cheapest format)."""
    x = policy_observations(policy, slots, features)

    def fits(shift: float) -> bool:
        alloc, _ = policy_walk(policy, slots, x, budget_matrix_bytes, shift=shift, wall=False, prior=prior)
        return matrix_bytes(slots, alloc) <= budget_matrix_bytes

    if fits(0.0):
        return 0.0
    hi, lo = 0.0, -1.0
    while not fits(lo):
        hi, lo = lo, 2 * lo
        if lo < -1024:
            raise AllocationError(f"no shift of the policy's actions fits {budget_matrix_bytes:,d} B")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def residual_prior(
    slots: Sequence[Slot], cost: Mapping[tuple[str, str], float], budget_matrix_bytes: int, knapsack: bool = False
) -> list[int]:
    """The residual action map's prior: per slot, the index of its format in the zero-evaluation uniform-fill
    allocation (:func:`ramp.knapsack.knapsack_starts`, ``uniform``) on ``cost`` within ``budget_matrix_bytes``; with
    ``knapsack``, in the better knapsack on ``cost`` (:func:`ramp.sensitivity.best_knapsack`). The uniform-fill suits
    the proxy, whose unit differs from matrix to matrix (its own knapsack is worse than its uniform-fill on SmolLM2);
    the knapsack suits the Fisher table (``cost_basis: fisher``), which is in KLD on every matrix."""
    if knapsack:
        from ramp.sensitivity import best_knapsack

        start = best_knapsack(slots, cost, budget_matrix_bytes)
    else:
        from ramp.knapsack import knapsack_starts

        start = knapsack_starts(slots, cost, budget_matrix_bytes, ["uniform"])["uniform"]
    return [s.formats.index(start[s.gguf_name]) for s in slots]


def _threshold(tanh_start: float) -> float:
    """Pre-squash action at which a format starting at ``tanh_start`` on the squashed scale begins."""
    return math.atanh(min(max(tanh_start, -1 + 1e-9), 1 - 1e-9))


def _next_step(s: Slot, k: int) -> int | None:
    """The next format index above ``k`` that costs more bytes (same-byte neighbours, e.g. IQ4_NL / Q4_0, are
    not upgrades: stepping onto one spends nothing and may lose quality), or None at the top."""
    here = s.file_bytes(s.formats[k])
    return next((j for j in range(k + 1, len(s.formats)) if s.file_bytes(s.formats[j]) > here), None)


def fill_by_margin(
    slots: Sequence[Slot],
    alloc: Allocation,
    pre_squash: Sequence[float],
    budget_matrix_bytes: int,
    action_map: str = "index",
    prior: Sequence[int] | None = None,
) -> Allocation:
    """Upgrade slots one byte-costing format step at a time, most wanted first (pre-squash action minus the next
    step's threshold under ``action_map``, largest first), while the upgrade fits; slots whose next step does not
    fit are skipped. ``prior``: the residual map's format index per slot."""
    if len(pre_squash) != len(slots):
        raise PolicyError(f"{len(pre_squash)} pre-squash actions for {len(slots)} slots; expected one per slot")
    priors = list(prior) if prior is not None else [None] * len(slots)
    maps = [env_action_map(s.formats, action_map, k) for s, k in zip(slots, priors, strict=True)]
    alloc = dict(alloc)
    left = budget_matrix_bytes - matrix_bytes(slots, alloc)
    heap = []

    def push(i: int, k: int) -> None:
        j = _next_step(slots[i], k)
        if j is not None:
            heapq.heappush(heap, (-(pre_squash[i] - _threshold(maps[i].tanh_start(j))), i, j))

    for i, s in enumerate(slots):
        push(i, s.formats.index(alloc[s.gguf_name]))
    while heap:
        _, i, k = heapq.heappop(heap)
        s = slots[i]
        extra = s.file_bytes(s.formats[k]) - s.file_bytes(alloc[s.gguf_name])
        if extra > left:
            continue
        alloc[s.gguf_name] = s.formats[k]
        left -= extra
        push(i, k)
    return alloc


def save_policy(policy: Policy, path: str | Path) -> Path:
    """Write ``path/policy.safetensors`` (actor weights) and ``path/policy.json`` (configs, feature names,
    standardiser statistics) atomically; returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / POLICY_WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in policy.actor.state_dict().items()}, str(tmp))
    atomic_write_text(folder / POLICY_JSON, json.dumps(policy.config_dict(), indent=1) + "\n")
    return folder


def load_policy(path: str | Path, feature_names: Sequence[str] | None = None) -> Policy:
    """Read a policy written by :func:`save_policy`; with ``feature_names``, raise unless they match the policy's.

    Raises :class:`PolicyError` naming the file for a missing, unparsable or inconsistent policy (weights whose
    shapes do not match ``policy.json``), before any tensor of the claimed size is allocated."""
    folder = Path(path)
    if not (folder / POLICY_JSON).exists() or not (folder / POLICY_WEIGHTS).exists():
        raise PolicyError(f"{folder}: no policy here (expected {POLICY_JSON} and {POLICY_WEIGHTS})")
    try:
        meta = json.loads((folder / POLICY_JSON).read_text())
        names = tuple(meta["feature_names"])
        sac = SACConfig(**meta["sac"])
        obs_dim = meta["obs_dim"]
        env, standardizer = dict(meta["env"]), meta["standardizer"]
        gains = meta.get("cost_gains")
        basis = meta.get("cost_basis", "proxy")
        if gains is not None:
            gains = {str(k): float(v) for k, v in gains.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # AttributeError/TypeError: not a JSON object
        raise PolicyError(f"{folder / POLICY_JSON}: not a policy description ({type(e).__name__}: {e})") from e
    action_map = env.get("action_map", "index")  # policies from before the action maps walked indices
    if gains is not None and not all(math.isfinite(v) for v in gains.values()):
        raise PolicyError(f"{folder / POLICY_JSON}: cost_gains {gains} must be finite numbers")
    if basis not in COST_BASES:
        raise PolicyError(f"{folder / POLICY_JSON}: cost_basis {basis!r} is not one of {list(COST_BASES)}")
    if action_map not in ACTION_MAPS:
        raise PolicyError(f"{folder / POLICY_JSON}: env.action_map {action_map!r} is not one of {list(ACTION_MAPS)}")
    state = state_names(action_map)
    if not all(isinstance(n, str) for n in names) or type(obs_dim) is not int or obs_dim != len(names) + len(state):
        raise PolicyError(
            f"{folder / POLICY_JSON}: obs_dim {obs_dim!r} must be the {len(names)} feature names (strings) + "
            f"{len(state)} budget-state inputs"
        )
    if feature_names is not None and tuple(feature_names) != names:
        raise PolicyError(
            f"{folder}: policy was trained on features {list(names)}, but these are {list(feature_names)}"
        )
    try:
        with torch.device("meta"):  # the expected shapes, without allocating what policy.json claims
            expected = {k: tuple(v.shape) for k, v in Actor(obs_dim, sac.hidden).state_dict().items()}
    except (RuntimeError, TypeError, ValueError) as e:
        raise PolicyError(f"{folder / POLICY_JSON}: sac.hidden {sac.hidden!r} does not describe an actor ({e})") from e
    try:
        weights = load_file(str(folder / POLICY_WEIGHTS))
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise PolicyError(f"{folder / POLICY_WEIGHTS}: unreadable policy weights ({type(e).__name__}: {e})") from e
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found != expected:
        raise PolicyError(
            f"{folder / POLICY_WEIGHTS}: tensors {found} do not match the actor {POLICY_JSON} describes: {expected}"
        )
    actor = Actor(obs_dim, sac.hidden, sac.log_std_min, sac.log_std_max)
    actor.load_state_dict(weights)
    actor.eval()
    return Policy(actor, names, sac, env, standardizer, gains, basis)
