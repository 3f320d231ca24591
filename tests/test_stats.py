"""Paired bootstrap intervals and llama-perplexity's per-chunk KLD lines."""

import numpy as np
import pytest

from ramp.llamacpp import kld_chunks
from ramp.stats import paired_bootstrap


def test_paired_bootstrap_excludes_zero_only_for_a_real_difference():
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 0.05, size=40)  # chunk-to-chunk spread far larger than the difference
    better = base * 0.9
    mean, lo, hi = paired_bootstrap(better, base)
    assert mean == pytest.approx(float((better - base).mean()))
    assert lo < mean < hi < 0  # pairing removes the chunk spread: a 10 % win is clear
    noise = base + rng.normal(0.0, 0.01, size=40)
    _, lo2, hi2 = paired_bootstrap(noise, base)
    assert lo2 < 0 < hi2
    assert paired_bootstrap(better, base) == (mean, lo, hi)  # seeded
    with pytest.raises(ValueError, match="equal 1-D lengths"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_kld_chunks_from_running_means():
    log = "\n".join(
        [
            "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS  x",
            "   1      13.5211 ±    2.6573      -0.00158 ±    0.00838       0.01000 ±    0.00111     2.560 ±  0.187 %"
            "    96.078 ±  1.217 %",
            "   2      14.0000 ±    2.0000       0.00100 ±    0.00500       0.02000 ±    0.00100     2.000 ±  0.100 %"
            "    95.000 ±  1.000 %",
            "   3      14.0000 ±    2.0000       0.00100 ±    0.00500       0.02000 ±    0.00100     2.000 ±  0.100 %"
            "    95.000 ±  1.000 %",
        ]
    )
    assert kld_chunks(log) == pytest.approx([0.01, 0.03, 0.02])
    with pytest.raises(RuntimeError, match="not chunks 1..n"):
        kld_chunks(log.replace("\n   2 ", "\n   7 "))
