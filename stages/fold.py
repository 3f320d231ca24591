"""Stage fold: Scale Folding (SPEC §5) of the model, checked against the original logits.

Reads params ``fold``. Reads ``data/calibrate/`` (model, stats, imatrix, tokens). Writes ``data/fold/``
(``model.safetensors``: the folded fp32 weights with their config, ``report.parquet``,
``imatrix.safetensors``: the imatrix of the folded weights, ``imatrix.dat`` in llama.cpp's format) and
``data/metrics/fold.json`` (``max_logit_diff``: max |logit| difference folded vs original on calibration
windows; folding is exact in real arithmetic, so this is fp32 rounding only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from stages._common import DATA, Timer, atomic_dir, load_params, model_path, setup_logging, write_metrics

log = logging.getLogger("stages.fold")
OUT = DATA / "fold"
CHECK_WINDOWS = 2  # calibration windows on which folded and original logits are compared


@dataclass(frozen=True)
class FoldParams:
    """``alpha``: migration strength a of s_j = max|X_j|^a / max|W_:,j|^(1-a); ``enabled: false`` copies the model."""

    enabled: bool
    alpha: float
    max_logit_diff: float  # fail the stage if folding changes any logit by more than this

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")


def main() -> None:
    setup_logging()
    timer = Timer()
    params = load_params("fold", FoldParams)

    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    from ramp.calib import load_stats
    from ramp.folding import fold_model, folded_imatrix, save_folded
    from ramp.imatrix import write_imatrix
    from ramp.models.loader import load_model

    lm = load_model(model_path())
    stats = load_stats(DATA / "calibrate" / "stats")
    imatrix = stats.imatrix()
    all_tokens = load_file(str(DATA / "calibrate" / "tokens.safetensors"))["tokens"]
    tokens = all_tokens[:CHECK_WINDOWS]
    with torch.inference_mode():
        before = lm.model(input_ids=tokens).logits
    if params.enabled:
        result = fold_model(lm, stats, params.alpha)
        report = result.report
        imatrix = folded_imatrix(imatrix, result.scales)
    else:
        import pandas as pd

        report = pd.DataFrame({"gguf_name": [m.gguf_name for m in lm.matrices()]})
    with torch.inference_mode():
        diff = float((lm.model(input_ids=tokens).logits - before).abs().max())
    log.info("fold (enabled=%s, alpha=%.2f): max |logit diff| %.3g", params.enabled, params.alpha, diff)
    if diff > params.max_logit_diff:
        raise ValueError(
            f"folded model changes logits by {diff:.3g} > max_logit_diff {params.max_logit_diff}: folding is not exact"
        )
    with atomic_dir(OUT) as tmp:
        save_folded(lm, tmp / "model.safetensors", extra={"alpha": params.alpha, "enabled": params.enabled})
        report.to_parquet(tmp / "report.parquet", index=False)
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in imatrix.items()}, str(tmp / "imatrix.safetensors")
        )
        write_imatrix(tmp / "imatrix.dat", imatrix, n_chunks=int(all_tokens.shape[0]), dataset="calibrate")
    write_metrics(
        "fold",
        {"enabled": params.enabled, "alpha": params.alpha, "max_logit_diff": diff, "seconds": timer.seconds},
    )
    log.info("fold done in %.1f s -> %s", timer.seconds, OUT)


if __name__ == "__main__":
    main()
