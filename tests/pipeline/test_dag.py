"""The whole DAG with the tiny profile, in a throw-away copy of the repository (never the working tree)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.pipeline.harness import STAGES, VENV_BIN, dvc, pipeline_env

pytestmark = pytest.mark.slow  # the whole DAG: about 3-4 minutes on 2 shared cores


def ran(out: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", out.stdout)


def set_param(root: Path, section: str, key: str, value) -> None:
    p = root / "params.yaml"
    params = yaml.safe_load(p.read_text())
    params[section][key] = value
    p.write_text(yaml.safe_dump(params, sort_keys=False))


def test_full_dag_outputs(tiny_pipeline: Path):
    root = tiny_pipeline
    metrics = {s: json.loads((root / "data" / "metrics" / f"{s}.json").read_text()) for s in STAGES}
    assert all((root / "data" / stage).is_dir() for stage in STAGES)
    assert metrics["calibrate"]["windows"] == 8 and metrics["calibrate"]["tokens"] == 1024  # tiny: 1024 tokens / 128
    assert metrics["embed"]["matrices"] == 14 and metrics["embed"]["features"] == 11  # 2 blocks x 7 matrices
    assert 14 <= metrics["fold"]["formats_offered"] < metrics["fold"]["formats_legal"]  # dominated types dropped
    assert metrics["train"]["episodes"] == 6
    assert (
        metrics["allocate"]["bpw"] <= 4.5 and metrics["allocate"]["matrix_bytes"] == metrics["quantize"]["matrix_bytes"]
    )
    export = json.loads((root / "data/metrics/export.json").read_text())
    assert export["under_budget"] and export["file_bytes"] == export["predicted_file_bytes"]
    assert export["file_bytes"] == (root / "data/export/model.gguf").stat().st_size
    evaluate = json.loads((root / "data/metrics/evaluate.json").read_text())
    assert evaluate["ramp_file_bytes"] == export["file_bytes"]
    assert 0 <= evaluate["ramp_kld_mean"] < 1
    commonsense = evaluate["commonsense"]
    assert commonsense["ramp"]["piqa"]["n"] == commonsense["fp"]["piqa"]["n"] == 4
    # the random tiny model gets no PIQA question right by acc_norm, so retention is reported as not computable
    assert commonsense["fp"]["piqa"]["acc_norm"] == 0.0 and "FP acc_norm is 0.0" in commonsense["retained_error"]
    for f in ("pareto.csv", "format_map.csv", "pareto.png", "format_map.png", "train_history.csv"):
        assert (root / "data/plots" / f).stat().st_size > 0, f
    assert not list((root / "data").glob(".*.tmp")), "no temp leftovers"
    # the train stage measured its four demonstrations (greedy, uniform, sensitivity, gradient) before its 6
    # episodes, and its policy walks the best allocation it measured
    import pandas as pd

    history = pd.read_csv(root / "data/plots/train_history.csv")
    assert sorted(history.loc[history["demo"].fillna(False).astype(bool), "episode"]) == [-4, -3, -2, -1]
    assert len(history) == 6 + 4
    assert metrics["train"]["policy_matches_best"] == 1.0
    # the sensitivity stage measured every matrix once; evaluate ran its knapsacks and the evolutionary search
    assert metrics["sensitivity"]["evaluations"] == 14
    methods = set(pd.read_parquet(root / "data/evaluate/results.parquet")["method"])
    knapsacks = {"sensitivity-knapsack", "gradient-knapsack", "fisher-knapsack", "greedy", "uniform-fill"}
    assert knapsacks | {"evolutionary"} <= methods
    assert 0 < evaluate["evolution"]["evaluations"] <= 6
    # the quantize stage's bytes are exactly what the exported file holds
    import gguf
    from safetensors.numpy import load_file

    stored = load_file(str(root / "data/quantize/tensors.safetensors"))
    reader = gguf.GGUFReader(root / "data/export/model.gguf")
    in_file = {t.name: bytes(t.data.tobytes()) for t in reader.tensors}
    assert stored and all(in_file[name] == data.tobytes() for name, data in stored.items())


def test_second_repro_is_noop(tiny_pipeline: Path):
    out = dvc(tiny_pipeline, "repro")
    assert ran(out) == []
    assert json.loads(dvc(tiny_pipeline, "status", "--json").stdout) == {}


def test_budget_change_reruns_allocate_to_export(tiny_pipeline: Path):
    root = tiny_pipeline
    old = yaml.safe_load((root / "params.yaml").read_text())["allocate"]["budget_bpw"]
    set_param(root, "allocate", "budget_bpw", old + 0.5)
    try:
        status = json.loads(dvc(root, "status", "--json").stdout)
        # train keeps its own budget: not invalidated; export's report prints every params section
        assert set(status) == {"allocate", "export"}, status
        out = dvc(root, "repro")
        assert ran(out) == ["allocate", "quantize", "evaluate", "export"]
        assert json.loads((root / "data/metrics/allocate.json").read_text())["bpw"] > old
    finally:
        set_param(root, "allocate", "budget_bpw", old)
        dvc(root, "repro")
    assert json.loads(dvc(root, "status", "--json").stdout) == {}


def test_killed_stage_leaves_no_corrupt_output_and_rerun_recovers(tiny_pipeline: Path):
    root = tiny_pipeline
    out_dir = root / "data/quantize"
    before = (out_dir / "tensors.safetensors").read_bytes()
    proc = subprocess.Popen(
        [str(VENV_BIN / "dvc"), "repro", "-f", "--no-run-cache", "-s", "quantize"],
        cwd=root,
        env=pipeline_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # DVC removes a stage's outputs right before it starts the command: kill the stage a moment later
    deadline = time.monotonic() + 120
    while out_dir.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)
    assert proc.poll() is None, "the stage finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out_dir / "tensors.safetensors").exists(), "a killed stage leaves no output (never a partial one)"
    assert set(json.loads(dvc(root, "status", "--json").stdout)) >= {"quantize"}
    out = dvc(root, "repro", "-f", "-s", "quantize")  # recompute: never restore the old bytes from DVC's cache
    assert ran(out) == ["quantize"], out.stdout
    assert (out_dir / "tensors.safetensors").read_bytes() == before  # deterministic: same params, same bytes
    assert json.loads(dvc(root, "status", "--json").stdout) == {}


def test_exported_matrices_are_the_quantize_stage_bytes_in_model_orientation(tiny_pipeline: Path):
    """attn_q/attn_k rows are stored in llama.cpp's order: the exported file, read back by the loader, must give
    exactly the weights the evaluate stage scored (a row-order slip made llama.cpp's ppl 20x worse)."""
    import torch
    from safetensors.numpy import load_file

    from ramp.models.loader import load_gguf
    from ramp.pipeline.evaluate import dequantized_model
    from ramp.pipeline.workspace import Workspace

    root = tiny_pipeline
    lm = Workspace(root).folded_model()
    types = json.loads((root / "data/quantize/types.json").read_text())
    dequantized_model(lm, load_file(str(root / "data/quantize/tensors.safetensors")), types)
    exported = dict(load_gguf(root / "data/export/model.gguf", with_tokenizer=False).model.named_parameters())
    params = dict(lm.model.named_parameters())
    for m in lm.matrices():
        torch.testing.assert_close(exported[m.hf_name], params[m.hf_name], rtol=1e-5, atol=1e-6, msg=m.gguf_name)
