"""The pipeline's parameters: one frozen dataclass per ``params.yaml`` section, and the typed loader.

Every front door reads these: the DVC stage scripts (each its own section), the ``ramp`` CLI (the same
defaults), the Prefect flows and the benchmarks (a benchmark is a params overlay: :func:`load_pipeline`
with ``overlay``). An unknown key, a missing key or a value of the wrong type is a :class:`ParamsError`
naming the section and the key.

Budgets say their unit in their name: ``budget_file_bytes`` is the size of the whole exported GGUF file,
``budget_bpw`` bits per weight of the quantizable matrices (:mod:`ramp.budget`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ramp.errors import RampError
from ramp.sac.config import ACTION_MAPS, RewardConfig, SACConfig

PARAMS_FILE = Path("params.yaml")
T = TypeVar("T")


class ParamsError(RampError, ValueError):
    """params.yaml does not match what a stage expects (the message names the section and key)."""


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no params file (expected params.yaml in the repository root)")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (int accepted for float; nested dataclasses built)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ParamsError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ParamsError(f"{where}: unsupported parameter type {_type_name(tp)}")


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping of keys for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"{where}: unknown key {unknown[0]!r} in params.yaml section {where.split('.')[0]!r} "
            f"(known keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if has_default:
                continue
            raise ParamsError(f"{where}: missing key {name!r} in params.yaml section {where.split('.')[0]!r}")
        kwargs[name] = _convert(data[name], hints[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ParamsError(f"{where}: {e}") from e


def load_params(section: str, cls: type[T], path: str | Path = PARAMS_FILE) -> T:
    """Section ``section`` of ``params.yaml`` as an instance of the dataclass ``cls`` (nothing else is read)."""
    params = read_params(path)
    if section not in params:
        raise ParamsError(f"{path}: no section {section!r} (sections: {', '.join(sorted(params))})")
    return _build(cls, params[section], section)


def load_value(key: str, tp: type[T], path: str | Path = PARAMS_FILE) -> T:
    """A top-level scalar of ``params.yaml`` (``seed``), type-checked."""
    params = read_params(path)
    if key not in params:
        raise ParamsError(f"{path}: missing top-level key {key!r}")
    return _convert(params[key], tp, key)


def as_dict(params: Any) -> dict[str, Any]:
    """A params dataclass as plain JSON-able data (for metrics and tracking)."""
    return json.loads(json.dumps(dataclasses.asdict(params), default=list))


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` laid over it, mappings merged key by key (a copy; neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------------- sections

# the GGUF types every allocator may choose from (each matrix: those legal for its shape, minus the ones
# another legal type beats at equal or fewer bytes on the measured cost, :func:`ramp.knapsack.pareto_slots`)
DEFAULT_FORMATS = ("Q2_K", "Q3_K", "Q4_0", "IQ4_NL", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")
ASSET_MODELS = ("smollm2", "gemma3")


@dataclass(frozen=True)
class TinyModelParams:
    """Dimensions of the in-code tiny Llama (multiples of 256 so every GGUF format is legal)."""

    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512


@dataclass(frozen=True)
class ModelParams:
    """``source``: an asset name (smollm2, gemma3), ``testbed``, ``tiny`` (built in code), or a GGUF file / HF
    directory."""

    source: str
    tiny: TinyModelParams = TinyModelParams()


@dataclass(frozen=True)
class CalibrateParams:
    """Calibration text and size: ``n_tokens`` tokens in windows of ``n_ctx`` tokens, after ``offset_seqs``
    windows are skipped (the retrain flow moves the offset to get fresh calibration data)."""

    text: str  # asset name of the text (wiki uses the calibration part of the document split)
    n_tokens: int
    n_ctx: int
    offset_seqs: int
    batch_size: int

    def __post_init__(self) -> None:
        if self.n_tokens < self.n_ctx or self.n_ctx < 8:
            raise ValueError(f"n_tokens={self.n_tokens} must be >= n_ctx={self.n_ctx} >= 8")
        if self.offset_seqs < 0:
            raise ValueError(f"offset_seqs={self.offset_seqs} must be >= 0")


@dataclass(frozen=True)
class EmbedParams:
    """No knobs yet: the 11 features are fixed by SPEC §4 (feature 8 always uses the calibration imatrix)."""


@dataclass(frozen=True)
class FoldParams:
    """``alpha``: migration strength a of s_j = max|X_j|^a / max|W_:,j|^(1-a); ``enabled: false`` copies the
    model. ``formats``: the GGUF types offered to every allocator; the stage measures each matrix in each of them
    (imatrix-weighted error of the folded weights) and keeps per matrix the ones no other beats at equal bytes."""

    enabled: bool
    alpha: float
    max_logit_diff: float  # fail the stage if folding changes any logit by more than this
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
        from ramp.formats import get_format

        if not self.formats:
            raise ValueError("formats is empty; list the GGUF types allocators may choose from")
        for f in self.formats:
            get_format(f)  # an unknown name is an error naming it


@dataclass(frozen=True)
class SensitivityParams:
    """``windows`` calibration windows (of ``calibrate.n_ctx``) scored per measurement against an FP reference of
    ``top_k`` log-probs; ``probes`` formats measured per matrix (the cheapest first; the others priced by the
    matrix's measured KLD per unit of the fold stage's proxy error); ``gradient``: also the one-backward table."""

    windows: int
    probes: int
    top_k: int = 64
    gradient: bool = True

    def __post_init__(self) -> None:
        if self.windows < 1 or self.probes < 1 or self.top_k < 1:
            raise ValueError(f"windows={self.windows}, probes={self.probes} and top_k={self.top_k} must all be >= 1")


START_KINDS = ("greedy", "uniform", "sensitivity", "gradient")  # ramp.pipeline.sensitivity.starts


def _one_budget(where: str, file_bytes: int | None, bpw: float | None) -> None:
    from ramp.budget import Budget

    Budget(file_bytes=file_bytes, bpw=bpw, where=where)  # exactly one, in range


@dataclass(frozen=True)
class TrainParams:
    """The policy's own budget (``budget_bpw`` or ``budget_file_bytes``, independent of allocate's, so a budget
    change never retrains); ``reward_windows`` calibration windows scored per reward (a short slice, SPEC §6);
    ``top_k`` of the FP reference; ``demos`` measured first and cloned (greedy, uniform)."""

    reward_windows: int
    top_k: int
    budget_bpw: float | None = None
    budget_file_bytes: int | None = None
    demos: tuple[str, ...] = ("greedy", "uniform")
    action_map: str = "index"  # how an action picks a format: index | level (ramp.sac.env)
    sac: SACConfig = field(default_factory=SACConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        _one_budget("train", self.budget_file_bytes, self.budget_bpw)
        if self.reward_windows < 1 or self.top_k < 1:
            raise ValueError(f"reward_windows={self.reward_windows} and top_k={self.top_k} must be >= 1")
        bad = [d for d in self.demos if d not in START_KINDS]
        if bad:
            raise ValueError(f"train.demos has {bad}; expected a list of {list(START_KINDS)}")
        if self.action_map not in ACTION_MAPS:
            raise ValueError(f"train.action_map is {self.action_map!r}; expected one of {list(ACTION_MAPS)}")


@dataclass(frozen=True)
class AllocateParams:
    """Budget and fixed tensor types. ``policy``: ``file`` (this pipeline's train stage) or ``champion`` (the
    registry's ``models:/ramp-policy@champion``; DVC cannot see the registry, so rerun with ``dvc repro -f -s
    allocate`` after a promotion)."""

    policy: Literal["file", "champion"]
    embedding_type: str  # GGUF type of token_embd (and an untied output)
    norm_type: str
    budget_file_bytes: int | None = None  # the whole GGUF file, bytes
    budget_bpw: float | None = None  # bits per weight of the quantizable matrices (their data bytes)

    def __post_init__(self) -> None:
        _one_budget("allocate", self.budget_file_bytes, self.budget_bpw)


@dataclass(frozen=True)
class QuantizeParams:
    """``imatrix``: weigh the quantizers' error by the (folded) calibration imatrix, as llama-quantize does."""

    imatrix: bool


@dataclass(frozen=True)
class EvaluateParams:
    """Held-out windows (``n_chunks`` x ``n_ctx`` tokens), the FP reference's ``top_k``; baselines: the knapsacks
    of ``knapsack`` (greedy, uniform-fill) at RAMP's matrix budget, every format of ``uniform`` legal for all
    matrices, llama.cpp's ``presets`` (their per-tensor rules, ramp.presets) and the evolutionary search (from the
    best knapsack start, ``evolution_*``); commonsense subsets
    (``commonsense_n`` questions per task, 0 = skip)."""

    n_ctx: int
    n_chunks: int
    top_k: int
    batch_size: int
    uniform: list[str]
    commonsense_tasks: list[str]
    commonsense_n: int
    knapsack: tuple[str, ...] = ("greedy", "uniform")
    presets: tuple[str, ...] = ()
    # the evolutionary search baseline (ramp.evolution): full-window KLD evaluations to spend (0 = none) on the first
    # ``evolution_windows`` calibration windows, children screened on the first ``evolution_screen_windows``
    evolution_evaluations: float = 0.0
    evolution_windows: int = 2
    evolution_screen_windows: int = 1

    def __post_init__(self) -> None:
        if self.n_ctx < 8 or self.n_chunks < 1 or self.top_k < 1 or self.batch_size < 1:
            raise ValueError(
                f"n_ctx={self.n_ctx} must be >= 8 and n_chunks={self.n_chunks}, top_k={self.top_k}, "
                f"batch_size={self.batch_size} >= 1"
            )
        bad = [k for k in self.knapsack if k not in START_KINDS]
        if bad:
            raise ValueError(f"evaluate.knapsack has {bad}; expected a list of {list(START_KINDS)}")
        if self.evolution_evaluations < 0 or not 1 <= self.evolution_screen_windows <= self.evolution_windows:
            raise ValueError(
                f"evolution_evaluations={self.evolution_evaluations} must be >= 0 and 1 <= evolution_screen_windows="
                f"{self.evolution_screen_windows} <= evolution_windows={self.evolution_windows}"
            )
        from ramp.presets import LLAMA_PRESETS

        bad = [p for p in self.presets if p not in LLAMA_PRESETS]
        if bad:
            raise ValueError(f"evaluate.presets has {bad}; expected llama.cpp presets of {list(LLAMA_PRESETS)}")


@dataclass(frozen=True)
class ExportParams:
    """``llama_check``: score the file with llama.cpp's llama-perplexity on ``llama_chunks`` windows of
    ``llama_n_ctx`` tokens of the held-out text (needs the built tools; the tiny profile turns it off)."""

    llama_check: bool
    llama_chunks: int
    llama_n_ctx: int


SECTIONS: dict[str, type] = {
    "model": ModelParams,
    "calibrate": CalibrateParams,
    "embed": EmbedParams,
    "fold": FoldParams,
    "sensitivity": SensitivityParams,
    "train": TrainParams,
    "allocate": AllocateParams,
    "quantize": QuantizeParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
}
# the params.yaml sections each DVC stage reads (dvc.yaml ``params:`` lists exactly these)
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "calibrate": ("seed", "model", "calibrate"),
    "embed": ("embed",),
    "fold": ("fold",),
    "sensitivity": ("sensitivity",),
    "train": ("seed", "train"),
    "allocate": ("allocate",),
    "quantize": ("quantize",),
    "evaluate": ("evaluate",),
    "export": ("export",),
}


@dataclass(frozen=True)
class PipelineParams:
    """Every section of ``params.yaml`` the stages read, typed."""

    seed: int
    model: ModelParams
    calibrate: CalibrateParams
    embed: EmbedParams
    fold: FoldParams
    sensitivity: SensitivityParams
    train: TrainParams
    allocate: AllocateParams
    quantize: QuantizeParams
    evaluate: EvaluateParams
    export: ExportParams

    def section(self, name: str) -> Any:
        return getattr(self, name)


def pipeline_from_dict(data: dict[str, Any], where: str = "params") -> PipelineParams:
    """:class:`PipelineParams` from a parsed params mapping (other top-level sections, e.g. retrain, ignored)."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    missing = [s for s in ("seed", *SECTIONS) if s not in data]
    if missing:
        raise ParamsError(f"{where}: no section {missing[0]!r} (sections: {', '.join(sorted(data))})")
    kwargs: dict[str, Any] = {"seed": _convert(data["seed"], int, "seed")}
    for name, cls in SECTIONS.items():
        kwargs[name] = _build(cls, data[name], name)
    return PipelineParams(**kwargs)


def load_pipeline(path: str | Path = PARAMS_FILE, overlay: dict[str, Any] | None = None) -> PipelineParams:
    """All stage sections of ``path``, with ``overlay`` (nested mappings, e.g. a benchmark's) laid over them."""
    data = read_params(path)
    return pipeline_from_dict(merge(data, overlay or {}), str(path))
