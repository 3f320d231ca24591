"""Where a pipeline run keeps its files: ``<root>/data/<stage>/`` per stage, metrics, plots, and the quantization
cache. The DVC pipeline's workspace is the repository root; a benchmark or ``ramp quantize`` uses another."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ramp.io import write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workspace:
    """``root``: the folder holding ``data/``; ``quant_cache``: the content-addressed dequantized weights (shared
    between workspaces is safe: entries are keyed by weight, imatrix and format digests)."""

    root: Path = Path(".")
    quant_cache: Path | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    def stage(self, name: str) -> Path:
        return self.data / name

    @property
    def metrics(self) -> Path:
        return self.data / "metrics"

    @property
    def plots(self) -> Path:
        return self.data / "plots"

    @property
    def cache(self) -> Path:
        return self.quant_cache if self.quant_cache is not None else self.root / "cache" / "quantized"

    @property
    def model_pointer(self) -> Path:
        """Written by calibrate: which model every later stage uses."""
        return self.stage("calibrate") / "model.json"

    def model_path(self) -> Path:
        if not self.model_pointer.exists():
            raise FileNotFoundError(
                f"{self.model_pointer} does not exist: run the calibrate stage first (dvc repro calibrate)"
            )
        path = Path(json.loads(self.model_pointer.read_text())["path"])
        return path if path.is_absolute() else self.root / path

    def read_json(self, relative: str) -> Any:
        return json.loads((self.data / relative).read_text())

    def write_metrics(self, stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """``data/metrics/<stage>.json`` (a DVC ``metrics:`` output, not cached); returns ``metrics``."""
        write_json(self.metrics / f"{stage}.json", metrics)
        return metrics

    def folded_model(self, with_tokenizer: bool = False) -> Any:
        """The Scale-Folded model of the fold stage, with the original's tokenizer and GGUF metadata (so it exports
        like the original: tokenizer, chat template and rope settings are carried into the file)."""
        from ramp.folding import load_folded
        from ramp.models.loader import load_model

        base = load_model(self.model_path(), with_tokenizer=with_tokenizer)
        return load_folded(self.stage("fold") / "model.safetensors", base=base)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def gguf_heads(lm: Any, role: str) -> int | None:
    """Heads whose rows llama.cpp reorders for its RoPE layout (q: attention heads, k: KV heads), else None."""
    if not lm.arch.permute_qk or role not in ("q", "k"):
        return None
    return int(lm.config.num_attention_heads if role == "q" else lm.config.num_key_value_heads)
