"""Where a pipeline run keeps its files: ``<root>/data/<stage>/`` per stage, metrics, plots, and the quantization
cache. The DVC pipeline's workspace is the repository root; a benchmark or ``ramp quantize`` uses another."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ramp.io import remove_stale_temporaries, write_json

if TYPE_CHECKING:
    from ramp.evaluate.quantized import QuantCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workspace:
    """``root``: the folder holding ``data/``; ``quant_cache``: the content-addressed dequantized weights (shared
    between workspaces is safe: entries are keyed by weight, imatrix and format digests); ``cache_disk_bytes`` /
    ``cache_memory_bytes``: that cache's bounds (params.yaml ``cache``; None: :class:`QuantCache`'s defaults)."""

    root: Path = Path(".")
    quant_cache: Path | None = None
    cache_disk_bytes: int | None = None
    cache_memory_bytes: int | None = None

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
    def stamps(self) -> Path:
        """``data/.stamps/<stage>.json``: what :func:`ramp.pipeline.run.run_pipeline` last ran each stage with."""
        return self.data / ".stamps"

    @property
    def cache(self) -> Path:
        return self.quant_cache if self.quant_cache is not None else self.root / "cache" / "quantized"

    def quant_cache_store(self) -> QuantCache:
        """A :class:`ramp.evaluate.quantized.QuantCache` on :attr:`cache` with this workspace's bounds."""
        from ramp.evaluate.quantized import QuantCache

        limits = {"disk_bytes": self.cache_disk_bytes, "memory_bytes": self.cache_memory_bytes}
        return QuantCache(self.cache, **{k: v for k, v in limits.items() if v is not None})

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

    def model_reference(self) -> str:
        """The model as ``model.json`` names it (a model built by calibrate: relative to the workspace root). What
        outputs record as their source, so that their bytes do not depend on where the workspace is."""
        if not self.model_pointer.exists():
            self.model_path()  # raises the error that says to run calibrate
        return str(json.loads(self.model_pointer.read_text())["path"])

    def begin(self, stage: str) -> list[Path]:
        """Start a run of ``stage``: remove the temporaries a killed earlier run left behind and the stage's metrics.

        Removed: temporaries of this stage's outputs (``data/.<stage>.<pid>.*.tmp``, its metrics and stamp files)
        and, in the folders stages share (``data/plots/``, the quantization cache), temporaries of any writer; in
        every case only those whose writer's pid no longer runs. Without its metrics file the stage reads as done
        again only once it has written all its outputs (the metrics are written last). Returns what was removed.
        """
        removed = remove_stale_temporaries(self.data, stage)
        removed += remove_stale_temporaries(self.metrics, f"{stage}.json")
        removed += remove_stale_temporaries(self.stamps, f"{stage}.json")
        removed += remove_stale_temporaries(self.plots)
        if self.cache.is_dir():  # entries sit in one sub-folder per first two hex digits of their key
            for folder in (self.cache, *sorted(p for p in self.cache.iterdir() if p.is_dir())):
                removed += remove_stale_temporaries(folder)
        if removed:
            names = ", ".join(str(p) for p in removed[:5])
            log.info("stage %s: removed %d stale temporaries of killed runs: %s", stage, len(removed), names)
        (self.metrics / f"{stage}.json").unlink(missing_ok=True)
        return removed

    def read_json(self, relative: str) -> Any:
        return json.loads((self.data / relative).read_text())

    def write_metrics(self, stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """``data/metrics/<stage>.json`` (a DVC ``metrics:`` output, not cached) with ``peak_rss_bytes`` added: the
        peak resident memory of this process so far (the stage alone under ``dvc repro``, where every stage is its
        own process; children such as ``llama-perplexity`` not included); returns the metrics written."""
        import resource

        metrics = {**metrics, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        write_json(self.metrics / f"{stage}.json", metrics)
        return metrics

    def folded_model(self, with_tokenizer: bool = False, lazy: bool = False) -> Any:
        """The model of the fold stage (Scale-Folded, or the calibrated model itself when folding is disabled), with
        the original's tokenizer and GGUF metadata (so it exports like the original: tokenizer, chat template and
        rope settings are carried into the file). ``lazy``: no weight read now (:mod:`ramp.models.stream`)."""
        from ramp.folding import load_folded
        from ramp.models.loader import load_model

        pointer = self.stage("fold") / "model.json"
        if not pointer.exists():
            raise FileNotFoundError(f"{pointer} does not exist: run the fold stage first (dvc repro fold)")
        info = json.loads(pointer.read_text())
        base = load_model(self.model_path(), with_tokenizer=with_tokenizer, lazy=lazy or bool(info["folded"]))
        if not info["folded"]:
            return base
        return load_folded(self.stage("fold") / info["file"], base=base, lazy=lazy)


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
