"""Stage embed: the 11-feature layer embedding of every quantizable matrix (SPEC §4).

Reads params ``embed``. Reads ``data/calibrate/`` (model, stats, imatrix). Writes
``data/embed/embedding.parquet`` and ``data/metrics/embed.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from stages._common import DATA, Timer, atomic_dir, load_params, model_path, setup_logging, write_metrics

log = logging.getLogger("stages.embed")
OUT = DATA / "embed"


@dataclass(frozen=True)
class EmbedParams:
    """No knobs yet: the 11 features are fixed by SPEC §4 (feature 8 always uses the calibration imatrix)."""


def main() -> None:
    setup_logging()
    timer = Timer()
    load_params("embed", EmbedParams)  # an unknown key is still an error

    from ramp.calib import load_stats
    from ramp.features import FEATURES, layer_embedding
    from ramp.models.loader import load_model

    lm = load_model(model_path(), with_tokenizer=False)
    stats = load_stats(DATA / "calibrate" / "stats")
    table = layer_embedding(lm, stats, stats.imatrix())
    missing = [c for c in ("gguf_name", *FEATURES) if c not in table.columns]
    if missing:
        raise ValueError(f"layer_embedding returned no column(s) {missing}")
    with atomic_dir(OUT) as tmp:
        table.to_parquet(tmp / "embedding.parquet", index=False)
    write_metrics(
        "embed",
        {
            "matrices": len(table),
            "features": len(FEATURES),
            **{f"mean_{c}": float(table[c].mean()) for c in FEATURES},
            "seconds": timer.seconds,
        },
    )
    log.info("embed done in %.1f s: %d matrices x %d features -> %s", timer.seconds, len(table), len(FEATURES), OUT)


if __name__ == "__main__":
    main()
