"""Stage export: the GGUF file llama.cpp runs, written from the quantize stage's bytes and verified.

Reads params ``export``. Reads ``data/fold/model``, ``data/allocate/`` (allocation, budget, policy version) and
``data/quantize/tensors.safetensors``. Writes ``data/export/model.gguf`` and ``data/metrics/export.json``.
The exporter reads the file back (every tensor's type, shape and bytes; size = overhead + matrix bytes) before
it is renamed into place; with ``llama_check`` the file is also scored by llama.cpp's ``llama-perplexity``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from stages._common import DATA, Timer, atomic_dir, load_folded_model, load_params, setup_logging, write_metrics

log = logging.getLogger("stages.export")
OUT = DATA / "export"


@dataclass(frozen=True)
class ExportParams:
    """``llama_check``: score the file with llama.cpp's llama-perplexity on ``llama_chunks`` windows of
    ``llama_n_ctx`` tokens of the held-out text (needs the built tools; the tiny profile turns it off)."""

    llama_check: bool
    llama_chunks: int
    llama_n_ctx: int


def llama_cpp_ppl(path, chunks: int, n_ctx: int) -> float:
    """llama.cpp's perplexity of the exported file on the held-out Wikipedia text."""
    import tempfile
    from pathlib import Path

    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.llamacpp import llama_perplexity

    with tempfile.TemporaryDirectory() as d:
        text = Path(d) / "eval.txt"
        text.write_text(wiki_split(asset_path("wiki"))[1], encoding="utf-8")
        result = llama_perplexity(path, text, n_ctx=n_ctx, chunks=chunks)
    return float(getattr(result, "ppl", result))


def main() -> None:
    setup_logging()
    timer = Timer()
    params = load_params("export", ExportParams)

    from safetensors.numpy import load_file

    from ramp.allocation import load_allocation
    from ramp.gguf_export import Provenance, export_model

    lm = load_folded_model()
    allocation = load_allocation(DATA / "allocate" / "allocation.json")
    budget = json.loads((DATA / "allocate" / "budget.json").read_text())
    tensor_data = load_file(str(DATA / "quantize" / "tensors.safetensors"))
    provenance = Provenance(
        policy_version=budget["policy_version"], budget_bytes=int(budget["file_budget_bytes"]), method="ramp"
    )
    with atomic_dir(OUT) as tmp:
        result = export_model(
            lm,
            tmp / "model.gguf",
            allocation=allocation,
            embedding_type=budget["embedding_type"],
            norm_type=budget["norm_type"],
            provenance=provenance,
            tensor_data=tensor_data,
        )
        file_bytes = result.file_bytes
        ppl = llama_cpp_ppl(tmp / "model.gguf", params.llama_chunks, params.llama_n_ctx) if params.llama_check else None
    metrics = {
        "file_bytes": file_bytes,
        "file_budget_bytes": int(budget["file_budget_bytes"]),
        "under_budget": file_bytes <= int(budget["file_budget_bytes"]),
        "predicted_file_bytes": int(budget["overhead_bytes"]) + int(budget["matrix_bytes"]),
        "allocation_hash": result.allocation_hash,
        "tensors": len(result.tensors),
        "seconds": timer.seconds,
    }
    if ppl is not None:
        metrics["llama_cpp_ppl"] = ppl
    write_metrics("export", metrics)
    log.info(
        "export done in %.1f s: %s (%s B, budget %s B)",
        timer.seconds,
        OUT / "model.gguf",
        f"{file_bytes:,}",
        f"{int(budget['file_budget_bytes']):,}",
    )


if __name__ == "__main__":
    main()
