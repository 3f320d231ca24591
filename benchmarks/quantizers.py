"""Benchmark RAMP's quantizers against ggml's own (``ggml_quantize_chunk`` in libggml-base).

For every registered quantization choice (``ramp.formats.QUANT_CHOICES``), in one run:

* ``identical_blocks`` / ``identical_blocks_imatrix``: fraction of blocks whose bytes equal ggml's, without
  and with an importance matrix, over Gaussian, Student-t (df=3) and (if present) real SmolLM2 weights;
* ``rmse_ratio_*``: RMSE of our decoded weights over ggml's decoded weights (both against the float
  weights, in the weights' units), pooled over the no-imatrix and imatrix encodings; ``rmse_ratio`` is
  the mean of the Gaussian and Student-t ratios; exactly 1.0 when the bytes are identical;
* ``throughput_ratio``: weights per second of our encoder over ggml's, the smaller of the no-imatrix and
  imatrix paths, on a 1536 x 1536 Gaussian tensor. Ours run with ``torch.set_num_threads(2)`` (the
  compiled numba encoders of ``ramp.formats.jit`` and the torch ones alike use that many worker threads);
  ggml's ``quantize_chunk`` is single-threaded, so it gets two Python threads on two row halves (ctypes
  releases the GIL). The first call of a compiled encoder (compilation, or loading numba's cache) is
  outside the timed repetitions. Ours is timed on ``QuantFormat.encode`` (the quantizer);
  ``quantize_throughput_ratio`` also counts ``QuantFormat.quantize``'s input validation. Timings are
  medians of interleaved repetitions.

Usage: ``python benchmarks/quantizers.py [--out results/quantizers.json] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from ramp import llamacpp
from ramp.formats import FORMATS, QUANT_CHOICES
from ramp.formats.base import QuantFormat
from ramp.io import atomic_write_text

SEED = 1234
THREADS = 2


def make_weights(rows: int, cols: int, seed: int = SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gaussian": (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32),
        "student_t": (rng.standard_t(3, (rows, cols)) * 0.02).astype(np.float32),
    }


def make_imatrix(cols: int, seed: int = SEED + 1) -> np.ndarray:
    """Positive importances spread over about four orders of magnitude (log-normal, sigma 1.5)."""
    rng = np.random.default_rng(seed)
    return np.exp(rng.standard_normal(cols) * 1.5).astype(np.float32)


def real_weights(limit: int) -> tuple[dict[str, np.ndarray], str | None]:
    """A few SmolLM2 ``ffn_down`` matrices (row length 1536), dequantized from the asset GGUF."""
    try:
        from ramp.assets import smollm2_gguf_path

        path = smollm2_gguf_path()
    except Exception as exc:  # missing manifest or loader: skip real weights with a note
        return {}, f"real weights skipped: {exc}"
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        if t.name.endswith("ffn_down.weight") and len(out) < limit:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.ascontiguousarray(w.reshape(-1, int(t.shape[0])), dtype=np.float32)
            if w.shape[1] % 256 == 0:
                out[t.name] = w
    return out, None if out else f"real weights skipped: no ffn_down tensor with row length % 256 == 0 in {path}"


def ggml_two_threads(fmt: QuantFormat, w: np.ndarray, im: np.ndarray | None) -> np.ndarray:
    """ggml's quantizer on two row halves in two threads (the C call releases the GIL)."""
    half = w.shape[0] // 2
    parts = [w[:half], w[half:]]
    res: list[np.ndarray | None] = [None, None]

    def run(i: int) -> None:
        res[i] = llamacpp.ggml_quantize(fmt.type_id, parts[i], im)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.concatenate(res)


def encode_call(fmt: QuantFormat, w: np.ndarray, im: np.ndarray | None) -> Callable[[], torch.Tensor]:
    """Our encoder on prepared inputs, as ``QuantFormat.quantize`` prepares them."""
    rows, cols = w.shape
    nb = cols // fmt.block_size
    x = torch.from_numpy(w).reshape(rows, nb, fmt.block_size)
    qw = None
    if im is not None and fmt.uses_imatrix:
        qw = torch.from_numpy(im).reshape(1, nb, fmt.block_size).expand(rows, nb, fmt.block_size).contiguous()
    return lambda: fmt.encode(x, qw)


def median_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall time of each function, repetitions interleaved so load changes hit all alike."""
    for fn in fns.values():  # warm-up (thread pools, lazy init)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def decoded(fmt: QuantFormat, data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return gguf.quants.dequantize(np.ascontiguousarray(data).view(np.uint8), fmt.ggml_type).reshape(shape)


def compare(fmt: QuantFormat, w: np.ndarray, im: np.ndarray | None) -> tuple[int, int, float, float]:
    """(identical blocks, blocks, our squared error sum, ggml's squared error sum) for one encoding."""
    ours = fmt.quantize(w, im)
    ref = llamacpp.ggml_quantize(fmt.type_id, w, im)
    same = (ours.reshape(-1, fmt.type_size) == ref.reshape(-1, fmt.type_size)).all(1)
    w64 = w.astype(np.float64)
    se_ours = float(((decoded(fmt, ours, w.shape) - w64) ** 2).sum())
    se_ref = float(((decoded(fmt, ref, w.shape) - w64) ** 2).sum())
    return int(same.sum()), int(same.size), se_ours, se_ref


def ratio(a: float, b: float) -> float:
    return 1.0 if a == b else (a / b if b > 0 else float("inf"))


def bench_format(
    fmt: QuantFormat, weights: dict[str, np.ndarray], real: dict[str, np.ndarray], im: np.ndarray, reps: int
) -> dict:
    ident = {False: [0, 0], True: [0, 0]}
    rmse: dict[str, float | None] = {}
    for group, tensors in (
        ("gaussian", {"g": weights["gaussian"]}),
        ("student_t", {"t": weights["student_t"]}),
        ("real", real),
    ):
        se_ours = se_ref = 0.0
        for w in tensors.values():
            cols = w.shape[1]
            imx = im if cols == im.size else make_imatrix(cols)
            for use_im in (False, True):
                same, n, so, sr = compare(fmt, w, imx if use_im else None)
                ident[use_im][0] += same
                ident[use_im][1] += n
                se_ours += so
                se_ref += sr
        rmse[group] = float(np.sqrt(ratio(se_ours, se_ref))) if tensors else None

    w = weights["gaussian"]
    nweights = w.size
    timing = {}
    for use_im in (False, True):
        imx = im if use_im else None
        t = median_times(
            {
                "ours": encode_call(fmt, w, imx),
                "quantize": lambda imx=imx: fmt.quantize(w, imx),
                "ggml": lambda imx=imx: ggml_two_threads(fmt, w, imx),
            },
            reps,
        )
        timing[use_im] = t
    path_ratio = {k: v["ggml"] / v["ours"] for k, v in timing.items()}
    quantize_ratio = {k: v["ggml"] / v["quantize"] for k, v in timing.items()}
    return {
        "identical_blocks": ident[False][0] / ident[False][1],
        "identical_blocks_imatrix": ident[True][0] / ident[True][1],
        "rmse_ratio": (rmse["gaussian"] + rmse["student_t"]) / 2,
        "rmse_ratio_gaussian": rmse["gaussian"],
        "rmse_ratio_student_t": rmse["student_t"],
        "rmse_ratio_real": rmse["real"],
        "throughput_ratio": min(path_ratio.values()),
        "throughput_ratio_no_imatrix": path_ratio[False],
        "throughput_ratio_imatrix": path_ratio[True],
        "quantize_throughput_ratio": min(quantize_ratio.values()),
        "ours_mweights_per_s": nweights / timing[False]["ours"] / 1e6,
        "ggml_mweights_per_s": nweights / timing[False]["ggml"] / 1e6,
        "ours_mweights_per_s_imatrix": nweights / timing[True]["ours"] / 1e6,
        "ggml_mweights_per_s_imatrix": nweights / timing[True]["ggml"] / 1e6,
        "blocks_compared": ident[False][1],
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, python "
        f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"load average {load:.2f} at start"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/quantizers.json", help="JSON output path")
    ap.add_argument("--quick", action="store_true", help="smaller tensors and fewer repetitions")
    ap.add_argument("--formats", default="", help="comma-separated subset of formats (default: all)")
    args = ap.parse_args(argv)

    if not llamacpp.is_built():
        print("llama.cpp is not built; run `make llama-cpp` first", file=sys.stderr)
        return 2
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    rows, cols = (512, 1536) if args.quick else (1536, 1536)
    reps = 3 if args.quick else 7
    wanted = [n for n in QUANT_CHOICES if not args.formats or n in args.formats.upper().split(",")]
    present = [n for n in wanted if n in FORMATS]
    missing = [n for n in wanted if n not in FORMATS]
    if missing:
        print(f"not registered yet (skipped): {', '.join(missing)}")

    weights = make_weights(rows, cols)
    im = make_imatrix(cols)
    real, note = real_weights(limit=2 if args.quick else 4)
    if note:
        print(note)

    results = {}
    for name in tqdm(present, desc="formats", unit="format"):
        results[name] = bench_format(FORMATS[name], weights, real, im, reps)

    print(
        f"\n{'format':8s} {'ident':>8s} {'ident_im':>8s} {'rmse':>7s} {'rmse_g':>7s} {'rmse_t':>7s} {'rmse_r':>7s} "
        f"{'thr':>6s} {'thr_ref':>7s} {'thr_im':>6s} {'ours M/s':>9s} {'ggml M/s':>9s}"
    )
    for name, r in results.items():
        real_s = "-" if r["rmse_ratio_real"] is None else f"{r['rmse_ratio_real']:.4f}"
        print(
            f"{name:8s} {r['identical_blocks']:8.4f} {r['identical_blocks_imatrix']:8.4f} {r['rmse_ratio']:7.4f} "
            f"{r['rmse_ratio_gaussian']:7.4f} {r['rmse_ratio_student_t']:7.4f} {real_s:>7s} "
            f"{r['throughput_ratio']:6.2f} {r['throughput_ratio_no_imatrix']:7.2f} "
            f"{r['throughput_ratio_imatrix']:6.2f} {r['ours_mweights_per_s']:9.1f} {r['ggml_mweights_per_s']:9.1f}"
        )

    doc = {
        "formats": results,
        "skipped_formats": missing,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "seed": SEED,
            "tensor_shape": [rows, cols],
            "repetitions": reps,
            "torch_threads": THREADS,
            "ggml_threads": "2 Python threads, one ggml_quantize_chunk call per row half (GIL released)",
            "ours_timed": "QuantFormat.encode on prepared blocks; quantize_throughput_ratio adds quantize()'s "
            "validation",
            "imatrix": "log-normal, sigma 1.5 (about four orders of magnitude)",
            "real_weights": sorted(real) if real else note,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
