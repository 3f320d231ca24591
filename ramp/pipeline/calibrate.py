"""Stage calibrate: resolve the model, cut calibration tokens, collect per-matrix activation stats + imatrix.

Writes ``data/calibrate/`` (``model.json`` naming the model every later stage loads, ``model/`` for a model built
here, ``stats/``, ``stats.parquet``, ``imatrix.dat`` in llama.cpp's format, ``tokens.safetensors``).

``model.source: tiny`` builds ``ramp.models.tiny.tiny_llama(seed)`` here and saves it as a Hugging Face
directory. Its tokenizer is a byte-level BPE with exactly the model's vocabulary size, trained on the
calibration text (``ramp.testbed.train_tokenizer``), so every token id is a real row of the embedding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from ramp.io import atomic_dir, sha256_file, write_json
from ramp.params import ASSET_MODELS, CalibrateParams, ModelParams, as_dict
from ramp.pipeline.workspace import Timer, Workspace

log = logging.getLogger("ramp.pipeline.calibrate")


def calibration_text(name: str) -> str:
    """The calibration text: the calibration part of the Wikipedia split, or a whole other text asset."""
    from ramp.assets import asset_path
    from ramp.data import wiki_split

    if name == "wiki":
        return wiki_split(asset_path("wiki"))[0]
    return asset_path(name).read_text(encoding="utf-8").replace("<|endoftext|>", "\n")


def build_tiny(out_dir: Path, params: ModelParams, seed: int, text: str) -> Path:
    """Save the seeded tiny Llama + a byte-level BPE tokenizer of the same vocabulary as an HF directory."""
    from ramp.models.tiny import tiny_llama
    from ramp.testbed import train_tokenizer

    t = params.tiny
    lm = tiny_llama(seed=seed, **dataclasses.asdict(t))
    out_dir.mkdir(parents=True)
    lm.model.save_pretrained(str(out_dir))
    tok = train_tokenizer(text[:400_000], t.vocab)
    tok.save_pretrained(str(out_dir))
    log.info("built tiny Llama (seed %d, %s) with a %d-token byte-level BPE in %s", seed, t, t.vocab, out_dir)
    return out_dir


def resolve_source(params: ModelParams) -> Path:
    """An asset name, the trained testbed, or a path; never ``tiny`` (built by :func:`build_tiny`)."""
    from ramp.assets import asset_path

    if params.source in ASSET_MODELS:
        return asset_path(params.source)
    if params.source == "testbed":
        from ramp.testbed import testbed_model

        return testbed_model()
    path = Path(params.source)
    if not params.source or not path.exists():
        raise FileNotFoundError(
            f"model.source {params.source!r}: no such file or directory "
            f"(expected one of {', '.join((*ASSET_MODELS, 'testbed', 'tiny'))}, a GGUF file or an HF directory)"
        )
    return path


def fingerprint(path: Path) -> str:
    """sha256 of a model file, or of every file of a model directory (names + bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def use_imatrix_file(stats: Any, path: Path) -> None:
    """Replace the measured imatrix of ``stats`` by the one in ``path`` (llama.cpp's GGUF or legacy format): every
    matrix must have an entry of its input width, or the file is refused naming the first that does not."""
    import numpy as np

    from ramp.imatrix import ImatrixError, read_imatrix

    means = read_imatrix(path)
    for name, measured in stats.sum_sq.items():
        given = means.get(name)
        if given is None:
            raise ImatrixError(f"calibrate.imatrix {path}: no entry for {name} (it holds {len(means)} entries)")
        if given.shape != measured.shape:
            raise ImatrixError(
                f"calibrate.imatrix {path}: {name} has {given.size} columns; the model's matrix has {measured.size} "
                "(an imatrix of another model?)"
            )
    for name in stats.sum_sq:  # stored as sums over the calibration tokens, so that imatrix() gives the file's means
        stats.sum_sq[name] = means[name].astype(np.float64) * float(stats.count[name])
    log.info("imatrix from %s (%d entries) instead of the measured one", path, len(means))


def calibrate(model: ModelParams, params: CalibrateParams, seed: int, ws: Workspace) -> dict[str, Any]:
    """Calibrate ``model`` on ``params``; writes ``data/calibrate/`` and returns the stage metrics."""
    import torch
    from safetensors.torch import save_file

    from ramp.calib import calibrate as collect_stats
    from ramp.calib import calibration_tokens, save_stats
    from ramp.imatrix import write_imatrix
    from ramp.models.loader import load_model

    ws.begin("calibrate")
    timer = Timer()
    torch.manual_seed(seed)
    text = calibration_text(params.text)
    out = ws.stage("calibrate")
    with atomic_dir(out) as tmp:
        if model.source == "tiny":
            build_tiny(tmp / "model", model, seed, text)
            path, pointer = tmp / "model", Path("data") / "calibrate" / "model"  # relative to the workspace
        else:
            path = pointer = resolve_source(model)
        lm = load_model(path, lazy=True)  # block by block: one block's weights in memory
        if lm.tokenizer is None:
            raise ValueError(f"{path}: the model has no tokenizer; calibration needs one to encode {params.text!r}")
        n_total = params.n_tokens + params.offset_seqs * params.n_ctx
        tokens = calibration_tokens(lm, text, n_total, params.n_ctx)[params.offset_seqs :]
        log.info("calibrating %s on %d windows of %d tokens", path, tokens.shape[0], params.n_ctx)
        stats = collect_stats(lm, tokens, batch_size=params.batch_size)
        if params.imatrix is not None:
            use_imatrix_file(stats, Path(params.imatrix))
        stats.meta["source"] = str(pointer)  # not the temporary folder it was loaded from: outputs are byte-stable
        save_stats(stats, tmp / "stats")
        stats.table.to_parquet(tmp / "stats.parquet", index=False)
        write_imatrix(tmp / "imatrix.dat", stats.imatrix(), n_chunks=int(tokens.shape[0]), dataset=params.text)
        save_file({"tokens": tokens.contiguous()}, str(tmp / "tokens.safetensors"))
        write_json(
            tmp / "model.json",
            {"source": model.source, "path": str(pointer), "sha256": fingerprint(path), **as_dict(model)},
        )
    log.info("calibrate done in %.1f s: %d matrices -> %s", timer.seconds, len(stats.table), out)
    return ws.write_metrics(
        "calibrate",
        {
            "matrices": len(stats.table),
            "windows": int(tokens.shape[0]),
            "tokens": int(tokens.numel()),
            "n_ctx": params.n_ctx,
            "mean_act_crest": float(stats.table["act_crest"].mean()),
            "seconds": timer.seconds,
        },
    )
