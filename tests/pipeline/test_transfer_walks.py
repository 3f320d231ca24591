"""benchmarks/transfer_walks.py on the tiny pipeline's real outputs: every walk priced, the fit shift, JSON out."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_transfer_walks_prices_every_walk_on_the_measured_table(tiny_pipeline: Path, tmp_path: Path):
    out = tmp_path / "walks.json"
    members = tiny_pipeline / "data" / "train" / "members"
    shutil.copytree(tiny_pipeline / "data" / "train" / "policy", members / "seed0")  # as an ensemble's train has
    try:
        run = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "transfer_walks.py"), "--workspace", str(tiny_pipeline)]
            + ["--out", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(members)
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    costs = doc["additive_measured_kld"]
    walks = [k for k in costs if " walk, " in k]
    assert len(walks) == 8 and "sensitivity-knapsack (measured)" in costs and "uniform-fill (proxy)" in costs
    assert all(math.isfinite(v) and v >= 0 for v in costs.values())
    assert doc["fit_shift"] <= 0 and doc["training_walk_spend"] > 0
    # a walk that fits without the wall is not shifted, and the wall then clamps nothing
    assert (doc["fit_shift"] == 0) == (doc["training_walk_spend"] <= 1)
    assert doc["training_walk_spend"] > 1 or doc["training_walk_clamped"] == 0
    assert "additive measured KLD" in run.stdout
    # the measured knapsack's moves away from uniform-fill account for its whole cost difference (additive table)
    oracle = doc["moves_from_uniform_fill"]["sensitivity-knapsack (measured)"]
    gain = costs["sensitivity-knapsack (measured)"] - costs["uniform-fill (proxy)"]
    assert math.isclose(sum(m["kld_change"] for m in oracle), gain, rel_tol=1e-9, abs_tol=1e-12)
    changes = [abs(m["kld_change"]) for m in oracle]
    assert changes == sorted(changes, reverse=True)
    assert "moved from uniform-fill" in run.stdout
    # a member priced alone: here the workspace's own policy, so it walks as the zero-shot walk does
    zero_shot = sum(m["kld_change"] for m in doc["moves_from_uniform_fill"]["zero-shot walk"])
    member = costs["ensemble member seed0, zero-shot walk"]
    assert math.isclose(member, costs["uniform-fill (proxy)"] + zero_shot, rel_tol=1e-9, abs_tol=1e-12)
