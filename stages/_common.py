"""What every stage script shares: typed params sections, the model a run works on, atomic outputs.

Each stage reads only its own section of ``params.yaml`` into a frozen dataclass; an unknown key, a missing
key or a value of the wrong type is an error naming the key and the section (:class:`ParamsError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ramp.io import atomic_write_text

log = logging.getLogger(__name__)

PARAMS_FILE = Path("params.yaml")
DATA = Path("data")
METRICS = DATA / "metrics"
PLOTS = DATA / "plots"

T = TypeVar("T")


class ParamsError(ValueError):
    """params.yaml does not match what a stage expects (the message names the section and key)."""


# --------------------------------------------------------------------------------------------- params


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


# --------------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class TinyModelParams:
    """Dimensions of the in-code tiny Llama (multiples of 256 so every GGUF format is legal)."""

    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """``source``: an asset name (smollm2, gemma3), ``tiny`` (built in code), or a GGUF file / HF directory."""

    source: str
    tiny: TinyModelParams = TinyModelParams()


ASSET_MODELS = ("smollm2", "gemma3")
MODEL_POINTER = DATA / "calibrate" / "model.json"  # written by calibrate: which model every later stage uses


def model_path() -> Path:
    """The model the calibrate stage resolved (``data/calibrate/model.json``)."""
    if not MODEL_POINTER.exists():
        raise FileNotFoundError(f"{MODEL_POINTER} does not exist: run the calibrate stage first (dvc repro calibrate)")
    return Path(json.loads(MODEL_POINTER.read_text())["path"])


# --------------------------------------------------------------------------------------------- outputs


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; it replaces ``path`` only if the block succeeds.

    Leftovers of a run that was killed (``.<name>.*.tmp`` beside it) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in (tmp, *tmp.rglob("*")):  # mkdtemp/mkstemp create 0700/0600; outputs get the usual modes
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        if path.exists():
            old = path.parent / f".{path.name}.old.tmp"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_metrics(stage: str, metrics: dict[str, Any]) -> Path:
    """``data/metrics/<stage>.json`` (a DVC ``metrics:`` output, not cached)."""
    return write_json(METRICS / f"{stage}.json", metrics)


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("RAMP_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from ramp.offline import set_offline_env

    set_offline_env()


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


FOLDED = DATA / "fold" / "model.safetensors"


def load_folded_model(with_tokenizer: bool = False) -> Any:
    """The Scale-Folded model of the fold stage, with the original's tokenizer and GGUF metadata (so it exports
    like the original: tokenizer, chat template and rope settings are carried into the file)."""
    from ramp.folding import load_folded
    from ramp.models.loader import load_model

    return load_folded(FOLDED, base=load_model(model_path(), with_tokenizer=with_tokenizer))


def gguf_heads(lm: Any, role: str) -> int | None:
    """Heads whose rows llama.cpp reorders for its RoPE layout (q: attention heads, k: KV heads), else None."""
    if not lm.arch.permute_qk or role not in ("q", "k"):
        return None
    return int(lm.config.num_attention_heads if role == "q" else lm.config.num_key_value_heads)
