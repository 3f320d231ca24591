"""The pipeline's parameters: one frozen dataclass per ``params.yaml`` section, and the typed loader.

Every front door reads these: the DVC stage scripts (each its own section), the ``ramp`` CLI (the same
defaults), the Prefect flows and the benchmarks (a benchmark is a params overlay: :func:`load_pipeline`
with ``overlay``). An unknown key, a missing key, a value of the wrong type or out of range is one :class:`ParamsError`
naming the file, the key path and the value (``params.yaml: evaluate.n_chunks = 0: must be >= 1``). Integers are
real integers (not ``1024.0``, not ``true``) that fit in 64 bits; floats are finite; the ranges sit beside the
fields (:func:`bounded`).

Budgets say their unit in their name: ``budget_file_bytes`` is the size of the whole exported GGUF file,
``budget_bpw`` bits per weight of the quantizable matrices (:mod:`ramp.budget`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
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
INT64_MAX = 2**63 - 1  # every integer parameter (bytes, seeds, counts) must fit in a signed 64-bit integer


class ParamsError(RampError, ValueError):
    """params.yaml does not match what a stage expects (the message names the file, the key and the value)."""


class BadValue(ValueError):
    """A field of a params dataclass out of its range; :func:`_build` names the section in front of ``key``."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key} = {value!r}: {expected}")


def bounded(lo: float | None = None, hi: float | None = None, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose value must lie in ``[lo, hi]`` (checked by :func:`check_bounds`)."""
    return field(default=default, metadata={"bounds": (lo, hi)})


def check_bounds(params: Any) -> None:
    """Raise :class:`BadValue` for the first field of ``params`` outside its :func:`bounded` range."""
    for f in dataclasses.fields(params):
        lo, hi = f.metadata.get("bounds", (None, None))
        value = getattr(params, f.name)
        if value is None:
            continue
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise BadValue(f.name, value, f"must be in [{lo}, {hi}]")
        if lo is not None and not value >= lo:
            raise BadValue(f.name, value, f"must be >= {lo}")
        if hi is not None and not value <= hi:
            raise BadValue(f.name, value, f"must be <= {hi}")


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no params file"
        raise ParamsError(f"{path}: {what} (expected params.yaml in the repository root)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ParamsError(f"{path}: not valid YAML{where} ({problem})") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _in_file(path: str | Path, e: ParamsError) -> ParamsError:
    """``e`` with the params file named in front (the key path alone does not say which file)."""
    return ParamsError(f"{path}: {e}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


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
                errors.append(e)
        if len(errors) == 1:  # ``int | None``: the int's own message says what is wrong
            raise errors[0]
        raise ParamsError(f"{where} = {value!r}: expected {_type_name(tp)}")
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
        if not (abs(value) <= INT64_MAX if isinstance(value, int) else math.isfinite(value)):
            raise ParamsError(f"{where} = {value!r}: expected a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        if abs(value) > INT64_MAX:
            raise ParamsError(f"{where} = {value!r}: does not fit in a 64-bit integer (at most {INT64_MAX})")
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
    except BadValue as e:
        raise ParamsError(f"{where}.{e}") from e
    except (ValueError, TypeError) as e:  # a library config's own check (SACConfig, Budget: may name ``where``)
        message = str(e)
        raise ParamsError(message if message.startswith(f"{where}:") else f"{where}: {message}") from e


def load_params(section: str, cls: type[T], path: str | Path = PARAMS_FILE) -> T:
    """Section ``section`` of ``params.yaml`` as an instance of the dataclass ``cls`` (nothing else is read)."""
    params = read_params(path)
    if section not in params:
        raise ParamsError(f"{path}: no section {section!r} (sections: {', '.join(sorted(params))})")
    try:
        return _build(cls, params[section], section)
    except ParamsError as e:
        raise _in_file(path, e) from e


def load_value(key: str, tp: type[T], path: str | Path = PARAMS_FILE) -> T:
    """A top-level scalar of ``params.yaml`` (``seed``), type-checked."""
    params = read_params(path)
    if key not in params:
        raise ParamsError(f"{path}: missing top-level key {key!r}")
    try:
        value = _convert(params[key], tp, key)
        if key == "seed":
            _check_seed(value)
        return value
    except ParamsError as e:
        raise _in_file(path, e) from e


def _check_seed(seed: int) -> None:
    if seed < 0:  # numpy's generators take no negative seed
        raise ParamsError(f"seed = {seed}: must be >= 0")


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
MODEL_NAMES = (*ASSET_MODELS, "testbed", "tiny")  # model.source values that are not paths
NORM_TYPES = ("F32", "F16")  # 1-D norm weights are stored unquantized
# allocate.embedding_type "auto": the type llama-quantize gives output.weight (and a tied token_embd) in its K-quant
# presets (ramp.presets.resolve_embedding_type)
EMBEDDING_AUTO = "auto"
# allocate.embedding_type "measured": the type whose measured KLD plus the measured knapsack's on the bytes it leaves
# to the matrices is lowest (ramp.sensitivity.embedding_choice; needs sensitivity.embedding_formats)
EMBEDDING_MEASURED = "measured"
# allocate.embedding_type "predicted": as measured, with no evaluation on the model: the embedding's proxy error and
# the matrices' proxy table priced by the policy's learned cost gains (ramp.pipeline.allocate.resolve_embedding)
EMBEDDING_PREDICTED = "predicted"
TINY_MAX_PARAMS = 2**28  # the tiny model is built in memory in fp32: at most 1 GiB of weights


def _format_names(key: str, names: Any, allowed: tuple[str, ...] | None = None) -> None:
    """Every entry of ``names`` (a list, or one string) a GGUF type of the registry, or of ``allowed`` when given."""
    from ramp.formats import FORMATS

    known = allowed if allowed is not None else tuple(FORMATS)
    items = [names] if isinstance(names, str) else list(names)
    for name in items:
        if name not in known:
            value = names if isinstance(names, str) else items
            raise BadValue(key, value, f"unknown format {name!r}; expected GGUF types of {list(known)}")


@dataclass(frozen=True)
class TinyModelParams:
    """Dimensions of the in-code tiny Llama: multiples of 256 so every GGUF format is legal; ``heads`` divides
    ``hidden`` into an even head size (RoPE) and is a multiple of ``kv_heads``; small enough to build in memory."""

    hidden: int = bounded(256, 8192, default=256)
    intermediate: int = bounded(256, 32768, default=512)
    layers: int = bounded(1, 64, default=2)
    heads: int = bounded(1, 128, default=4)
    kv_heads: int = bounded(1, 128, default=2)
    vocab: int = bounded(512, 65536, default=512)  # 512: the byte alphabet + special tokens of its BPE fit

    def __post_init__(self) -> None:
        check_bounds(self)
        for name in ("hidden", "intermediate", "vocab"):
            if getattr(self, name) % 256:
                raise BadValue(name, getattr(self, name), "must be a multiple of 256 (so every GGUF format is legal)")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise BadValue("heads", self.heads, f"must divide hidden={self.hidden} into an even head size")
        if self.heads % self.kv_heads:
            raise BadValue("kv_heads", self.kv_heads, f"must divide heads={self.heads}")
        kv = self.hidden // self.heads * self.kv_heads
        per_layer = self.hidden * (2 * self.hidden + 2 * kv) + 3 * self.hidden * self.intermediate
        n = 2 * self.vocab * self.hidden + self.layers * per_layer
        if n > TINY_MAX_PARAMS:
            raise BadValue(
                "hidden", self.hidden, f"the tiny model would have {n:,d} parameters, at most {TINY_MAX_PARAMS:,d}"
            )


@dataclass(frozen=True)
class ModelParams:
    """``source``: an asset name (smollm2, gemma3), ``testbed``, ``tiny`` (built in code), or a GGUF file / HF
    directory."""

    source: str
    tiny: TinyModelParams = TinyModelParams()

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise BadValue("source", self.source, f"expected one of {', '.join(MODEL_NAMES)} or a model path")


@dataclass(frozen=True)
class CalibrateParams:
    """Calibration text and size: ``n_tokens`` tokens in windows of ``n_ctx`` tokens, after ``offset_seqs``
    windows are skipped (the retrain flow moves the offset to get fresh calibration data)."""

    text: str  # asset name of the text (wiki uses the calibration part of the document split)
    n_tokens: int = bounded(8)
    n_ctx: int = bounded(8)
    offset_seqs: int = bounded(0)
    batch_size: int = bounded(1)
    # a llama.cpp imatrix file (GGUF or legacy .dat) used instead of the one measured on ``text``: every allocator,
    # the embedding and the quantizers weigh errors by it (``ramp quantize --imatrix``); null: measure it here
    imatrix: str | None = None

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise BadValue("text", self.text, "expected the asset name of a text (wiki, c4, tiny_stories)")
        if self.imatrix is not None and not self.imatrix.strip():
            raise BadValue("imatrix", self.imatrix, "expected the path of a llama.cpp imatrix file, or null")
        check_bounds(self)
        if self.n_tokens < self.n_ctx:
            raise BadValue("n_tokens", self.n_tokens, f"must be >= n_ctx={self.n_ctx} (one window)")


@dataclass(frozen=True)
class EmbedParams:
    """No knobs yet: the 11 features are fixed by SPEC §4 (feature 8 always uses the calibration imatrix)."""


@dataclass(frozen=True)
class FoldParams:
    """``alpha``: migration strength a of s_j = max|X_j|^a / max|W_:,j|^(1-a); ``enabled: false`` copies the
    model. ``formats``: the GGUF types offered to every allocator; the stage measures each matrix in each of them
    (imatrix-weighted error of the folded weights) and keeps per matrix the ones no other beats at equal bytes."""

    enabled: bool
    alpha: float = bounded(0.0, 1.0)
    max_logit_diff: float = bounded(0.0)  # fail the stage if folding changes any logit by more than this
    formats: tuple[str, ...] = DEFAULT_FORMATS
    # calibration windows whose output gradients price every (matrix, format) in KLD without evaluating a quantized
    # model (ramp.fisher: the action space's fisher column, the fisher knapsack, train.cost_basis fisher); 0: none
    fisher_windows: int = bounded(0, default=0)

    def __post_init__(self) -> None:
        check_bounds(self)
        if not self.formats:
            raise BadValue("formats", list(self.formats), "is empty; list the GGUF types allocators may choose from")
        _format_names("formats", self.formats)

    @property
    def max_bpw(self) -> float:
        """Bits per weight of the largest format offered: a bpw budget above it buys nothing."""
        from ramp.formats import get_format

        return max(get_format(f).bpw for f in self.formats)


@dataclass(frozen=True)
class SensitivityParams:
    """``windows`` calibration windows (of ``calibrate.n_ctx``) scored per measurement against an FP reference of
    ``top_k`` log-probs; ``probes`` formats measured per matrix (the cheapest first; the others priced by the
    matrix's measured KLD per unit of the fold stage's proxy error); ``gradient``: also the one-backward table."""

    windows: int = bounded(1)
    probes: int = bounded(1)
    top_k: int = bounded(1, default=64)
    gradient: bool = True
    # formats of the token embedding (and an untied output) measured with everything else FP, for
    # allocate.embedding_type: measured (those not legal for the embedding's rows are not offered); empty: none
    embedding_formats: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bounds(self)
        _format_names("embedding_formats", self.embedding_formats)


START_KINDS = ("greedy", "uniform", "sensitivity", "gradient", "fisher")  # ramp.pipeline.sensitivity.starts
STANDARDIZE = ("model", "pooled")  # ramp.features.Standardizer modes of a trained policy
COST_GAINS = ("none", "role")  # train.cost_gain: ramp.sensitivity.role_gains
COST_BASES = ("proxy", "fisher")  # train.cost_basis: the fold stage's table a policy's prior prices


def _one_budget(where: str, file_bytes: int | None, bpw: float | None) -> None:
    from ramp.budget import Budget

    Budget(file_bytes=file_bytes, bpw=bpw, where=where)  # exactly one, in range


def _known(key: str, values: Any, known: tuple[str, ...]) -> None:
    """Every entry of ``values`` (a list, or one string) one of ``known``."""
    if isinstance(values, str):
        if values not in known:
            raise BadValue(key, values, f"expected one of {list(known)}")
        return
    bad = [v for v in values if v not in known]
    if bad:
        raise BadValue(key, list(values), f"{bad} unknown; expected a list of {list(known)}")


@dataclass(frozen=True)
class TrainParams:
    """The policy's own budget (``budget_bpw`` or ``budget_file_bytes``, independent of allocate's, so a budget
    change never retrains); ``reward_windows`` calibration windows scored per reward (a short slice, SPEC §6);
    ``top_k`` of the FP reference; ``demos`` measured first and cloned (greedy, uniform)."""

    reward_windows: int = bounded(1)
    top_k: int = bounded(1)
    budget_bpw: float | None = None
    budget_file_bytes: int | None = None
    demos: tuple[str, ...] = ("greedy", "uniform")
    action_map: str = "index"  # how an action picks a format: index | level | residual (ramp.sac.env)
    sac: SACConfig = field(default_factory=SACConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    # other models trained on together with (or, include_target false, instead of) the pipeline's own: model
    # sources as in ``model.source``, each prepared by calibrate -> embed -> fold (-> sensitivity) in a workspace of
    # its own under cache/sources/ (ramp.pipeline.train); a budget then has to be ``budget_bpw`` (per model)
    sources: tuple[str, ...] = ()
    # per source, sections laid over the pipeline's when it is prepared (calibrate, embed, fold, sensitivity) and
    # rewarded (reward: this section's), e.g. ``{testbed: {calibrate: {n_ctx: 256}, reward: {reference: 3e-4}}}``:
    # the testbed never saw positions past 256, and its KLD is two orders below a real model's
    source_overlays: dict[str, dict[str, Any]] = field(default_factory=dict)
    include_target: bool = True  # false: zero-shot, the pipeline's own model is never evaluated
    standardize: str = "model"  # model: features standardised per model (at allocate too) | pooled: one fit
    # pooled runs: train this many SAC seeds (sac.seed, +1, ...) on the same pool and average their actions (one
    # policy file, ramp.sac.agent.ensemble_policy); evaluations already measured are shared between the members
    ensemble: int = bounded(1, default=1)
    # after the last episode the rescore_top best allocations (on the reward windows) are measured on the next
    # rescore_windows calibration windows and the best of them there is the one the policy is distilled onto
    rescore_top: int = bounded(0, default=0)
    rescore_windows: int = bounded(1, default=8)
    # pooled runs: none | role: per layer type, the price of a unit of proxy error learned from the training models'
    # measured tables (ramp.sensitivity.role_gains), kept with the policy; the residual map's prior (training and
    # allocate) and allocate's proxy fill use the proxy priced by it. Needs each training model's sensitivity stage
    cost_gain: str = "none"
    # the fold stage's table that the residual prior and allocate's fill price (and cost_gain's gains are learned
    # on): proxy (imatrix-weighted relative error) | fisher (ramp.fisher, in KLD; needs fold.fisher_windows)
    cost_basis: str = "proxy"

    def __post_init__(self) -> None:
        _one_budget("train", self.budget_file_bytes, self.budget_bpw)
        check_bounds(self)
        _known("demos", self.demos, START_KINDS)
        _known("action_map", self.action_map, tuple(ACTION_MAPS))
        _known("standardize", self.standardize, STANDARDIZE)
        _known("cost_gain", self.cost_gain, COST_GAINS)
        _known("cost_basis", self.cost_basis, COST_BASES)
        if self.cost_gain != "none" and not self.sources:
            raise BadValue("cost_gain", self.cost_gain, "gains are learned from a pool's tables: set train.sources")
        blank = [s for s in self.sources if not str(s).strip()]
        if blank or len(set(self.sources)) != len(self.sources):
            raise BadValue("sources", list(self.sources), "expected distinct model sources (names or paths)")
        stray = sorted(set(self.source_overlays) - set(self.sources))
        if stray:
            raise BadValue("source_overlays", stray[0], f"not one of train.sources {list(self.sources)}")
        if not self.include_target and not self.sources:
            raise BadValue("include_target", False, "with no train.sources there is no model left to train on")
        if self.ensemble > 1 and not self.sources:
            raise BadValue("ensemble", self.ensemble, "an ensemble is for pooled runs (train.sources)")
        if self.sources and self.rescore_top:
            raise BadValue(
                "rescore_top", self.rescore_top, "rescoring is for a single model's run: 0 with train.sources"
            )
        if self.sources and self.budget_bpw is None:
            raise BadValue(
                "budget_file_bytes",
                self.budget_file_bytes,
                "a file size means nothing on another model: with train.sources give budget_bpw",
            )


@dataclass(frozen=True)
class AllocateParams:
    """Budget and fixed tensor types. ``policy``: ``file`` (this pipeline's train stage) or ``champion`` (the
    registry's ``models:/ramp-policy@champion``; DVC cannot see the registry, so rerun with ``dvc repro -f -s
    allocate`` after a promotion)."""

    policy: Literal["file", "champion"]
    # GGUF type of token_embd (and an untied output), auto (ramp.presets.resolve_embedding_type), measured or
    # predicted (ramp.pipeline.allocate.resolve_embedding)
    embedding_type: str
    norm_type: str
    budget_file_bytes: int | None = None  # the whole GGUF file, bytes
    budget_bpw: float | None = None  # bits per weight of the quantizable matrices (their data bytes)
    walk: Literal["wall", "fit", "prior", "auto"] = "wall"  # ramp.allocate's module docstring
    fill: Literal["margin", "proxy"] = "margin"  # bytes left after the walk: by action margin | fold's proxy greedy
    clip: float | None = None  # standardised features bounded to [-clip, clip] before the walk (None: not bounded)

    def __post_init__(self) -> None:
        _one_budget("allocate", self.budget_file_bytes, self.budget_bpw)
        if self.clip is not None and not self.clip > 0:
            raise BadValue("clip", self.clip, "must be a positive number of standard deviations")
        if self.clip is not None and self.walk == "prior":
            raise BadValue("clip", self.clip, "bounds the policy's features, which walk 'prior' does not read: null")
        from ramp.formats import FORMATS

        kinds = (EMBEDDING_AUTO, EMBEDDING_MEASURED, EMBEDDING_PREDICTED)
        _format_names("embedding_type", self.embedding_type, (*FORMATS, *kinds))
        _format_names("norm_type", self.norm_type, NORM_TYPES)


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

    n_ctx: int = bounded(8)
    n_chunks: int = bounded(1)
    top_k: int = bounded(1)
    batch_size: int = bounded(1)
    uniform: list[str]
    commonsense_tasks: list[str]
    commonsense_n: int = bounded(0)
    knapsack: tuple[str, ...] = ("greedy", "uniform")
    presets: tuple[str, ...] = ()
    # the evolutionary search baseline (ramp.evolution): full-window KLD evaluations to spend (0 = none) on the first
    # ``evolution_windows`` calibration windows, children screened on the first ``evolution_screen_windows``
    evolution_evaluations: float = bounded(0.0, default=0.0)
    evolution_windows: int = bounded(1, default=2)
    evolution_screen_windows: int = bounded(1, default=1)

    def __post_init__(self) -> None:
        check_bounds(self)
        _format_names("uniform", self.uniform)
        from ramp.evaluate.commonsense import TASKS
        from ramp.presets import LLAMA_PRESETS

        _known("commonsense_tasks", self.commonsense_tasks, TASKS)
        _known("knapsack", self.knapsack, START_KINDS)
        _known("presets", self.presets, tuple(LLAMA_PRESETS))
        if self.evolution_screen_windows > self.evolution_windows:
            raise BadValue(
                "evolution_screen_windows",
                self.evolution_screen_windows,
                f"must be <= evolution_windows={self.evolution_windows}",
            )


@dataclass(frozen=True)
class ExportParams:
    """``llama_check``: score the file with llama.cpp's llama-perplexity on ``llama_chunks`` windows of
    ``llama_n_ctx`` tokens of the held-out text (needs the built tools; the tiny profile turns it off).
    ``llama_repack``: let llama.cpp repack the weights for its CPU kernels (its default; a second copy of most
    weights in memory), false passes ``--no-repack`` (for large models on small machines)."""

    llama_check: bool
    llama_chunks: int = bounded(1)
    llama_n_ctx: int = bounded(8)
    llama_repack: bool = True

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class CacheParams:
    """The quantization cache (:class:`ramp.evaluate.quantized.QuantCache`): ``disk_bytes`` bounds its entries on
    disk (least recently used evicted first), ``memory_bytes`` its in-memory LRU; 0 turns either off. Not a stage
    section: the cache's size changes no result, so changing it reruns nothing (it is in no dvc.yaml ``params:``)."""

    disk_bytes: int = bounded(0, default=4 << 30)  # 4 GiB
    memory_bytes: int = bounded(0, default=1 << 30)  # 1 GiB

    def __post_init__(self) -> None:
        check_bounds(self)


# a Dask scheduler address: scheme://host:port (tcp, tls, ...)
_ADDRESS = re.compile(r"^[a-z][a-z0-9+.-]*://\S+:\d+$")


@dataclass(frozen=True)
class DistributedParams:
    """Where the sensitivity stage's measurement runs (one task per decoder block, :mod:`flows.fanout`): ``engine``
    ``local`` in the stage's own process; ``dask`` as Prefect tasks on a Dask cluster, at ``address`` (an existing
    scheduler, ``tcp://host:8786``; its workers import this checkout and see the workspace at the same path) or,
    with ``address`` null, on a local cluster of ``workers`` processes started for the run. ``threads_per_worker``:
    Dask threads and torch threads of each such process. Not a stage section: the result is the same to the bit
    whatever runs it, so changing it reruns nothing (it is in no dvc.yaml ``params:``)."""

    engine: Literal["local", "dask"] = "local"
    address: str | None = None
    workers: int = bounded(1, 1024, default=2)
    threads_per_worker: int = bounded(1, 1024, default=1)

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.address is not None:
            if not _ADDRESS.match(self.address):
                raise BadValue("address", self.address, "expected a Dask scheduler address scheme://host:port")
            if self.engine != "dask":
                raise BadValue("address", self.address, f"is set but engine is {self.engine!r} (expected dask)")


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
    # sources are prepared; the budget's fixed bytes depend on the export's embedding and norm types
    "train": (
        "seed", "model", "calibrate", "embed", "fold", "sensitivity", "train", "allocate.embedding_type",
        "allocate.norm_type",
    ),
    "allocate": ("allocate", "sensitivity.embedding_formats"),
    "quantize": ("quantize",),
    "evaluate": ("evaluate",),
    # export's report prints every section as its provenance
    "export": (
        "seed", "model", "calibrate", "embed", "fold", "sensitivity", "train", "allocate", "quantize", "evaluate",
        "export",
    ),
}  # fmt: skip
# sections params.yaml may leave out (their defaults apply) and no stage's params: they change no result
OPTIONAL_SECTIONS: dict[str, type] = {"cache": CacheParams, "distributed": DistributedParams}


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
    cache: CacheParams = CacheParams()
    distributed: DistributedParams = DistributedParams()

    def section(self, name: str) -> Any:
        """A section, or one key of it as ``section.key`` (a stage that reads only that key of another stage's)."""
        out: Any = self
        for part in name.split("."):
            out = getattr(out, part)
        return out


def section_data(params: PipelineParams, name: str) -> Any:
    """``params.section(name)`` as plain data (a stamp's, a report's or a tracked run's params)."""
    value = params.section(name)
    return as_dict(value) if dataclasses.is_dataclass(value) else value


def pipeline_from_dict(data: dict[str, Any], where: str = "params") -> PipelineParams:
    """:class:`PipelineParams` from a parsed params mapping (``cache`` and ``distributed`` optional; other top-level
    sections, e.g. retrain, ignored)."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    missing = [s for s in ("seed", *SECTIONS) if s not in data]
    if missing:
        raise ParamsError(f"{where}: no section {missing[0]!r} (sections: {', '.join(sorted(data))})")
    try:
        kwargs: dict[str, Any] = {"seed": _convert(data["seed"], int, "seed")}
        _check_seed(kwargs["seed"])
        for name, cls in SECTIONS.items():
            kwargs[name] = _build(cls, data[name], name)
        for name, cls in OPTIONAL_SECTIONS.items():
            if name in data:
                kwargs[name] = _build(cls, data[name], name)
        params = PipelineParams(**kwargs)
        _check_budgets(params)
        _check_windows(params)
        _check_embedding(params)
        _check_fisher(params)
        for source in params.train.source_overlays:
            source_pipeline(params, source)
    except ParamsError as e:
        raise _in_file(where, e) from e
    return params


SOURCE_SECTIONS = ("calibrate", "embed", "fold", "sensitivity")  # the stages that prepare a train.sources model
SOURCE_KEYS = (*SOURCE_SECTIONS, "reward")  # what train.source_overlays may set (reward: train.reward)


def source_pipeline(params: PipelineParams, source: str) -> PipelineParams:
    """``params`` for preparing and rewarding the ``train.sources`` model ``source``: its ``model.source`` and its
    ``train.source_overlays`` entry laid over the sections of :data:`SOURCE_SECTIONS` and over ``train.reward`` (a
    bad key or value is a :class:`ParamsError` naming ``train.source_overlays.<source>``)."""
    overlay = params.train.source_overlays.get(source, {})
    where = f"train.source_overlays.{source}"
    if not isinstance(overlay, dict):
        raise ParamsError(f"{where}: expected a mapping of sections ({', '.join(SOURCE_KEYS)}), got {overlay!r}")
    bad = sorted(set(overlay) - set(SOURCE_KEYS))
    if bad:
        raise ParamsError(f"{where}: section {bad[0]!r} cannot differ per source (only {', '.join(SOURCE_KEYS)})")

    def laid(name: str, current: Any) -> Any:
        return _build(type(current), merge(as_dict(current), overlay[name]), f"{where}.{name}")

    sections = {name: laid(name, params.section(name)) for name in SOURCE_SECTIONS if name in overlay}
    if "reward" in overlay:
        sections["train"] = dataclasses.replace(params.train, reward=laid("reward", params.train.reward))
    return dataclasses.replace(params, model=ModelParams(source=source, tiny=params.model.tiny), **sections)


def _check_budgets(params: PipelineParams) -> None:
    """A bpw budget above the largest format of ``fold.formats`` is a typo: no allocation can spend it."""
    top = params.fold.max_bpw
    for name in ("train", "allocate"):
        bpw = params.section(name).budget_bpw
        if bpw is not None and bpw > top:
            raise ParamsError(
                f"{name}.budget_bpw = {bpw!r}: above {top} bits per weight, the largest format of fold.formats"
            )


def _check_windows(params: PipelineParams) -> None:
    """The train stage reads the reward's windows, then (``rescore_top`` > 0) the rescoring's, from the calibration:
    more than ``calibrate.n_tokens // calibrate.n_ctx`` is an error before any stage runs."""
    train, cal = params.train, params.calibrate
    windows = cal.n_tokens // cal.n_ctx
    needed = train.reward_windows + (train.rescore_windows if train.rescore_top else 0)
    if needed > windows:
        rescore = f" + rescore_windows {train.rescore_windows}" if train.rescore_top else ""
        raise ParamsError(
            f"train.reward_windows {train.reward_windows}{rescore} = {needed} windows: the calibration has "
            f"{windows} (calibrate.n_tokens {cal.n_tokens} / n_ctx {cal.n_ctx})"
        )


def _check_embedding(params: PipelineParams) -> None:
    """``allocate.embedding_type: measured`` (``predicted``) chooses among the embedding formats the sensitivity
    stage measures (``sensitivity.embedding_formats``): with that list empty it is an error before any stage runs."""
    name = params.allocate.embedding_type
    if name in (EMBEDDING_MEASURED, EMBEDDING_PREDICTED) and not params.sensitivity.embedding_formats:
        raise ParamsError(
            f"allocate.embedding_type {name!r} chooses among sensitivity.embedding_formats, but that list is "
            "empty: list some (e.g. [Q8_0, Q6_K, Q5_1, Q5_0])"
        )


def _check_fisher(params: PipelineParams) -> None:
    """What reads the fold stage's Fisher table (``train.cost_basis: fisher``, a ``fisher`` demonstration or
    knapsack) needs ``fold.fisher_windows`` > 0, and those windows must exist in the calibration."""
    users = [
        name
        for name, used in (
            ("train.cost_basis", params.train.cost_basis == "fisher"),
            ("train.demos", "fisher" in params.train.demos),
            ("evaluate.knapsack", "fisher" in params.evaluate.knapsack),
        )
        if used
    ]
    if users and params.fold.fisher_windows == 0:
        raise ParamsError(
            f"{users[0]} reads the fold stage's Fisher table, but fold.fisher_windows is 0: set it (e.g. 8)"
        )
    windows = params.calibrate.n_tokens // params.calibrate.n_ctx
    if params.fold.fisher_windows > windows:
        raise ParamsError(
            f"fold.fisher_windows {params.fold.fisher_windows}: the calibration has {windows} windows "
            f"(calibrate.n_tokens {params.calibrate.n_tokens} / n_ctx {params.calibrate.n_ctx})"
        )


def load_pipeline(path: str | Path = PARAMS_FILE, overlay: dict[str, Any] | None = None) -> PipelineParams:
    """All stage sections of ``path``, with ``overlay`` (nested mappings, e.g. a benchmark's) laid over them."""
    data = read_params(path)
    return pipeline_from_dict(merge(data, overlay or {}), str(path))


def load_optional(section: str, path: str | Path = PARAMS_FILE) -> Any:
    """Optional section ``section`` (:data:`OPTIONAL_SECTIONS`) of ``path``; its defaults when the file has none."""
    params = read_params(path)
    try:
        return _build(OPTIONAL_SECTIONS[section], params.get(section, {}), section)
    except ParamsError as e:
        raise _in_file(path, e) from e


def load_cache_params(path: str | Path = PARAMS_FILE) -> CacheParams:
    """Section ``cache`` of ``path`` (its defaults when the file has no such section)."""
    return load_optional("cache", path)


def load_distributed_params(path: str | Path = PARAMS_FILE) -> DistributedParams:
    """Section ``distributed`` of ``path`` (its defaults, in-process, when the file has no such section)."""
    return load_optional("distributed", path)
