"""Peak memory and wall time of every product stage on synthetic bf16 Llamas of 0.13B, 1.1B and 7B shapes (issue 18).

Usage:
  .venv/bin/python benchmarks/scale.py                        # all three shapes -> results/scale.json
  .venv/bin/python benchmarks/scale.py --shapes 0.13B,1.1B --out /tmp/scale.json
  .venv/bin/python benchmarks/scale.py --fold --shapes 0.13B,1.1B --out results/scale_fold.json   # folding on
  .venv/bin/python benchmarks/scale.py --shapes 7B --stages export   # rerun stages in the kept workspace, rows merged

Per shape: the checkpoint from ``benchmarks/synthetic_llama.py`` (built into ``~/.cache/ramp/synthetic/`` when
missing; ~6 min and 13.5 GB for 7B), then the product's own stage scripts (``python -m stages.<name>``, what
``dvc repro`` runs) in a workspace ``~/.cache/ramp/bench/scale/<shape>/`` whose ``params.yaml`` is the repository's
with the overlay below: calibrate -> embed -> fold -> allocate (a policy trained on the tiny model, pulled as the
champion: zero reward evaluations on the target) -> quantize -> export (checked by ``llama-perplexity`` on one
chunk). Every stage is its own process, measured by ``os.wait4``: ``peak_rss_bytes`` is that process's peak
resident memory, including the children it waited for (export's ``llama-perplexity``: reported separately as
``ramp_peak_rss_bytes``, the stage process alone, read from the stage's metrics). ``tokens``: calibration tokens.

The overlay reduces what does not change the memory picture: 2 calibration windows of 512 tokens, the action
space to Q4_0 and Q8_0 (every format costs quantizer time at 7B: ~2 us per weight per format) and the
quantization cache off (at 7B it would write 26 GB of fp32 per format). ``--fold`` runs calibrate -> fold with
Scale Folding enabled (``fold.enabled: true``: the folded fp32 model written block by block, its logits checked
against the original's block by block); rows say ``"fold_enabled": true``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.synthetic_llama import SHAPES, build, config_for  # noqa: E402
from ramp.llamacpp import cache_root  # noqa: E402
from ramp.params import merge  # noqa: E402

log = logging.getLogger("bench-scale")
STAGES = ("calibrate", "embed", "fold", "allocate", "quantize", "export")
OVERLAY: dict[str, Any] = {
    "calibrate": {"n_tokens": 1024, "n_ctx": 512, "batch_size": 1},
    # the Fisher table (fold.fisher_windows, block by block as well) is left out: results/scale.json predates it
    "fold": {"enabled": False, "formats": ["Q4_0", "Q8_0"], "fisher_windows": 0},
    "evaluate": {"knapsack": ["greedy", "uniform"]},  # not run here; none of them reads the Fisher table
    "train": {"rescore_top": 0},  # not run here (the champion allocates); the 2 windows are the reward's
    # no train and no evaluate: no sensitivity stage to measure the embedding in, so llama-quantize's type
    "allocate": {"policy": "champion", "budget_file_bytes": None, "budget_bpw": 5.0, "embedding_type": "auto"},
    "export": {"llama_check": True, "llama_chunks": 1, "llama_n_ctx": 512, "llama_repack": False},
    "cache": {"disk_bytes": 0, "memory_bytes": 0},
    "distributed": {"engine": "local"},
}
# the policy: trained on the tiny model built in code, level action map (a bpw level means the same on any model)
POLICY_OVERLAY: dict[str, Any] = {
    "model": {"source": "tiny"},
    "calibrate": {"n_tokens": 1024, "n_ctx": 128, "batch_size": 4},
    "fold": {"formats": ["Q4_0", "Q8_0"]},
    "train": {
        "budget_file_bytes": None,
        "budget_bpw": 5.0,
        "demos": ["greedy", "uniform"],
        "action_map": "level",
        "reward_windows": 2,
        "rescore_top": 2,  # of the 8 calibration windows: 2 for the reward, 4 to rescore on
        "rescore_windows": 4,
        "top_k": 16,
        "sac": {"episodes": 6, "random_episodes": 2, "batch_size": 16, "hidden": 16, "checkpoint_every": 3,
                "bc_steps": 20},
    },
}  # fmt: skip


def repo_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def tiny_policy(root: Path) -> Path:
    """``root/data/train/policy``: the policy trained by the product's stages on the tiny model (cached)."""
    from ramp.params import load_pipeline
    from ramp.pipeline.run import run_pipeline
    from ramp.pipeline.workspace import Workspace

    params = load_pipeline(REPO / "params.yaml", overlay=POLICY_OVERLAY)
    ws = Workspace(root, cache_disk_bytes=0, cache_memory_bytes=0)
    run_pipeline(params, ws, stages=("calibrate", "embed", "fold", "train"))
    return ws.stage("train") / "policy"


def prepare(shape: str, model: Path, policy: Path | None, fold: bool = False, keep: bool = False) -> Path:
    """The workspace of ``shape`` with this run's params; ``keep``: the earlier run's outputs stay (to rerun some
    stages on them), else it starts empty."""
    root = cache_root() / "bench" / "scale" / (f"{shape}-fold" if fold else shape)
    overlay = merge(OVERLAY, {"fold": {"enabled": True}}) if fold else OVERLAY
    params = merge(repo_params(), {**overlay, "model": {"source": str(model)}})
    if keep:
        if not (root / "data").is_dir():
            raise SystemExit(f"--stages: no earlier run in {root} to rerun stages of")
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "policies" / "champion").mkdir(parents=True)
    if policy is not None:
        shutil.copytree(policy, root / "policies" / "champion" / "policy")
        (root / "policies" / "champion" / "version.txt").write_text("tiny-policy (benchmarks/scale.py)\n")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run_stage(root: Path, stage: str) -> dict[str, Any]:
    from ramp.pipeline.project import project_env

    start = time.perf_counter()
    with open(root / f"{stage}.log", "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}"], cwd=root, env=project_env(), stdout=logf, stderr=logf
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = (root / f"{stage}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"stage {stage} failed (exit {code}) in {root}:\n{tail}")
    metrics = json.loads((root / "data" / "metrics" / f"{stage}.json").read_text())
    return {"peak_rss_bytes": int(usage.ru_maxrss) * 1024, "seconds": round(seconds, 1), "metrics": metrics}


def params_of(shape: str) -> dict[str, int]:
    c = config_for(shape)
    h, f, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    block = 2 * h * h + 2 * kv * h + 3 * h * f + 2 * h
    return {"block": block, "total": n * block + 2 * v * h + h, "layers": n}


def fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Least squares of each stage's peak RSS on the block's and on the whole model's parameter count."""
    import numpy as np

    out: dict[str, Any] = {}
    for stage in STAGES:
        pts = [(params_of(r["shape"]), r["ramp_peak_rss_bytes"]) for r in rows if r["stage"] == stage]
        if len(pts) < 2:
            continue
        rss = np.array([p for _, p in pts], dtype=np.float64)
        block = np.array([s["block"] for s, _ in pts], dtype=np.float64)
        total = np.array([s["total"] for s, _ in pts], dtype=np.float64)
        b1, b0 = np.polyfit(block, rss, 1)
        t1, _ = np.polyfit(total, rss, 1)
        out[stage] = {
            "bytes_per_block_parameter": round(float(b1), 2),
            "intercept_bytes": round(float(b0)),
            "bytes_per_model_parameter_if_linear_in_model": round(float(t1), 3),
            "peak_rss_over_fp32_model_bytes": [round(p / (4 * s["total"]), 3) for s, p in pts],
        }
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    ap.add_argument("--out", default="results/scale.json")
    ap.add_argument("--fold", action="store_true", help="calibrate -> fold with Scale Folding enabled only")
    ap.add_argument(
        "--stages",
        default="",
        help="rerun these stages in the workspaces an earlier run left; rows merged into --out",
    )
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise SystemExit(f"--shapes {bad}: expected among {list(SHAPES)}")
    from ramp.offline import set_offline_env

    set_offline_env()
    stages = ("calibrate", "fold") if args.fold else STAGES
    rerun = [s for s in args.stages.split(",") if s]
    if [s for s in rerun if s not in stages]:
        raise SystemExit(f"--stages {rerun}: expected among {list(stages)}")
    policy = None if args.fold or rerun else tiny_policy(cache_root() / "bench" / "scale" / "policy")
    rows: list[dict[str, Any]] = []
    earlier: dict[str, Any] = {}
    if rerun:
        earlier = json.loads(Path(args.out).read_text())
        rows = [r for r in earlier["rows"] if not (r["shape"] in shapes and r["stage"] in rerun)]
        stages = tuple(s for s in stages if s in rerun)
    llama_7b: dict[str, Any] | None = None
    for shape in shapes:
        t0 = time.perf_counter()
        model = build(shape)
        log.info("%s checkpoint %s (%.0f s)", shape, model, time.perf_counter() - t0)
        root = prepare(shape, model, policy, fold=args.fold, keep=bool(rerun))
        for stage in stages:
            log.info("%s: stage %s", shape, stage)
            r = run_stage(root, stage)
            m = r["metrics"]
            row = {
                "shape": shape,
                "stage": stage,
                "peak_rss_bytes": r["peak_rss_bytes"],
                "ramp_peak_rss_bytes": int(m.get("peak_rss_bytes", r["peak_rss_bytes"])),
                "seconds": r["seconds"],
                "tokens": OVERLAY["calibrate"]["n_tokens"],
                "parameters": params_of(shape)["total"],
            }
            if args.fold:
                row["fold_enabled"] = True
            if rerun:
                row["rerun"] = True
            if stage == "export":
                row["file_bytes"] = m["file_bytes"]
                row["llama_cpp_ppl"] = m.get("llama_cpp_ppl")
                if shape == "7B":
                    ppl = m.get("llama_cpp_ppl")
                    llama_7b = {"ok": ppl is not None and ppl == ppl, "ppl": ppl, "chunks": 1, "n_ctx": 512}
            log.info("%s %-9s peak RSS %.2f GiB (ramp %.2f GiB), %.1f s", shape, stage,
                     row["peak_rss_bytes"] / 2**30, row["ramp_peak_rss_bytes"] / 2**30, row["seconds"])  # fmt: skip
            rows.append(row)
    subset = (" --fold" if args.fold else "") + (f" --shapes {args.shapes}" if args.shapes != ",".join(SHAPES) else "")
    subset += f" --stages {args.stages}" if rerun else ""
    order = {(sh, st): i for i, (sh, st) in enumerate((sh, st) for sh in SHAPES for st in STAGES)}
    rows.sort(key=lambda r: order[(r["shape"], r["stage"])])
    shapes_all = sorted({r["shape"] for r in rows}, key=list(SHAPES).index)
    if rerun and llama_7b is None:
        llama_7b = earlier.get("llama_perplexity_7b")
    cpu = platform.processor() or platform.machine()
    result = {
        "command": f"python benchmarks/scale.py{subset}",
        "earlier_commands": [*earlier.get("earlier_commands", []), earlier["command"]] if rerun else [],
        "machine": f"{cpu}, {os.cpu_count()} cores, python {platform.python_version()}",
        "overlay": merge(OVERLAY, {"fold": {"enabled": True}}) if args.fold else OVERLAY,
        "rows": rows,
        "fit": fit(rows),
        "max_peak_rss_bytes": {s: max(r["peak_rss_bytes"] for r in rows if r["shape"] == s) for s in shapes_all},
        "max_ramp_peak_rss_bytes": {
            s: max(r["ramp_peak_rss_bytes"] for r in rows if r["shape"] == s) for s in shapes_all
        },
        "llama_perplexity_7b": llama_7b,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"max_peak_rss_bytes": result["max_peak_rss_bytes"], "fit": result["fit"]}, indent=2))


if __name__ == "__main__":
    main()
