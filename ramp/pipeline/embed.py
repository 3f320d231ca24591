"""Stage embed: the 11-feature layer embedding of every quantizable matrix (SPEC §4) -> ``data/embed/``."""

from __future__ import annotations

import logging
from typing import Any

from ramp.io import atomic_dir
from ramp.params import EmbedParams
from ramp.pipeline.workspace import Timer, Workspace

log = logging.getLogger("ramp.pipeline.embed")


def embed(params: EmbedParams, ws: Workspace) -> dict[str, Any]:
    """``data/embed/embedding.parquet`` from the calibrate stage's model and stats; returns the stage metrics."""
    from ramp.calib import load_stats
    from ramp.features import FEATURES, layer_embedding
    from ramp.models.loader import load_model

    ws.begin("embed")
    timer = Timer()
    lm = load_model(ws.model_path(), with_tokenizer=False, lazy=True)  # one matrix read at a time
    stats = load_stats(ws.stage("calibrate") / "stats")
    table = layer_embedding(lm, stats, stats.imatrix())
    missing = [c for c in ("gguf_name", *FEATURES) if c not in table.columns]
    if missing:
        raise ValueError(f"layer_embedding returned no column(s) {missing}")
    with atomic_dir(ws.stage("embed")) as tmp:
        table.to_parquet(tmp / "embedding.parquet", index=False)
    log.info("embed done in %.1f s: %d matrices x %d features", timer.seconds, len(table), len(FEATURES))
    return ws.write_metrics(
        "embed",
        {
            "matrices": len(table),
            "features": len(FEATURES),
            **{f"mean_{c}": float(table[c].mean()) for c in FEATURES},
            "seconds": timer.seconds,
        },
    )
