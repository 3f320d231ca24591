"""Quantized files for any allocation of a workspace's model, and llama.cpp's own measurement of them.

Benchmarks and ``make check-results`` use these to turn a row (an allocation, or a llama.cpp preset) into a GGUF
file with the same quantize and export code as the pipeline's stages, and to score it with
``llama-perplexity --kl-divergence`` against the F32 export of the original model on the held-out text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ramp.io import sha256_file
from ramp.pipeline.workspace import Workspace

log = logging.getLogger("ramp.pipeline.measure")


@dataclass(frozen=True)
class BuiltFile:
    path: Path
    bytes: int
    sha256: str
    allocation_hash: str


def build_gguf(
    ws: Workspace,
    lm: Any,
    allocation: dict[str, str],
    path: Path,
    provenance: dict[str, Any],
    embedding_type: str,
    norm_type: str,
    imatrix: bool = True,
) -> BuiltFile:
    """``lm``, the folded model of ``ws`` (:meth:`Workspace.folded_model`, loaded once by the caller), quantized to
    ``allocation`` and exported to ``path`` (verified, atomic), exactly as the quantize and export stages do;
    ``provenance`` (policy_version, budget_file_bytes, method) goes into its ``ramp.*`` keys, so the export
    stage's own file is rebuilt byte for byte from its allocation."""
    from ramp.allocation import matrix_bytes, slots_for
    from ramp.gguf_export import Provenance, export_model
    from ramp.pipeline.fold import folded_imatrix_of
    from ramp.pipeline.quantize import quantize_allocation

    matrix_bytes(slots_for(lm.matrices()), allocation)  # every matrix, legal formats only
    tensors = quantize_allocation(lm, allocation, folded_imatrix_of(ws) if imatrix else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    res = export_model(
        lm,
        path,
        allocation=allocation,
        embedding_type=embedding_type,
        norm_type=norm_type,
        provenance=Provenance(**provenance),
        tensor_data={k: v.numpy() for k, v in tensors.items()},
    )
    return BuiltFile(path, res.file_bytes, sha256_file(path), res.allocation_hash)


def file_record(path: Path) -> tuple[int, str]:
    """(bytes, sha256) of a file."""
    return path.stat().st_size, sha256_file(path)


def reference_gguf(ws: Workspace) -> Path:
    """The original (unfolded) model of ``ws`` exported at F32: the KLD reference (cached in the workspace)."""
    from ramp.gguf_export import export_model
    from ramp.models.loader import load_model

    out = ws.data / "measure" / "reference-f32.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        lm = load_model(ws.model_path(), with_tokenizer=False)
        export_model(lm, out, default_type="F32", embedding_type="F32")
    return out


def kld_base(ws: Workspace, chunks: int, n_ctx: int) -> Path:
    """llama-perplexity's KL-divergence base file of the F32 reference on ``chunks`` held-out windows (cached)."""
    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.io import atomic_path
    from ramp.llamacpp import llama_kld_base

    base = ws.data / "measure" / f"base-{chunks}x{n_ctx}.kld"
    if not base.exists():
        text = ws.data / "measure" / "heldout.txt"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(wiki_split(asset_path("wiki"))[1], encoding="utf-8")
        with atomic_path(base) as tmp:
            llama_kld_base(reference_gguf(ws), text, tmp, n_ctx=n_ctx, chunks=chunks)
    return base


def llama_measure(path: Path, base: Path) -> dict[str, Any]:
    """llama.cpp's KLD and perplexity of ``path`` against ``base`` (a :func:`kld_base` file)."""
    from ramp.llamacpp import llama_kld

    res = llama_kld(path, base)
    if res["warnings"]:
        raise RuntimeError(f"llama-perplexity warned on {path}: {res['warnings'][:3]}")
    return {k: res[k] for k in ("kld_mean", "kld_p99", "ppl", "ppl_base", "same_top_p", "kld_chunks")}
