"""The allocation environment: one episode walks the quantizable matrices in model order and picks a format each.

Observation at step t (``np.float32[n_features + 3]``, one more under the residual map): the slot's standardised
features (11 of them, SPEC §4), then the budget state:

* remaining budget fraction: bytes not yet spent / budget bytes,
* fraction of slots left (this one included),
* bits per weight of the previous slot's format / ``EnvConfig.bpw_norm`` (0 at the first slot),
* residual map only: bits per weight of the slot's prior format / ``EnvConfig.bpw_norm``.

Action ``a`` in [0, 1] picks one of the slot's formats (ordered by bpw) through ``EnvConfig.action_map``:

* ``"index"``: ``slot.formats[min(floor(a * K), K - 1)]``, a fraction of the slot's own list, so the same action
  means different bits per weight on slots (and models) whose legal lists differ;
* ``"level"``: the unit interval is cut into equal parts, one per distinct bpw level of the quantization
  choices (:data:`BPW_LEVELS`); each part goes to the slot's format nearest that level (ties: the cheaper), and formats
  of equal bpw share their level's part. The same action means the same bpw on every model, which is what a
  policy needs to transfer between models whose legal or pruned format lists differ.
* ``"residual"``: a step away from a *prior* format per slot (``prior``: the zero-evaluation uniform-fill of
  :func:`ramp.knapsack.knapsack_starts` on that model at that budget): the unit interval is cut into
  ``2 * RESIDUAL_REACH + 1`` equal parts, part ``j`` picks the slot's format ``j - RESIDUAL_REACH`` places from the
  prior's (clamped to the slot's list). The action 0.5 reproduces the prior, so a policy learns corrections to a
  baseline every model has for free, and what it learned on one model is a correction on the next, not a whole
  allocation to reinvent. The observation gains the prior format's bits per weight (``prior_bpw``).

With the budget wall on, the index is clamped down so that every later slot still fits at its cheapest format; the
wall uses the exact padded file bytes (:meth:`ramp.allocation.Slot.file_bytes`), so a walled episode is never
over budget. Intermediate rewards are 0; the last step returns the terminal reward of :mod:`ramp.sac.reward` (the one
measured signal; shaping by guessed per-layer costs would bias the policy toward the guess).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ramp.allocation import Allocation, AllocationError, Slot, min_matrix_bytes
from ramp.errors import RampError
from ramp.formats import QUANT_CHOICES, get_format
from ramp.sac.config import ACTION_MAPS
from ramp.sac.reward import QualityFn, RewardConfig, RewardModel, RewardOutcome

BUDGET_STATE = ("remaining_budget_fraction", "slots_left_fraction", "previous_bpw")
PRIOR_STATE = ("prior_bpw",)  # the residual map's extra observation
RESIDUAL_REACH = 2  # format steps a residual action may move away from the prior, each way
# the bpw levels of the quantization choices (2.625 ... 8.5, 16): the "level" action map's axis
BPW_LEVELS: tuple[float, ...] = tuple(sorted({get_format(f).bpw for f in QUANT_CHOICES}))


class EnvError(RampError, ValueError):
    """Inputs the environment cannot use (feature shape, NaN features, budget)."""


@dataclass(frozen=True)
class EnvConfig:
    """wall: clamp actions so the rest still fits at the cheapest formats (SPEC §6); off only for the ablation.
    bpw_norm: the previous action's bits per weight is divided by this in the observation (16 = F16).
    action_map: how an action picks a format, "index" or "level" (module docstring)."""

    wall: bool = True
    bpw_norm: float = 16.0
    action_map: str = "index"


@dataclass(frozen=True)
class ActionMap:
    """How an action in [0, 1] picks one slot's format: format k owns ``[edges[k], edges[k + 1])``, the last one
    up to 1 inclusive. The index map keeps its exact ``floor(a * K)`` arithmetic."""

    edges: np.ndarray
    is_index: bool
    centres: np.ndarray | None = None  # where each format's demonstrations go, when not its interval's middle

    def format_index(self, action: float) -> int:
        a = float(np.clip(action, 0.0, 1.0))
        n = len(self.edges)
        if self.is_index:
            return min(int(a * n), n - 1)
        return int(np.searchsorted(self.edges, a, side="right")) - 1

    def centre(self, k: int) -> float:
        """The middle of format ``k``'s interval, or ``centres[k]`` when the map has them (the residual map: a
        format out of its reach owns no interval and takes the nearest reachable part)."""
        n = len(self.edges)
        if self.is_index:
            return (k + 0.5) / n
        if self.centres is not None:
            return float(self.centres[k])
        hi = self.edges[k + 1] if k + 1 < n else 1.0
        return 0.5 * (float(self.edges[k]) + float(hi))

    def width(self, k: int) -> float:
        """The length of format ``k``'s interval (0 for one a residual map cannot reach)."""
        n = len(self.edges)
        if self.is_index:
            return 1.0 / n
        hi = min(float(self.edges[k + 1]), 1.0) if k + 1 < n else 1.0
        return max(hi - min(float(self.edges[k]), 1.0), 0.0)

    def tanh_start(self, k: int) -> float:
        """Where format ``k`` starts on the squashed scale tanh(u) = 2 a - 1."""
        return 2 * k / len(self.edges) - 1 if self.is_index else 2 * float(self.edges[k]) - 1


def state_names(action_map: str) -> tuple[str, ...]:
    """The observation's inputs after the features under ``action_map``."""
    return BUDGET_STATE + (PRIOR_STATE if action_map == "residual" else ())


def action_map(formats: Sequence[str], kind: str = "index", prior: int | None = None) -> ActionMap:
    """The :class:`ActionMap` of a slot's ``formats`` (ordered by bpw) under ``kind`` (module docstring);
    ``prior`` (an index into ``formats``) is the residual map's centre and required by it."""
    n = len(formats)
    if kind == "index":
        return ActionMap(np.arange(n) / n, True)
    if kind == "residual":
        if prior is None or not 0 <= prior < n:
            raise EnvError(f"the residual action map needs a prior format index in [0, {n}); got {prior!r}")
        parts = 2 * RESIDUAL_REACH + 1
        owner = [min(max(prior + j - RESIDUAL_REACH, 0), n - 1) for j in range(parts)]  # monotone in j
        # format k starts at its first part; one no part reaches starts where the next reached one does (left of
        # the prior) or past 1 (right of it), so it owns an empty interval
        first = {k: owner.index(k) / parts for k in set(owner)}
        edges = [first.get(k, first[owner[0]] if k < owner[0] else 2.0) for k in range(n)]
        # a format's demonstrations sit in its part nearest the prior's (the prior's own: 0.5)
        step = [min(max(k - prior, -RESIDUAL_REACH), RESIDUAL_REACH) + RESIDUAL_REACH for k in range(n)]
        parts_of = [[j for j in range(parts) if owner[j] == k] for k in range(n)]
        centres = [
            (min(p, key=lambda j, t=t: abs(j - t)) if p else t) + 0.5 for p, t in zip(parts_of, step, strict=True)
        ]
        return ActionMap(np.asarray(edges), False, np.asarray(centres) / parts)
    if kind != "level":
        raise EnvError(f"action_map {kind!r} is not one of {list(ACTION_MAPS)}")
    bpw = [get_format(f).bpw for f in formats]
    if bpw != sorted(bpw):
        raise EnvError(f"formats {list(formats)} are not ordered by bits per weight")
    levels = sorted(set(bpw))
    axis = sorted(set(BPW_LEVELS) | set(levels))  # a format outside the choices adds its own level
    owner = [min(levels, key=lambda v, g=g: (abs(v - g), v)) for g in axis]  # monotone in g
    g = len(axis)
    edges: list[float] = []
    for v in levels:
        parts = [j for j, o in enumerate(owner) if o == v]  # never empty: v is on the axis
        lo, hi = parts[0] / g, (parts[-1] + 1) / g
        tied = bpw.count(v)
        edges += [lo + (hi - lo) * t / tied for t in range(tied)]
    return ActionMap(np.asarray(edges), False)


def check_features(features: np.ndarray, n_slots: int, feature_names: Sequence[str]) -> np.ndarray:
    """``features`` as float32[n_slots, n_features]; raises naming the bad shape or the first NaN/inf cell."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape != (n_slots, len(feature_names)):
        raise EnvError(
            f"features have shape {list(x.shape)}; expected [{n_slots} slots, {len(feature_names)} features]"
        )
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        i, j = bad[0]
        raise EnvError(f"feature {feature_names[j]!r} of slot {i} is {x[i, j]} ({len(bad)} non-finite values)")
    return x


class AllocationEnv:
    """Walk ``slots`` (model order) under ``budget_matrix_bytes`` of matrix file bytes (the caller subtracts the fixed
    file overhead). ``features`` are the slots' standardised features, float32[n_slots, n_features].
    ``quality_fn(allocation) -> degradation`` may be None for inference-only walks (see :func:`ramp.allocate`)."""

    def __init__(
        self,
        slots: Sequence[Slot],
        features: np.ndarray,
        budget_matrix_bytes: int,
        quality_fn: QualityFn | None = None,
        reward: RewardConfig | None = None,
        config: EnvConfig | None = None,
        feature_names: Sequence[str] | None = None,
        prior: Sequence[int] | None = None,
    ) -> None:
        self.slots = list(slots)
        if not self.slots:
            raise EnvError("no slots to allocate")
        n_feat = np.asarray(features).shape[-1] if np.asarray(features).ndim == 2 else 0
        self.feature_names = (
            tuple(feature_names) if feature_names is not None else tuple(f"x{i}" for i in range(n_feat))
        )
        self.features = check_features(features, len(self.slots), self.feature_names)
        self.budget_matrix_bytes = int(budget_matrix_bytes)
        self.config = config = config or EnvConfig()
        self.reward_config = reward = reward or RewardConfig()
        self.rewards = RewardModel(quality_fn, reward)
        # bytes[i][k]: padded file bytes of slots[i] in its k-th format.
        self.bytes = [np.array([s.file_bytes(f) for f in s.formats], dtype=np.int64) for s in self.slots]
        self.bpw = [np.array([get_format(f).bpw for f in s.formats]) for s in self.slots]
        if config.action_map == "residual":
            if prior is None or len(prior) != len(self.slots):
                raise EnvError(
                    f"the residual action map needs one prior format index per slot ({len(self.slots)}); got "
                    f"{None if prior is None else len(prior)}"
                )
            self.prior: list[int] | None = [int(k) for k in prior]
        else:
            self.prior = None
        priors = self.prior or [None] * len(self.slots)
        self.action_maps = [
            action_map(s.formats, config.action_map, k) for s, k in zip(self.slots, priors, strict=True)
        ]
        cheapest = np.array([b[0] for b in self.bytes], dtype=np.int64)
        # min_rest[i] = bytes of slots i.. at their cheapest formats (min_rest[n] = 0).
        self.min_rest = np.concatenate([np.cumsum(cheapest[::-1])[::-1], [0]])
        minimum = min_matrix_bytes(self.slots)
        if self.budget_matrix_bytes <= 0 or (config.wall and self.budget_matrix_bytes < minimum):
            raise AllocationError(
                f"budget {self.budget_matrix_bytes:,d} B is below the smallest legal allocation {minimum:,d} B "
                f"({len(self.slots)} matrices at their cheapest formats)"
            )
        self.obs_dim = len(self.feature_names) + len(state_names(config.action_map))
        self.reset()

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def fingerprint(self) -> str:
        """Hash of what defines the task (slots, formats, features, budget): a checkpoint must match it."""
        h = hashlib.sha256()
        for i, s in enumerate(self.slots):
            prior = "" if self.prior is None else f"|{self.prior[i]}"
            h.update(f"{s.gguf_name}|{s.shape}|{','.join(s.formats)}{prior};".encode())
        h.update(self.features.tobytes())
        h.update(f"{self.budget_matrix_bytes}|{self.feature_names}".encode())
        return h.hexdigest()

    def reset(self) -> np.ndarray:
        self.t = 0
        self.used = 0
        self.prev_bpw = 0.0
        self.choice: list[int] = []
        return self.observation()

    def observation(self) -> np.ndarray:
        feats = self.features[self.t] if self.t < self.n_slots else np.zeros(len(self.feature_names), np.float32)
        state = [
            (self.budget_matrix_bytes - self.used) / self.budget_matrix_bytes,
            (self.n_slots - self.t) / self.n_slots,
            self.prev_bpw / self.config.bpw_norm,
        ]
        if self.prior is not None:
            state.append(
                float(self.bpw[self.t][self.prior[self.t]]) / self.config.bpw_norm if self.t < self.n_slots else 0.0
            )
        return np.concatenate([feats, np.asarray(state, dtype=np.float32)])

    def max_affordable(self) -> int:
        """Largest format index of the current slot that leaves room for every later slot at its cheapest."""
        room = self.budget_matrix_bytes - self.used - self.min_rest[self.t + 1]
        return max(0, int(np.searchsorted(self.bytes[self.t], room, side="right")) - 1)

    def budget_level(self) -> float:
        """The action in [0, 1] that, applied to every slot (no wall), spends the most bytes within the budget:
        the middle of the highest range of constant actions whose walk fits (0 when none fits). Under the residual
        map the prior fits by construction, so its action (0.5) is the level."""
        if self.prior is not None:
            return 0.5
        edges = sorted({float(e) for m in self.action_maps for e in m.edges} | {1.0})
        mids = [0.5 * (lo + hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        pairs = list(zip(self.bytes, self.action_maps, strict=True))
        fits = [a for a in mids if sum(int(b[m.format_index(a)]) for b, m in pairs) <= self.budget_matrix_bytes]
        return max(fits, default=0.0)

    def step(self, action: float) -> tuple[np.ndarray, float, bool, dict]:
        """Apply ``action`` in [0, 1] to the current slot: (next observation, reward, done, info)."""
        if self.t >= self.n_slots:
            raise EnvError("episode is over; call reset()")
        k = self.action_maps[self.t].format_index(action)
        wanted = k
        if self.config.wall:
            k = min(k, self.max_affordable())
        self.choice.append(k)
        self.used += int(self.bytes[self.t][k])
        self.prev_bpw = float(self.bpw[self.t][k])
        self.t += 1
        info: dict = {"format": self.slots[self.t - 1].formats[k], "clamped": k != wanted}
        done = self.t == self.n_slots
        reward = 0.0
        if done:
            info["allocation"] = self.allocation()
            info["used_bytes"] = self.used
            if self.rewards.quality_fn is not None:
                outcome = self.rewards(info["allocation"], self.used, self.budget_matrix_bytes)
                info["outcome"] = outcome
                reward = outcome.reward
        return self.observation(), reward, done, info

    def allocation(self) -> Allocation:
        return {s.gguf_name: s.formats[k] for s, k in zip(self.slots, self.choice, strict=False)}

    def score(self, allocation: Allocation, used_bytes: int) -> RewardOutcome:
        return self.rewards(allocation, used_bytes, self.budget_matrix_bytes)


@dataclass(frozen=True)
class SyntheticTask:
    """A separable allocation problem with known per-slot sensitivities, for tests and ablations.

    degradation(allocation) = sum_i c_i * 2^(-bpw_i) / sum_i params_i, with c_i = params_i * exp(spread * z_i);
    ``z_i`` is feature 0 and log relative size is feature 1, so a policy can read the sensitivity off the features.
    The rest of the 11 features are seeded noise. :meth:`optimum` solves the knapsack exactly.
    """

    slots: tuple[Slot, ...]
    features: np.ndarray
    sensitivity: np.ndarray

    @classmethod
    def make(
        cls,
        n_slots: int = 12,
        seed: int = 0,
        spread: float = 2.0,
        shapes: Sequence[tuple[int, int]] = ((256, 256), (512, 256)),
        formats: Sequence[str] = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"),
        n_features: int = 11,
    ) -> SyntheticTask:
        rng = np.random.default_rng(seed)
        slots, params = [], []
        for i in range(n_slots):
            shape = tuple(shapes[i % len(shapes)])
            fmts = tuple(sorted(formats, key=lambda f: (get_format(f).bpw, f)))
            slots.append(Slot(f"blk.{i}.synthetic.weight", i, "synthetic", shape, fmts))
            params.append(shape[0] * shape[1])
        params_arr = np.asarray(params, dtype=np.float64)
        z = rng.standard_normal(n_slots)
        feats = rng.standard_normal((n_slots, n_features)).astype(np.float32)
        feats[:, 0] = z
        size = np.log(params_arr / params_arr.max())
        feats[:, 1] = (size - size.mean()) / (size.std() + 1e-12)
        return cls(tuple(slots), feats, params_arr * np.exp(spread * z))

    def degradation(self, allocation: Allocation) -> float:
        bits = np.array([get_format(allocation[s.gguf_name]).bpw for s in self.slots])
        return float(np.sum(self.sensitivity * np.exp2(-bits)) / sum(s.params for s in self.slots))

    def optimum(self, budget_matrix_bytes: int) -> tuple[float, Allocation]:
        """The exact minimum degradation within ``budget_matrix_bytes`` (dynamic programming over byte units)."""
        costs = [np.array([s.file_bytes(f) for f in s.formats], dtype=np.int64) for s in self.slots]
        unit = int(np.gcd.reduce(np.concatenate(costs)))
        cap = budget_matrix_bytes // unit
        dp = np.zeros(cap + 1)  # dp[b]: least degradation of the slots seen so far using <= b units
        picks = []
        for s, c in zip(self.slots, costs, strict=True):
            w = c // unit
            terms = self.sensitivity[s.block] * np.exp2(-np.array([get_format(f).bpw for f in s.formats]))
            cand = np.full((len(w), cap + 1), np.inf)
            for k, (wk, tk) in enumerate(zip(w, terms, strict=True)):
                cand[k, wk:] = dp[: cap + 1 - wk] + tk
            picks.append(cand.argmin(0))
            dp = cand.min(0)
        if not np.isfinite(dp[cap]):
            raise AllocationError(f"budget {budget_matrix_bytes:,d} B is below the smallest legal allocation")
        alloc, b = {}, cap
        for s, c, pick in zip(reversed(self.slots), reversed(costs), reversed(picks), strict=True):
            k = int(pick[b])
            alloc[s.gguf_name] = s.formats[k]
            b -= int(c[k] // unit)
        total = sum(s.params for s in self.slots)
        return float(dp[cap] / total), {s.gguf_name: alloc[s.gguf_name] for s in self.slots}
