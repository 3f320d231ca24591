"""Stage calibrate: resolve the model, cut calibration tokens, collect per-matrix activation stats + imatrix.

Reads params ``model``, ``calibrate``, ``seed``. Writes ``data/calibrate/`` (``model.json`` naming the model
every later stage loads, ``model/`` for a model built here, ``stats/``, ``stats.parquet``, ``imatrix.dat``
in llama.cpp's format, ``tokens.safetensors``) and ``data/metrics/calibrate.json``.

``model.source: tiny`` builds ``ramp.models.tiny.tiny_llama(seed)`` here and saves it as a Hugging Face
directory. Its tokenizer is a byte-level BPE with exactly the model's vocabulary size, trained on the
calibration text (``ramp.testbed.train_tokenizer``), so every token id is a real row of the embedding
(no clamping, no id outside the vocabulary).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from stages._common import (
    ASSET_MODELS,
    DATA,
    ModelParams,
    Timer,
    as_dict,
    atomic_dir,
    load_params,
    load_value,
    setup_logging,
    write_json,
    write_metrics,
)

log = logging.getLogger("stages.calibrate")
OUT = DATA / "calibrate"


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
    lm = tiny_llama(
        seed=seed,
        hidden=t.hidden,
        intermediate=t.intermediate,
        layers=t.layers,
        heads=t.heads,
        kv_heads=t.kv_heads,
        vocab=t.vocab,
    )
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
    if not path.exists():
        raise FileNotFoundError(
            f"model.source {params.source!r}: no such file or directory "
            f"(expected one of {', '.join((*ASSET_MODELS, 'testbed', 'tiny'))}, a GGUF file or an HF directory)"
        )
    return path


def _fingerprint(path: Path) -> str:
    """sha256 of a model file, or of every file of a model directory (names + bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def main() -> None:
    setup_logging()
    timer = Timer()
    model_params = load_params("model", ModelParams)
    params = load_params("calibrate", CalibrateParams)
    seed = load_value("seed", int)

    import torch
    from safetensors.torch import save_file

    from ramp.calib import calibrate, calibration_tokens, save_stats
    from ramp.imatrix import write_imatrix
    from ramp.models.loader import load_model

    torch.manual_seed(seed)
    text = calibration_text(params.text)
    with atomic_dir(OUT) as tmp:
        if model_params.source == "tiny":
            build_tiny(tmp / "model", model_params, seed, text)
            path, pointer = tmp / "model", OUT / "model"
        else:
            path = pointer = resolve_source(model_params)
        lm = load_model(path)
        if lm.tokenizer is None:
            raise ValueError(f"{path}: the model has no tokenizer; calibration needs one to encode {params.text!r}")
        n_total = params.n_tokens + params.offset_seqs * params.n_ctx
        tokens = calibration_tokens(lm, text, n_total, params.n_ctx)[params.offset_seqs :]
        log.info("calibrating %s on %d windows of %d tokens", path, tokens.shape[0], params.n_ctx)
        stats = calibrate(lm, tokens, batch_size=params.batch_size)
        save_stats(stats, tmp / "stats")
        stats.table.to_parquet(tmp / "stats.parquet", index=False)
        write_imatrix(tmp / "imatrix.dat", stats.imatrix(), n_chunks=int(tokens.shape[0]), dataset=params.text)
        save_file({"tokens": tokens.contiguous()}, str(tmp / "tokens.safetensors"))
        write_json(
            tmp / "model.json",
            {
                "source": model_params.source,
                "path": str(pointer),
                "sha256": _fingerprint(path),
                **as_dict(model_params),
            },
        )
    write_metrics(
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
    log.info("calibrate done in %.1f s: %d matrices -> %s", timer.seconds, len(stats.table), OUT)


if __name__ == "__main__":
    main()
