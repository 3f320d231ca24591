"""Stage export: the GGUF file llama.cpp runs, written from the quantize stage's bytes and verified.

Writes ``data/export/model.gguf`` and ``data/export/report.html`` (:mod:`ramp.report`: the run's results, plots,
budget accounting and provenance in one self-contained page). The exporter reads the file back (every tensor's type,
shape and bytes; size = overhead + matrix bytes) before it is renamed into place; with ``llama_check`` the file is
also scored by llama.cpp's ``llama-perplexity``. Both files are renamed into place together.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ramp.io import atomic_dir, scratch_dir, sha256_file
from ramp.params import ExportParams
from ramp.pipeline.workspace import Timer, Workspace

log = logging.getLogger("ramp.pipeline.export")


def llama_cpp_ppl(path: Path, chunks: int, n_ctx: int, scratch: Path, repack: bool = True) -> float:
    """llama.cpp's perplexity of the exported file on the held-out Wikipedia text (written to a scratch folder in
    ``scratch``, the workspace's ``data/``, where the next run of the stage removes it if this one is killed);
    ``repack=False`` runs it with ``--no-repack``."""
    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.llamacpp import llama_perplexity

    with scratch_dir(scratch, "export") as d:
        text = d / "eval.txt"
        text.write_text(wiki_split(asset_path("wiki"))[1], encoding="utf-8")
        result = llama_perplexity(path, text, n_ctx=n_ctx, chunks=chunks, extra=None if repack else ["--no-repack"])
    return float(getattr(result, "ppl", result))


def export(params: ExportParams, ws: Workspace, pipeline_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``data/export/model.gguf`` and its report; returns the stage metrics (bytes, sha256, allocation hash).

    ``pipeline_params``: the params sections the report prints as its provenance
    (:func:`ramp.report.pipeline_sections`); None prints that they were not passed.
    """
    from ramp.allocation import load_allocation
    from ramp.gguf_export import Provenance, export_model
    from ramp.models.stream import SafetensorsBytes
    from ramp.report import REPORT, gguf_layout, write_report

    ws.begin("export")
    timer = Timer()
    lm = ws.folded_model(lazy=True)  # every tensor read, converted and written one at a time
    allocation = load_allocation(ws.stage("allocate") / "allocation.json")
    budget = ws.read_json("allocate/budget.json")
    tensor_data = SafetensorsBytes(ws.stage("quantize") / "tensors.safetensors")  # each read when written
    provenance = Provenance(
        policy_version=budget["policy_version"], budget_file_bytes=int(budget["budget_file_bytes"]), method="ramp"
    )
    out = ws.stage("export")
    with atomic_dir(out) as tmp:
        result = export_model(
            lm,
            tmp / "model.gguf",
            allocation=allocation,
            embedding_type=budget["embedding_type"],
            norm_type=budget["norm_type"],
            provenance=provenance,
            tensor_data=tensor_data,
        )
        digest = sha256_file(tmp / "model.gguf")
        ppl = None
        if params.llama_check:
            ppl = llama_cpp_ppl(
                tmp / "model.gguf", params.llama_chunks, params.llama_n_ctx, ws.data, repack=params.llama_repack
            )
        exported = {"file_bytes": result.file_bytes, "sha256": digest, **gguf_layout(tmp / "model.gguf", allocation)}
        if ppl is not None:
            exported["llama_cpp_ppl"] = ppl
        write_report(ws, pipeline_params, tmp / "report.html", export_metrics=exported)
    metrics = {
        "file_bytes": result.file_bytes,
        "budget_file_bytes": int(budget["budget_file_bytes"]),
        "under_budget": result.file_bytes <= int(budget["budget_file_bytes"]),
        "predicted_file_bytes": int(budget["overhead_bytes"]) + int(budget["matrix_bytes"]),
        "allocation_hash": result.allocation_hash,
        "sha256": digest,
        "tensors": len(result.tensors),
        "report": REPORT,
        "seconds": timer.seconds,
    }
    if ppl is not None:
        metrics["llama_cpp_ppl"] = ppl
    log.info("export done in %.1f s: %s (%s B)", timer.seconds, out / "model.gguf", f"{result.file_bytes:,}")
    return ws.write_metrics("export", metrics)
