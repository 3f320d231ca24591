"""llama.cpp's own tools as a reference: locate (or build) them, run them, and call ggml's quantizer.

The tools are built from the ``llama-cpp-python==0.3.36`` sdist by ``scripts/build_llama_cpp.sh``
(``make llama-cpp``) into a cache outside the repository (``$RAMP_CACHE``, default ``~/.cache/ramp``).
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ramp.errors import RampError
from ramp.io import atomic_path

LLAMA_CPP_VERSION = "0.3.36"
REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_llama_cpp.sh"


class LlamaCppMissing(RampError, RuntimeError):
    """llama.cpp's tools are not built (run ``make llama-cpp``)."""


def cache_root() -> Path:
    return Path(os.environ.get("RAMP_CACHE", Path.home() / ".cache" / "ramp"))


def build_dir() -> Path:
    return cache_root() / f"llama-cpp-python-{LLAMA_CPP_VERSION}" / "build"


def source_dir() -> Path:
    return (
        cache_root()
        / f"llama-cpp-python-{LLAMA_CPP_VERSION}"
        / "src"
        / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
        / "vendor"
        / "llama.cpp"
    )


def is_built() -> bool:
    return (build_dir() / ".ramp-built").exists()


def ensure_built() -> Path:
    """Build the tools once (several minutes on 2 cores); later calls return at once."""
    if not is_built():
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True)
    return build_dir() / "bin"


def tool(name: str) -> Path:
    """Path of a built tool, e.g. ``tool("llama-perplexity")``."""
    path = build_dir() / "bin" / name
    if not path.exists():
        raise LlamaCppMissing(f"{path} does not exist; run `make llama-cpp` first")
    return path


@lru_cache(maxsize=1)
def _libggml() -> ctypes.CDLL:
    path = build_dir() / "bin" / "libggml-base.so"
    if not path.exists():
        raise LlamaCppMissing(f"{path} does not exist; run `make llama-cpp` first")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    return lib


def ggml_quantize(type_id: int, weight: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's own ``ggml_quantize_chunk`` on ``weight[rows, cols]`` -> ``uint8[rows, row_bytes]``."""
    lib = _libggml()
    w = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = w.shape
    lib.ggml_quantize_init(int(type_id))
    row_bytes = lib.ggml_row_size(int(type_id), cols)
    out = np.zeros((rows, row_bytes), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if im is not None and im.size != cols:
        raise ValueError(f"imatrix has {im.size} entries, expected {cols}")
    written = lib.ggml_quantize_chunk(
        int(type_id), w.ctypes.data, out.ctypes.data, 0, rows, cols, None if im is None else im.ctypes.data
    )
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


# llama.cpp's logger writes from a worker thread that the process does not wait for at exit: the last lines (the
# final estimate) are lost now and then, more often on a loaded machine (3 runs in 8 on 2 busy cores, measured on
# the test's tiny model). The result does not change between runs, so a run that lost them is simply repeated.
ATTEMPTS = 8


def llama_perplexity(
    model: Path,
    text_file: Path,
    n_ctx: int = 512,
    chunks: int = 40,
    threads: int = 2,
    extra: list[str] | None = None,
    attempts: int = ATTEMPTS,
) -> float:
    """Run ``llama-perplexity`` and return its final PPL estimate.

    It now and then exits 0 without printing the final line (SPEC §7): parse defensively and retry.
    """
    cmd = [
        str(tool("llama-perplexity")),
        "-m",
        str(model),
        "-f",
        str(text_file),
        "-c",
        str(n_ctx),
        "--chunks",
        str(chunks),
        "-t",
        str(threads),
        *(extra or []),
    ]
    out = None
    for _ in range(attempts):
        out = subprocess.run(cmd, capture_output=True, text=True)
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
        if m:
            return float(m.group(1))
    tail = (out.stderr or "")[-2000:] if out else ""
    raise RuntimeError(f"llama-perplexity printed no final estimate after {attempts} attempts:\n{tail}")


_KLD_PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([0-9.]+)",
    "kld_mean": r"Mean\s+KLD:\s*([0-9.]+)",
    "kld_median": r"Median\s+KLD:\s*([0-9.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s*([0-9.]+)",
    "kld_max": r"Maximum KLD:\s*([0-9.]+)",
    "same_top_p": r"Same top p:\s*([0-9.]+)",
}


# a per-chunk line of --kl-divergence: chunk, PPL ± u, ln(PPL(Q)/PPL(base)) ± u, KLD ± u, ... (running means)
_KLD_CHUNK = re.compile(r"^\s*(\d+)\s+\S+\s+±\s+\S+\s+\S+\s+±\s+\S+\s+(-?[0-9.]+)\s+±", re.MULTILINE)


def kld_chunks(log: str) -> list[float]:
    """Per-chunk mean KLD from llama-perplexity's per-chunk lines, which print the running mean over chunks
    1..i (5 decimals): chunk i's own mean is ``i * m_i - (i - 1) * m_(i-1)``, exact up to that rounding
    (|error| <= 1e-5 * i), and the chunks' mean is ``m_n`` again."""
    running = [(int(m.group(1)), float(m.group(2))) for m in _KLD_CHUNK.finditer(log)]
    if [i for i, _ in running] != list(range(1, len(running) + 1)):
        raise RuntimeError(f"llama-perplexity's per-chunk KLD lines are not chunks 1..n: {[i for i, _ in running]}")
    out, prev = [], 0.0
    for i, m in running:
        out.append(i * m - (i - 1) * prev)
        prev = m
    return out


def _run_tool(cmd: list[str], attempts: int, done: str) -> str:
    out = None
    for _ in range(attempts):
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode == 0 and re.search(done, out.stdout + out.stderr):
            return out.stdout + out.stderr
    tail = ((out.stdout or "") + (out.stderr or ""))[-2000:] if out else ""
    raise RuntimeError(f"{Path(cmd[0]).name} did not finish ({attempts} attempts, exit {out.returncode}):\n{tail}")


def llama_kld_base(
    fp_model: Path, text_file: Path, base_file: Path, n_ctx: int = 512, chunks: int = 10, threads: int = 2
) -> float:
    """Write llama-perplexity's KL-divergence base file (the FP model's logits) and return the FP perplexity."""
    cmd = [str(tool("llama-perplexity")), "-m", str(fp_model), "-f", str(text_file), "-c", str(n_ctx)]
    cmd += ["--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", str(base_file)]
    log = _run_tool(cmd, ATTEMPTS, r"Final estimate: PPL = ")
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))


def llama_kld(model: Path, base_file: Path, threads: int = 2) -> dict[str, float | list[str]]:
    """Run ``llama-perplexity --kl-divergence`` of ``model`` against a base file; llama.cpp's own KLD figures.

    Returns ppl (of ``model``), ppl_base, kld_mean, kld_median, kld_p99, kld_max, same_top_p (fraction),
    ``kld_chunks`` (per-chunk means, :func:`kld_chunks`, for paired statistics) and ``warnings``: every log line
    of the run that warns or errors (an exported file should produce none).
    """
    cmd = [str(tool("llama-perplexity")), "-m", str(model), "--kl-divergence-base", str(base_file)]
    cmd += ["--kl-divergence", "-t", str(threads)]
    log = _run_tool(cmd, ATTEMPTS, r"Same top p:")  # the last line read: a run that lost it is repeated
    res: dict[str, float | list[str]] = {}
    for key, pat in _KLD_PATTERNS.items():
        m = re.search(pat, log)
        if m is None:
            raise RuntimeError(f"llama-perplexity --kl-divergence printed no {key!r} line:\n{log[-2000:]}")
        res[key] = float(m.group(1))
    res["same_top_p"] = float(res["same_top_p"]) / 100.0
    res["kld_chunks"] = kld_chunks(log)
    res["warnings"] = [ln for ln in log.splitlines() if re.search(r"\bwarn|\berror|failed", ln, re.IGNORECASE)]
    return res


# --------------------------------------------------------------------- the tools as subprocesses


def llama_quantize(
    src_gguf: str | Path,
    out_gguf: str | Path,
    preset: str,
    imatrix_path: str | Path | None = None,
    extra_args: Sequence[str] = (),
    threads: int = 2,
) -> Path:
    """Run the real ``llama-quantize`` (``--allow-requantize``: the SmolLM2 source is Q4_1); atomic output."""
    from ramp.presets import LLAMA_PRESETS

    if preset not in LLAMA_PRESETS:
        raise ValueError(f"unknown llama.cpp preset {preset!r}; expected one of {', '.join(LLAMA_PRESETS)}")
    src, out = Path(src_gguf), Path(out_gguf)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such GGUF file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        cmd = [str(tool("llama-quantize")), "--allow-requantize"]
        if imatrix_path is not None:
            cmd += ["--imatrix", str(imatrix_path)]
        cmd += [*extra_args, str(src), str(tmp), preset, str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not Path(tmp).exists():
            raise RuntimeError(f"llama-quantize {preset} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return out


def llama_imatrix(
    model_gguf: str | Path,
    text_file: str | Path,
    out_path: str | Path,
    chunks: int = 40,
    n_ctx: int = 512,
    threads: int = 2,
) -> Path:
    """Run the real ``llama-imatrix`` over ``chunks`` windows of ``n_ctx`` tokens of ``text_file`` (GGUF output)."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        cmd = [
            str(tool("llama-imatrix")),
            *("-m", str(model_gguf), "-f", str(text_file), "-o", str(tmp)),
            *("--chunks", str(chunks), "-c", str(n_ctx), "-t", str(threads), "--no-ppl"),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not Path(tmp).exists():
            raise RuntimeError(f"llama-imatrix failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return out


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> type name, read back with gguf-py."""
    from ramp.models.loader import read_gguf

    return {t.name: t.tensor_type.name for t in read_gguf(Path(path)).tensors}


def llama_presets(
    src_gguf: str | Path,
    out_dir: str | Path,
    presets: Iterable[str] = ("Q2_K", "Q3_K_M", "Q4_0", "IQ4_NL", "Q4_K_S", "Q4_K_M"),
    imatrix_path: str | Path | None = None,
    threads: int = 2,
) -> dict[str, Path]:
    """preset -> GGUF made by ``llama-quantize`` from ``src_gguf`` into ``out_dir`` (reused when present).

    File names carry ``-imatrix`` when an imatrix is used; delete ``out_dir`` to rebuild.
    """
    out_dir = Path(out_dir)
    stem = Path(src_gguf).stem
    tag = "-imatrix" if imatrix_path is not None else ""
    made = {}
    for p in tqdm(list(presets), desc="llama-quantize", unit="preset", leave=False):
        out = out_dir / f"{stem}.{p}{tag}.gguf"
        if not out.exists():
            llama_quantize(src_gguf, out, p, imatrix_path, threads=threads)
        made[p] = out
    return made
