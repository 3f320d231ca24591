"""Calibration: activation statistics at the input of every quantizable matrix (SPEC §2 ``calibrate``, §4).

``calibration_tokens`` cuts a text into non-overlapping windows of ``n_ctx`` tokens (BOS replaces each
window's first token when the model adds one, as ``llama-imatrix`` and ``llama-perplexity`` do).
``calibrate`` runs the fp32 model over them block by block (:func:`ramp.models.stream.block_forward`) with
forward pre-hooks on each matrix's ``nn.Linear`` and
accumulates, in float64, per input channel: sum of squares, sum, max |x| and the token count; per matrix: the
raw moments of all activation values (for RMS and kurtosis) and the largest |x|.

On-disk layout written by :func:`save_stats` into a folder:

``stats.parquet`` — one row per matrix, in model order:

==============  =======  ==========================================================================
column          type     meaning
==============  =======  ==========================================================================
gguf_name       string   GGUF tensor name (``blk.N.attn_q.weight``)
hf_name         string   transformers parameter name of the weight
block           int32    block index
role            string   q, k, v, o, gate, up, down
cols            int32    input features (GGUF row length)
n_tokens        int64    tokens seen by this matrix
act_rms         float64  RMS of all input activation values
act_max         float64  max |x| over all input activation values
act_crest       float64  act_max / act_rms
act_kurtosis    float64  Pearson kurtosis E[(x-mu)^4] / Var(x)^2 of all values (3 for a Gaussian)
outlier_frac    float64  fraction of input channels whose RMS > 6 x the median channel RMS
sum_x           float64  sum of all values (raw moment 1, kept so that stats can be merged)
sum_x2 .. x4    float64  sums of x^2, x^3, x^4 over all values
==============  =======  ==========================================================================

Schema metadata (Parquet key ``ramp``): JSON ``{"n_seq", "n_ctx", "source"}``.

``channels.safetensors`` — float64 vectors ``[cols]`` per matrix: ``<gguf_name>.sum_sq``,
``<gguf_name>.sum``, ``<gguf_name>.max_abs``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.numpy import load_file, save_file

from ramp.errors import RampError
from ramp.io import atomic_path
from ramp.models.loader import LoadedModel, MatrixInfo
from ramp.models.stream import block_forward

log = logging.getLogger(__name__)

OUTLIER_FACTOR = 6.0  # SPEC §4: an outlier channel has RMS > 6 x the median channel RMS
STATS_FILE = "stats.parquet"
CHANNELS_FILE = "channels.safetensors"
CHANNEL_KEYS = ("sum_sq", "sum", "max_abs")
TABLE_COLUMNS = (
    "gguf_name",
    "hf_name",
    "block",
    "role",
    "cols",
    "n_tokens",
    "act_rms",
    "act_max",
    "act_crest",
    "act_kurtosis",
    "outlier_frac",
    "sum_x",
    "sum_x2",
    "sum_x3",
    "sum_x4",
)


class CalibrationError(RampError, ValueError):
    """Calibration input that cannot be used (too little text, non-finite activations, missing stats)."""


def calibration_tokens(lm: LoadedModel, text: str, n_tokens: int, n_ctx: int) -> torch.Tensor:
    """``LongTensor[n_tokens // n_ctx, n_ctx]``: the first ``n_tokens`` tokens of ``text`` as windows.

    ``n_tokens`` must be a positive multiple of ``n_ctx`` (both in tokens). The text is tokenized without
    special tokens; when ``lm.add_bos`` the first token of every window is replaced by BOS.
    """
    if n_ctx <= 0 or n_tokens <= 0 or n_tokens % n_ctx:
        raise CalibrationError(
            f"n_tokens={n_tokens} must be a positive multiple of n_ctx={n_ctx} (whole windows of tokens)"
        )
    if lm.tokenizer is None:
        raise CalibrationError(f"{lm.source}: the model has no tokenizer; pass token windows to calibrate()")
    if not text or not text.strip():
        raise CalibrationError(f"calibration text is empty; {n_tokens} tokens were requested")
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < n_tokens:
        raise CalibrationError(
            f"calibration text has {len(ids)} tokens, fewer than the {n_tokens} requested "
            f"({n_tokens // n_ctx} windows of {n_ctx})"
        )
    windows = torch.tensor(ids[:n_tokens], dtype=torch.long).reshape(n_tokens // n_ctx, n_ctx)
    if lm.add_bos:
        bos = lm.tokenizer.bos_token_id
        if bos is None:
            raise CalibrationError(f"{lm.source}: the model adds BOS but its tokenizer has no bos_token_id")
        windows[:, 0] = bos
    return windows


@dataclass
class _Accumulator:
    """float64 running sums for one matrix input."""

    cols: int
    sum_sq: torch.Tensor = field(init=False)
    sum: torch.Tensor = field(init=False)
    max_abs: torch.Tensor = field(init=False)
    count: int = 0
    moments: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # sums of x, x^2, x^3, x^4

    def __post_init__(self) -> None:
        self.sum_sq = torch.zeros(self.cols, dtype=torch.float64)
        self.sum = torch.zeros(self.cols, dtype=torch.float64)
        self.max_abs = torch.zeros(self.cols, dtype=torch.float64)


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, list[float]]:
    """Per-channel sum of squares, sum, max |x| and per-tensor raw moments of ``x[..., cols]`` (float64)."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    x2 = x * x
    sum_sq = x2.sum(0)
    moments = [float(x.sum()), float(sum_sq.sum()), float((x2 * x).sum()), float((x2 * x2).sum())]
    return sum_sq.cpu(), x.sum(0).cpu(), x.abs().amax(0).cpu(), x.shape[0], moments


@dataclass
class CalibrationStats:
    """Activation statistics of every quantizable matrix input (see the module docstring for the schema)."""

    table: pd.DataFrame
    sum_sq: dict[str, np.ndarray]  # gguf_name -> float64[cols], sum of x^2 per input channel
    sum: dict[str, np.ndarray]  # gguf_name -> float64[cols], sum of x per input channel
    max_abs: dict[str, np.ndarray]  # gguf_name -> float64[cols], max |x| per input channel
    count: dict[str, int]  # gguf_name -> tokens seen
    meta: dict[str, Any] = field(default_factory=dict)

    def imatrix(self) -> dict[str, np.ndarray]:
        """Mean squared activation per input column (float32), what ``llama-imatrix`` computes."""
        return {k: (v / self.count[k]).astype(np.float32) for k, v in self.sum_sq.items()}

    def row(self, gguf_name: str) -> pd.Series:
        rows = self.table[self.table.gguf_name == gguf_name]
        if rows.empty:
            raise CalibrationError(f"no calibration statistics for matrix {gguf_name!r}")
        return rows.iloc[0]


def _summary(m: MatrixInfo, acc: _Accumulator) -> dict[str, Any]:
    n = acc.count * acc.cols
    s1, s2, s3, s4 = acc.moments
    mean = s1 / n
    var = max(s2 / n - mean * mean, 0.0)
    # Central fourth moment from raw moments (float64 sums).
    m4 = s4 / n - 4 * mean * s3 / n + 6 * mean * mean * s2 / n - 3 * mean**4
    rms = math.sqrt(s2 / n)
    act_max = float(acc.max_abs.max())
    chan_rms = torch.sqrt(acc.sum_sq / acc.count)
    median = float(chan_rms.median())
    outliers = float((chan_rms > OUTLIER_FACTOR * median).double().mean()) if median > 0 else 0.0
    return {
        "gguf_name": m.gguf_name,
        "hf_name": m.hf_name,
        "block": m.block,
        "role": m.role,
        "cols": m.shape[1],
        "n_tokens": acc.count,
        "act_rms": rms,
        "act_max": act_max,
        "act_crest": act_max / rms if rms > 0 else float("nan"),
        "act_kurtosis": m4 / (var * var) if var > 0 else float("nan"),
        "outlier_frac": outliers,
        "sum_x": s1,
        "sum_x2": s2,
        "sum_x3": s3,
        "sum_x4": s4,
    }


def _linear_for(lm: LoadedModel, m: MatrixInfo) -> torch.nn.Module:
    module_name = m.hf_name.removesuffix(".weight")
    try:
        return lm.model.get_submodule(module_name)
    except AttributeError as e:
        raise CalibrationError(f"{lm.source}: no module {module_name!r} for matrix {m.gguf_name}") from e


@torch.inference_mode()
def calibrate(lm: LoadedModel, tokens: torch.Tensor, batch_size: int = 4) -> CalibrationStats:
    """Run the model over ``tokens[n_seq, n_ctx]`` and collect input statistics of every quantizable matrix.

    Raises :class:`CalibrationError` naming the matrix when an activation is NaN/Inf.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise CalibrationError(f"tokens must be a non-empty [n_seq, n_ctx] tensor, got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise CalibrationError(f"batch_size={batch_size} must be >= 1")
    matrices = lm.matrices()
    accs = {m.gguf_name: _Accumulator(m.shape[1]) for m in matrices}
    # q/k/v (and gate/up) read the same tensor object: compute its stats once. The cache holds the tensor
    # itself, so its memory cannot be reused by another tensor while cached.
    cache: dict[str, Any] = {}

    def hook_for(m: MatrixInfo):  # noqa: ANN202
        acc = accs[m.gguf_name]

        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if cache.get("x") is not x:
                cache["x"], cache["stats"] = x, _batch_stats(x)
            sum_sq, s, mx, n, moments = cache["stats"]
            if not (math.isfinite(moments[1]) and math.isfinite(moments[3])):
                raise CalibrationError(f"non-finite activations (NaN/Inf) at the input of {m.gguf_name} ({m.hf_name})")
            acc.sum_sq += sum_sq
            acc.sum += s
            torch.maximum(acc.max_abs, mx, out=acc.max_abs)
            acc.count += n
            for i in range(4):
                acc.moments[i] += moments[i]

        return hook

    handles = [_linear_for(lm, m).register_forward_pre_hook(hook_for(m)) for m in matrices]
    # The decoder stack alone, block by block (one block's weights in memory for a lazy model): the LM head is not
    # a quantizable matrix and its logits are not needed. Each matrix still sees the batches in order.
    try:
        block_forward(lm.model, lm.store, tokens, batch_size, desc="calibrate", after_block=lambda _: cache.clear())
    finally:
        for h in handles:
            h.remove()
    missing = [m.gguf_name for m in matrices if accs[m.gguf_name].count == 0]
    if missing:
        raise CalibrationError(f"matrices never called during calibration: {missing[:5]}")
    table = pd.DataFrame([_summary(m, accs[m.gguf_name]) for m in matrices], columns=list(TABLE_COLUMNS))
    table = table.astype({"block": "int32", "cols": "int32", "n_tokens": "int64"})
    return CalibrationStats(
        table=table,
        sum_sq={k: a.sum_sq.numpy() for k, a in accs.items()},
        sum={k: a.sum.numpy() for k, a in accs.items()},
        max_abs={k: a.max_abs.numpy() for k, a in accs.items()},
        count={k: a.count for k, a in accs.items()},
        meta={"n_seq": int(tokens.shape[0]), "n_ctx": int(tokens.shape[1]), "source": str(lm.source)},
    )


_ARROW_TYPES = {"block": pa.int32(), "cols": pa.int32(), "n_tokens": pa.int64()}


def save_stats(stats: CalibrationStats, directory: str | Path) -> Path:
    """Write ``stats.parquet`` and ``channels.safetensors`` into ``directory`` (created), each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{k}.{c}": getattr(stats, c)[k].astype(np.float64) for k in stats.sum_sq for c in CHANNEL_KEYS}
    with atomic_path(directory / CHANNELS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"ramp": json.dumps(stats.meta, sort_keys=True)})
    fields = [
        pa.field(c, _ARROW_TYPES.get(c, pa.string() if c in ("gguf_name", "hf_name", "role") else pa.float64()))
        for c in TABLE_COLUMNS
    ]
    schema = pa.schema(fields, metadata={"ramp": json.dumps(stats.meta, sort_keys=True)})
    table = pa.Table.from_pandas(stats.table[list(TABLE_COLUMNS)], schema=schema, preserve_index=False)
    with atomic_path(directory / STATS_FILE) as tmp:
        pq.write_table(table, tmp)
    return directory


def load_stats(directory: str | Path) -> CalibrationStats:
    """Read what :func:`save_stats` wrote; raises :class:`CalibrationError` on missing files or entries."""
    directory = Path(directory)
    for name in (STATS_FILE, CHANNELS_FILE):
        if not (directory / name).exists():
            raise CalibrationError(f"{directory / name} does not exist (expected the output of save_stats)")
    arrow = pq.read_table(directory / STATS_FILE)
    missing = [c for c in TABLE_COLUMNS if c not in arrow.column_names]
    if missing:
        raise CalibrationError(f"{directory / STATS_FILE}: missing columns {missing}")
    meta = json.loads((arrow.schema.metadata or {}).get(b"ramp", b"{}"))
    table = arrow.to_pandas()
    tensors = load_file(str(directory / CHANNELS_FILE))
    vectors: dict[str, dict[str, np.ndarray]] = {c: {} for c in CHANNEL_KEYS}
    for name in table.gguf_name:
        for c in CHANNEL_KEYS:
            key = f"{name}.{c}"
            if key not in tensors:
                raise CalibrationError(f"{directory / CHANNELS_FILE}: missing vector {key!r}")
            vectors[c][name] = tensors[key]
    return CalibrationStats(
        table=table,
        sum_sq=vectors["sum_sq"],
        sum=vectors["sum"],
        max_abs=vectors["max_abs"],
        count={n: int(c) for n, c in zip(table.gguf_name, table.n_tokens, strict=True)},
        meta=meta,
    )
