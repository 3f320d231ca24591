"""The 11-feature layer embedding of SPEC §4: one row per quantizable matrix, scale-free, then standardised.

Columns of :data:`FEATURES`, in this order:

1. ``act_log_rms``      log RMS of the matrix's input activations (natural log)
2. ``act_crest``        activation crest factor, max |x| / RMS
3. ``act_kurtosis``     Pearson kurtosis of all input activation values (3 for a Gaussian)
4. ``act_outlier_frac`` fraction of input channels whose RMS > 6 x the median channel RMS
5. ``w_log_std``        log standard deviation of the weights
6. ``w_kurtosis``       Pearson kurtosis of the weights
7. ``w_crest``          weight crest factor, max |W| / RMS(W)
8. ``ref_rel_err``      imatrix-weighted relative quantization error at the reference format (``ref_format``):
                        sum_j im_j sum_i (W - Q(W))_ij^2 / sum_j im_j sum_i W_ij^2, quantized with the imatrix
9. ``depth``            block index / (n_blocks - 1) (0 for a one-block model)
10. ``layer_type``      ROLES index (q,k,v,o,gate,up,down) / 6
11. ``rel_size``        params of this matrix / params of the largest quantizable matrix

Scale behaviour when every quantizable weight is multiplied by c > 0 (activations held fixed): feature 5
shifts by log c; 6, 7, 9, 10, 11 are unchanged exactly; 8 is unchanged up to the rounding of the formats'
fp16 block scales (exactly for c a power of two). Features 2-4 do not depend on the activation scale and
feature 1 shifts by its log.

The reference format is Q3_K where the row length allows K-quants, else Q4_0, else the lowest-bpw legal
format (:data:`REF_FORMATS`); the table records it per matrix in ``ref_format``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ramp.calib import CalibrationStats
from ramp.errors import RampError
from ramp.formats import allowed_formats, get_format
from ramp.models.arch import ROLES
from ramp.models.loader import LoadedModel

FEATURES: tuple[str, ...] = (
    "act_log_rms",
    "act_crest",
    "act_kurtosis",
    "act_outlier_frac",
    "w_log_std",
    "w_kurtosis",
    "w_crest",
    "ref_rel_err",
    "depth",
    "layer_type",
    "rel_size",
)
ID_COLUMNS: tuple[str, ...] = ("gguf_name", "block", "role", "rows", "cols", "params")
REF_FORMATS: tuple[str, ...] = ("Q3_K", "Q4_0")  # first legal one is the 3-bit reference of feature 8


class FeatureError(RampError, ValueError):
    """Inputs the embedding cannot be computed from, or a table that lacks feature columns."""


def reference_format(shape: tuple[int, int]) -> str:
    """The reference format of feature 8 for a ``[rows, cols]`` matrix."""
    for name in REF_FORMATS:
        if get_format(name).is_legal(shape):
            return name
    legal = allowed_formats(shape)
    if not legal:
        raise FeatureError(f"no quantization format is legal for shape {tuple(shape)}")
    return legal[0].name


def weighted_error_terms(weight: torch.Tensor, imatrix: np.ndarray | None, fmt: str) -> tuple[float, float]:
    """(sum_j im_j sum_i (W-Q(W))_ij^2, sum_j im_j sum_i W_ij^2) for ``fmt`` quantized with the imatrix.

    Without an imatrix every column weighs 1.
    """
    w = weight.detach().to(torch.float32).cpu()
    f = get_format(fmt)
    q = f.dequantize(f.quantize(w, imatrix), tuple(w.shape))
    im = torch.ones(w.shape[1], dtype=torch.float64) if imatrix is None else torch.as_tensor(imatrix).double()
    err = ((w.double() - q.double()) ** 2).sum(0)
    ref = (w.double() ** 2).sum(0)
    return float((im * err).sum()), float((im * ref).sum())


def weighted_rel_error(weight: torch.Tensor, imatrix: np.ndarray | None, fmt: str) -> float:
    """Imatrix-weighted relative quantization error of ``weight[rows, cols]`` in ``fmt`` (dimensionless)."""
    num, den = weighted_error_terms(weight, imatrix, fmt)
    if den <= 0:
        raise FeatureError(f"weighted error of an all-zero weight (or zero imatrix) is undefined ({fmt})")
    return num / den


def _weight_stats(w: torch.Tensor) -> tuple[float, float, float]:
    """(log std, Pearson kurtosis, crest factor max|W|/RMS) of a weight, in float64."""
    x = w.detach().double().reshape(-1)
    mean = x.mean()
    c = x - mean
    var = float((c * c).mean())
    if var <= 0:
        raise FeatureError("weight has zero variance; its features are undefined")
    kurt = float((c**4).mean()) / (var * var)
    rms = float(torch.sqrt((x * x).mean()))
    return 0.5 * math.log(var), kurt, float(x.abs().max()) / rms


def layer_embedding(
    lm: LoadedModel,
    stats: CalibrationStats,
    imatrix: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per quantizable matrix: ``ID_COLUMNS``, the 11 :data:`FEATURES`, and ``ref_format``.

    ``imatrix`` defaults to ``stats.imatrix()``. Raises :class:`FeatureError` naming a matrix without
    statistics or with a non-finite feature.
    """
    matrices = lm.matrices()
    imatrix = stats.imatrix() if imatrix is None else imatrix
    table = stats.table.set_index("gguf_name")
    n_blocks = lm.config.num_hidden_layers
    max_params = max(m.params for m in matrices)
    rows = []
    for m in tqdm(matrices, desc="embed", unit="matrix", leave=False, disable=not progress):
        if m.gguf_name not in table.index:
            raise FeatureError(f"no calibration statistics for matrix {m.gguf_name}")
        if m.gguf_name not in imatrix:
            raise FeatureError(f"no imatrix entry for matrix {m.gguf_name}")
        s = table.loc[m.gguf_name]
        w = lm.weight(m.hf_name)  # one matrix at a time (read from the files for a lazy model)
        log_std, w_kurt, w_crest = _weight_stats(w)
        ref = reference_format(m.shape)
        row: dict[str, Any] = {
            "gguf_name": m.gguf_name,
            "block": m.block,
            "role": m.role,
            "rows": m.shape[0],
            "cols": m.shape[1],
            "params": m.params,
            "act_log_rms": math.log(s.act_rms) if s.act_rms > 0 else float("nan"),
            "act_crest": float(s.act_crest),
            "act_kurtosis": float(s.act_kurtosis),
            "act_outlier_frac": float(s.outlier_frac),
            "w_log_std": log_std,
            "w_kurtosis": w_kurt,
            "w_crest": w_crest,
            "ref_rel_err": weighted_rel_error(w, imatrix[m.gguf_name], ref),
            "depth": m.block / (n_blocks - 1) if n_blocks > 1 else 0.0,
            "layer_type": ROLES.index(m.role) / (len(ROLES) - 1),
            "rel_size": m.params / max_params,
            "ref_format": ref,
        }
        bad = [f for f in FEATURES if not math.isfinite(row[f])]
        if bad:
            raise FeatureError(f"{m.gguf_name}: non-finite features {bad}")
        rows.append(row)
    return pd.DataFrame(rows, columns=[*ID_COLUMNS, *FEATURES, "ref_format"])


@dataclass
class Standardizer:
    """Per-feature (x - mean) / std with statistics fitted on the training model(s) (SPEC §4).

    A feature with zero spread in the fitting table (e.g. ``act_outlier_frac`` all 0) gets std 1, so it is only
    centred.
    """

    mean: dict[str, float] | None = None
    std: dict[str, float] | None = None

    @staticmethod
    def _matrix(df: pd.DataFrame) -> np.ndarray:
        missing = [f for f in FEATURES if f not in df.columns]
        if missing:
            raise FeatureError(f"feature table lacks columns {missing}; expected all of {list(FEATURES)}")
        x = df[list(FEATURES)].to_numpy(dtype=np.float64)
        if not np.isfinite(x).all():
            bad = [f for f, ok in zip(FEATURES, np.isfinite(x).all(0), strict=True) if not ok]
            raise FeatureError(f"feature table has non-finite values in {bad}")
        return x

    def fit(self, df: pd.DataFrame) -> Standardizer:
        x = self._matrix(df)
        if x.shape[0] == 0:
            raise FeatureError("cannot fit a standardizer on an empty feature table")
        std = x.std(0)
        self.mean = {f: float(v) for f, v in zip(FEATURES, x.mean(0), strict=True)}
        self.std = {f: float(v) if v > 0 else 1.0 for f, v in zip(FEATURES, std, strict=True)}
        return self

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """``float32[n, 11]`` standardised features in :data:`FEATURES` order."""
        if self.mean is None or self.std is None:
            raise FeatureError("Standardizer is not fitted (call fit() or from_dict())")
        x = self._matrix(df)
        mean = np.array([self.mean[f] for f in FEATURES])
        std = np.array([self.std[f] for f in FEATURES])
        return ((x - mean) / std).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        if self.mean is None or self.std is None:
            raise FeatureError("Standardizer is not fitted")
        return {"features": list(FEATURES), "mean": dict(self.mean), "std": dict(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Standardizer:
        feats = list(d.get("features", []))
        if feats != list(FEATURES):
            raise FeatureError(f"standardizer features {feats} do not match {list(FEATURES)}")
        for key in ("mean", "std"):
            missing = [f for f in FEATURES if f not in d.get(key, {})]
            if missing:
                raise FeatureError(f"standardizer {key!r} lacks {missing}")
        return cls({f: float(d["mean"][f]) for f in FEATURES}, {f: float(d["std"][f]) for f in FEATURES})
