"""Bad invocations of every ``ramp`` command and invalid params (issue 20): each must fail in one clear line, with
no traceback and nothing left behind.

* :func:`cli_cases` runs >= 100 bad command lines as real subprocesses (``python -m ramp.cli ...``) on a tiny
  model built in code and on bad files: missing paths, folders for files, wrong file kinds, bad numbers,
  unwritable outputs, an output in a missing folder. It counts the runs whose stderr holds a Python traceback and
  the ones that leave any new or changed file or folder in their output folder (which starts with a file and a
  folder in it, so a failure that clobbers existing outputs counts too).
* :func:`params_cases` loads >= 50 invalid params overlays and files through :func:`ramp.params.load_pipeline`
  (in process) and a few through a DVC stage script (a subprocess in a throw-away folder), counting raw
  exceptions (a traceback) and invalid params that were accepted.

``python -m benchmarks.fuzz_cli`` prints both summaries and every defect. A run takes a few minutes (each
subprocess that gets past the argument checks imports torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
INT64_MAX = 2**63 - 1
UNWRITABLE = "/sys"  # a folder even root cannot create files in


# ------------------------------------------------------------------------------------------------ fixtures


@dataclass(frozen=True)
class Fixtures:
    """Good and bad inputs in one folder: ``path(key)`` of each."""

    root: Path

    def path(self, key: str) -> Path:
        return self.root / key


def build_fixtures(root: Path) -> Fixtures:
    """The tiny Llama as an HF directory with its tokenizer (the pipeline's ``model.source: tiny``), as a GGUF
    file and variants of both that are broken one way each; allocations, texts, params files and policy folders,
    good and bad. Built once per folder (a ``.done`` marker)."""
    fx = Fixtures(root)
    if (root / ".done").exists():
        return fx
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from ramp.allocation import save_allocation, slots_for, uniform
    from ramp.gguf_export import export_gguf
    from ramp.imatrix import write_imatrix
    from ramp.models.loader import load_model
    from ramp.params import ModelParams
    from ramp.pipeline.calibrate import build_tiny, calibration_text

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    tiny = build_tiny(root / "tiny", ModelParams(source="tiny"), 0, calibration_text("wiki"))
    lm = load_model(tiny)
    export_gguf(lm, root / "tiny.gguf", tokenizer_pre="gpt-2")  # its byte-level BPE, named for llama.cpp
    slots = slots_for(lm.matrices())
    good = uniform(slots, "Q8_0")
    save_allocation(root / "alloc.json", slots, good)
    save_allocation(root / "alloc.parquet", slots, good)
    write_imatrix(root / "imatrix.gguf", {s.gguf_name: np.ones(s.shape[1], np.float32) for s in slots}, 1, "fuzz")
    gguf = (root / "tiny.gguf").read_bytes()

    files: dict[str, bytes | str] = {
        "not_gguf.gguf": b"PK\x03\x04 a zip, not a GGUF file" * 4,
        "truncated.gguf": gguf[: len(gguf) // 3],
        "header_only.gguf": gguf[:64],
        "empty.gguf": b"",
        "text.txt": "The quick brown fox jumps over the lazy dog. " * 400,
        "short.txt": "hello world",
        "empty.txt": "",
        "binary.txt": bytes(range(128, 256)) * 8,
        "garbage.json": "{not json",
        "list.json": "[1, 2, 3]",
        "empty_object.json": "{}",
        "binary.json": b"\xff\xfe\x00garbage",
        "json_named.parquet": json.dumps(good),
        "parquet_named.json": (root / "alloc.parquet").read_bytes(),
        "illegal.json": json.dumps({**good, slots[0].gguf_name: "Q9_9"}),
        "unknown_tensor.json": json.dumps({**good, "blk.99.attn_q.weight": "Q8_0"}),
        "partial.json": json.dumps(dict(list(good.items())[:3])),
        "numbers.json": json.dumps({k: 8 for k in good}),
        "garbage_imatrix.gguf": b"GGUF" + b"\xff" * 60,
        "afile": "a file where a folder is expected\n",
    }
    for name, data in files.items():
        p = root / name
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    pq.write_table(pa.table({"x": [1, 2]}), root / "no_columns.parquet")
    (root / "adir").mkdir()
    (root / "empty_dir").mkdir()

    # HF directories broken one way each
    for name in ("no_tokenizer", "bad_config", "no_weights", "cut_weights"):
        shutil.copytree(tiny, root / name)
    for f in (root / "no_tokenizer").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    (root / "bad_config" / "config.json").write_text("{not json")
    for f in (root / "no_weights").glob("*.safetensors"):
        f.unlink()
    for f in (root / "cut_weights").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:1000])

    # policy folders
    (root / "policy_empty").mkdir()
    (root / "policy_garbage").mkdir()
    (root / "policy_garbage" / "policy.json").write_text("{not json")
    (root / "policy_garbage" / "policy.safetensors").write_bytes(b"\x00" * 16)
    (root / "policy_no_weights").mkdir()
    (root / "policy_no_weights" / "policy.json").write_text(json.dumps({"feature_names": [], "obs_dim": 2}))

    # params files
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    params_files = {
        "params_bad_yaml.yaml": "seed: [0\nmodel: {",
        "params_list.yaml": "- 1\n- 2\n",
        "params_binary.yaml": b"\xff\xfe\x00\x01",
        "params_unknown_key.yaml": yaml.safe_dump({**base, "train": {**base["train"], "episodes": 3}}),
        "params_zero_chunks.yaml": yaml.safe_dump({**base, "evaluate": {**base["evaluate"], "n_chunks": 0}}),
        "params_no_quantize.yaml": yaml.safe_dump({k: v for k, v in base.items() if k != "quantize"}),
    }
    for name, data in params_files.items():
        p = root / name
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    (root / ".done").write_text("ok\n")
    return fx


# ---------------------------------------------------------------------------------------------- CLI cases

# every case's output folder starts with these (a failure must leave them as they were)
OUT_SEED = {"prev.json": "previous output\n", "afile": "a file\n"}
OUT_DIRS = ("existing_dir",)


def _cli_case_table() -> list[tuple[str, list[str]]]:
    """(name, argv) of every bad invocation; ``{fx}`` is the fixtures folder, ``{out}`` the case's own output
    folder (seeded with ``prev.json``, ``afile`` and ``existing_dir/``)."""
    T, G = "{fx}/tiny", "{fx}/tiny.gguf"  # noqa: N806 - the tiny model as an HF directory and as a GGUF file
    O = "{out}/res.json"  # noqa: N806, E741
    cases: list[tuple[str, list[str]]] = [
        ("no such command", ["nosuchcommand"]),
        ("unknown global option", ["--bogus", "info", T]),
    ]
    # models that cannot be loaded, for every command that loads one
    bad_models = {
        "missing": "{fx}/missing.gguf",
        "empty name": "",
        "empty folder": "{fx}/empty_dir",
        "not gguf": "{fx}/not_gguf.gguf",
        "truncated gguf": "{fx}/truncated.gguf",
        "header-only gguf": "{fx}/header_only.gguf",
        "empty file": "{fx}/empty.gguf",
        "text file": "{fx}/text.txt",
        "bad config.json": "{fx}/bad_config",
        "no safetensors": "{fx}/no_weights",
        "cut safetensors": "{fx}/cut_weights",
    }
    for what, m in bad_models.items():
        cases.append((f"info: {what}", ["info", m]))
    for what in ("missing", "empty name", "not gguf"):  # the loader's own cases are info's
        m = bad_models[what]
        cases.append((f"perplexity: {what}", ["perplexity", m, "--chunks", "1", "--n-ctx", "64"]))
        cases.append((f"export: {what}", ["export", m, "--out", "{out}/m.gguf"]))
        cases.append((f"evaluate: {what}", ["evaluate", m, "--out", O, "--chunks", "1", "--n-ctx", "64"]))
    cases.append(("perplexity: model without tokenizer", ["perplexity", "{fx}/no_tokenizer", "--n-ctx", "64"]))
    cases.append(("evaluate: model without tokenizer", ["evaluate", "{fx}/no_tokenizer", "--out", O]))

    # perplexity: numbers, texts, outputs
    ppl = ["perplexity", T]
    for opt, value in [
        ("--chunks", "0"),
        ("--chunks", "-1"),
        ("--chunks", "abc"),
        ("--chunks", "1e3"),
        ("--chunks", str(10**30)),
        ("--n-ctx", "0"),
        ("--n-ctx", "4"),
        ("--n-ctx", "-512"),
        ("--n-ctx", "2048"),  # the tiny model has 1024 positions
        ("--n-ctx", str(INT64_MAX + 1)),
    ]:
        cases.append((f"perplexity: {opt} {value}", [*ppl, opt, value]))
    for what, text in [
        ("missing", "{fx}/missing.txt"),
        ("folder", "{fx}/adir"),
        ("binary", "{fx}/binary.txt"),
        ("empty", "{fx}/empty.txt"),
        ("too short", "{fx}/short.txt"),
    ]:
        cases.append((f"perplexity: --text {what}", [*ppl, "--text", text, "--n-ctx", "64", "--chunks", "1"]))
    cases.append(("perplexity: more chunks than text", [*ppl, "--text", "{fx}/text.txt", "--chunks", "100000"]))
    for what, out in [
        ("missing folder", "{out}/missing/res.json"),
        ("a folder", "{out}/existing_dir"),
        ("unwritable", f"{UNWRITABLE}/res.json"),
        ("parent is a file", "{out}/afile/res.json"),
    ]:
        cases.append((f"perplexity: --out {what}", [*ppl, "--out", out]))

    # export
    exp = ["export", T]
    cases.append(("export: no --out", exp))
    for what, out in [
        ("missing folder", "{out}/missing/m.gguf"),
        ("a folder", "{out}/existing_dir"),
        ("unwritable", f"{UNWRITABLE}/m.gguf"),
        ("parent is a file", "{out}/afile/m.gguf"),
    ]:
        cases.append((f"export: --out {what}", [*exp, "--out", out]))
    bad_allocations = {
        "missing": "{fx}/missing.json",
        "folder": "{fx}/adir",
        "garbage json": "{fx}/garbage.json",
        "json list": "{fx}/list.json",
        "empty object": "{fx}/empty_object.json",
        "binary json": "{fx}/binary.json",
        "json named .parquet": "{fx}/json_named.parquet",
        "parquet named .json": "{fx}/parquet_named.json",
        "parquet without columns": "{fx}/no_columns.parquet",
        "illegal format": "{fx}/illegal.json",
        "unknown tensor": "{fx}/unknown_tensor.json",
        "partial": "{fx}/partial.json",
        "numbers for formats": "{fx}/numbers.json",
    }
    for what, a in bad_allocations.items():
        cases.append((f"export: --allocation {what}", [*exp, "--out", "{out}/prev.json", "--allocation", a]))
    for opt, value in [
        ("--type", "Q9_9"),
        ("--type", ""),
        ("--type", "F8"),
        ("--embedding-type", "NOPE"),
        ("--file-bytes", "-5"),
        ("--file-bytes", "1e30"),
        ("--file-bytes", str(10**30)),
        ("--file-bytes", "1000"),  # smaller than any file of the model
        ("--imatrix", "{fx}/missing.gguf"),
        ("--imatrix", "{fx}/adir"),
        ("--imatrix", "{fx}/garbage_imatrix.gguf"),
        ("--imatrix", "{fx}/empty.gguf"),
        ("--imatrix", "{fx}/alloc.json"),
    ]:
        cases.append((f"export: {opt} {value!r}", [*exp, "--out", "{out}/m.gguf", opt, value]))

    # verify
    for what, gguf in [
        ("missing", "{fx}/missing.gguf"),
        ("folder", "{fx}/adir"),
        ("not gguf", "{fx}/not_gguf.gguf"),
        ("truncated", "{fx}/truncated.gguf"),
        ("empty", "{fx}/empty.gguf"),
    ]:
        cases.append((f"verify: GGUF_FILE {what}", ["verify", gguf, "--reference", G]))
        cases.append((f"verify: --reference {what}", ["verify", G, "--reference", gguf]))
    cases.append(("verify: no --reference", ["verify", G]))
    cases.append(("verify: --chunks 0", ["verify", G, "--reference", G, "--chunks", "0"]))
    cases.append(("verify: --chunks -3", ["verify", G, "--reference", G, "--chunks", "-3"]))
    cases.append(("verify: --out missing folder", ["verify", G, "--reference", G, "--out", "{out}/missing/v.json"]))
    cases.append(("verify: --out a folder", ["verify", G, "--reference", G, "--out", "{out}/existing_dir"]))

    # evaluate
    ev = ["evaluate", T, "--out", O]
    cases.append(("evaluate: no --out", ["evaluate", T]))
    cases.append(("evaluate: --allocation and --reference", [*ev, "--allocation", "{fx}/alloc.json", "--reference", T]))
    for opt, value in [
        ("--chunks", "0"),
        ("--n-ctx", "0"),
        ("--n-ctx", "2048"),
        ("--commonsense", "-1"),
        ("--top-k", "0"),
        ("--top-k", "100000"),  # above the vocabulary
        ("--seed", "-1"),
        ("--seed", str(2**64)),
        ("--text", "{fx}/binary.txt"),
        ("--text", "{fx}/empty.txt"),
        ("--text", "{fx}/missing.txt"),
        ("--cache-dir", "{fx}/afile"),
        ("--imatrix", "{fx}/garbage_imatrix.gguf"),
        ("--reference", "{fx}/missing.gguf"),
        ("--reference", "{fx}/not_gguf.gguf"),
    ]:
        cases.append((f"evaluate: {opt} {value}", [*ev, "--chunks", "1", "--n-ctx", "64", opt, value]))
    for what in ("garbage json", "json named .parquet", "illegal format", "partial"):
        cases.append((f"evaluate: --allocation {what}", [*ev, "--allocation", bad_allocations[what]]))
    for what, out in [
        ("missing folder", "{out}/missing/res.json"),
        ("a folder", "{out}/existing_dir"),
        ("unwritable", f"{UNWRITABLE}/res.json"),
    ]:
        cases.append((f"evaluate: --out {what}", ["evaluate", T, "--out", out]))

    # train (the workspace lies in the output folder: a failed command must not create it either)
    tr = ["train", "tiny", "--workspace", "{out}/ws"]
    cases.append(("train: no --out", tr))
    for what, out in [
        ("an existing file", "{out}/afile"),
        ("missing folder", "{out}/missing/policy"),
        ("unwritable", f"{UNWRITABLE}/policy"),
    ]:
        cases.append((f"train: --out {what}", [*tr, "--out", out, "--bpw", "4.5"]))
    for args in [
        ["--file-bytes", "-5"],
        ["--file-bytes", "0"],
        ["--file-bytes", str(10**30)],
        ["--bpw", "0"],
        ["--bpw", "-1"],
        ["--bpw", "100"],
        ["--bpw", "nan"],
        ["--bpw", "inf"],
        ["--bpw", "9"],  # above Q8_0, the largest format of fold.formats
        ["--bpw", "4", "--file-bytes", "1000000"],
        ["--episodes", "0"],
        ["--episodes", "-3"],
        ["--seed", "-1"],
        ["--params", "{fx}/missing.yaml"],
        ["--params", "{fx}/adir"],
        ["--params", "{fx}/params_bad_yaml.yaml"],
        ["--params", "{fx}/params_list.yaml"],
        ["--params", "{fx}/params_binary.yaml"],
        ["--params", "{fx}/params_unknown_key.yaml"],
        ["--params", "{fx}/params_zero_chunks.yaml"],
        ["--params", "{fx}/params_no_quantize.yaml"],
    ]:
        cases.append((f"train: {' '.join(args)}", [*tr, "--out", "{out}/policy", *args]))
    cases.append(("train: missing model", ["train", "{fx}/missing", "--out", "{out}/policy", "--bpw", "4"]))
    cases.append(("train: empty model", ["train", "", "--out", "{out}/policy", "--bpw", "4"]))
    cases.append(("train: --workspace is a file", ["train", "tiny", "--out", "{out}/p", "--workspace", "{fx}/afile"]))

    # allocate
    al = ["allocate", "tiny", "--workspace", "{out}/ws"]
    for what, pol in [
        ("missing", "{fx}/missing_policy"),
        ("a file", "{fx}/afile"),
        ("empty folder", "{fx}/policy_empty"),
        ("garbage policy.json", "{fx}/policy_garbage"),
        ("no weights", "{fx}/policy_no_weights"),
    ]:
        cases.append((f"allocate: --policy {what}", [*al, "--policy", pol, "--out", "{out}/a.json"]))
    pol = ["--policy", "{fx}/policy_garbage"]
    for what, args in [
        ("--out missing folder", ["--out", "{out}/missing/a.json"]),
        ("--out a folder", ["--out", "{out}/existing_dir"]),
        ("--out unwritable", ["--out", f"{UNWRITABLE}/a.json"]),
        ("--recipe in a missing folder", ["--out", "{out}/a.json", "--recipe", "{out}/missing/r.txt"]),
        ("--recipe a folder", ["--out", "{out}/a.json", "--recipe", "{out}/existing_dir"]),
        ("--recipe same as --out", ["--out", "{out}/a.json", "--recipe", "{out}/a.json"]),
        ("--file-bytes -1", ["--out", "{out}/a.json", "--file-bytes", "-1"]),
        ("--bpw 0", ["--out", "{out}/a.json", "--bpw", "0"]),
        ("--bpw and --file-bytes", ["--out", "{out}/a.json", "--bpw", "4", "--file-bytes", "100"]),
        ("--params bad yaml", ["--out", "{out}/a.json", "--params", "{fx}/params_bad_yaml.yaml"]),
        ("--params zero chunks", ["--out", "{out}/a.json", "--params", "{fx}/params_zero_chunks.yaml"]),
        ("no --policy", ["--out", "{out}/a.json"]),
    ]:
        argv = [*al, *([] if what == "no --policy" else pol), *args]
        cases.append((f"allocate: {what}", argv))
    return cases


@dataclass
class CliResult:
    name: str
    argv: list[str]
    exit_code: int
    traceback: bool
    partial: list[str]
    error_lines: int  # lines of stderr starting with "error:"
    seconds: float
    stderr_tail: str = ""

    @property
    def clear(self) -> bool:
        """Failed with one ``error:`` line (exit 1) or a click usage error (exit 2)."""
        return (self.exit_code == 1 and self.error_lines == 1) or (self.exit_code == 2 and self.error_lines == 0)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` -> "dir" or the sha256 of the file."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run_cli_case(i: int, name: str, argv: list[str], fx: Fixtures, workdir: Path, timeout_s: float) -> CliResult:
    out = workdir / "cases" / f"{i:03d}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f, text in OUT_SEED.items():
        (out / f).write_text(text)
    for d in OUT_DIRS:
        (out / d).mkdir()
    argv = [a.replace("{fx}", str(fx.root)).replace("{out}", str(out)) for a in argv]
    before = _snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "COLUMNS": "200"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ramp.cli", *argv],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        code, stderr = -1, f"timeout after {timeout_s:g} s\n{(e.stderr or b'')[-2000:]!r}"
    after = _snapshot(out)
    partial = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
    lines = stderr.splitlines()
    return CliResult(
        name=name,
        argv=argv,
        exit_code=code,
        traceback="Traceback (most recent call last)" in stderr,
        partial=partial,
        error_lines=sum(1 for ln in lines if ln.startswith("error:")),
        seconds=round(time.perf_counter() - t0, 2),
        stderr_tail="\n".join(lines[-3:])[-600:],
    )


def run_cli_cases(workdir: str | Path, jobs: int = 2, timeout_s: float = 180.0) -> list[CliResult]:
    """Every case of the table, ``jobs`` subprocesses at a time."""
    workdir = Path(workdir)
    fx = build_fixtures(workdir / "fixtures")
    table = _cli_case_table()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run_cli_case, i, n, a, fx, workdir, timeout_s) for i, (n, a) in enumerate(table)]
        return [f.result() for f in futures]


def summarize_cli(results: list[CliResult]) -> dict[str, int]:
    return {
        "cases": len(results),
        "traceback": sum(r.traceback for r in results),
        "partial_output": sum(bool(r.partial) for r in results),
    }


def cli_cases(workdir: str | Path, jobs: int = 2) -> dict[str, int]:
    """``{"cases", "traceback", "partial_output"}`` over every bad invocation (section ``cli`` of
    results/reliability.json)."""
    return summarize_cli(run_cli_cases(workdir, jobs))


# ------------------------------------------------------------------------------------------- params cases

# (name, overlay on the repository's params.yaml): each invalid
PARAMS_OVERLAYS: list[tuple[str, dict[str, Any]]] = [
    ("seed float", {"seed": 1.0}),
    ("seed bool", {"seed": True}),
    ("seed negative", {"seed": -1}),
    ("seed above int64", {"seed": 2**64}),
    ("seed string", {"seed": "zero"}),
    ("model.source empty", {"model": {"source": ""}}),
    ("model.source blank", {"model": {"source": "   "}}),
    ("model.source number", {"model": {"source": 3}}),
    ("model.source null", {"model": {"source": None}}),
    ("model.tiny.heads 0", {"model": {"tiny": {"heads": 0}}}),
    ("model.tiny.heads not dividing hidden", {"model": {"tiny": {"heads": 3}}}),
    ("model.tiny.kv_heads not dividing heads", {"model": {"tiny": {"kv_heads": 3}}}),
    ("model.tiny.hidden not a multiple of 256", {"model": {"tiny": {"hidden": 300}}}),
    ("model.tiny.hidden negative", {"model": {"tiny": {"hidden": -256}}}),
    ("model.tiny.layers 0", {"model": {"tiny": {"layers": 0}}}),
    ("model.tiny.vocab 0", {"model": {"tiny": {"vocab": 0}}}),
    ("model.tiny huge", {"model": {"tiny": {"hidden": 8192, "intermediate": 32768, "layers": 64}}}),
    ("model.tiny.hidden float", {"model": {"tiny": {"hidden": 256.0}}}),
    ("model.tiny unknown key", {"model": {"tiny": {"dims": 4}}}),
    ("calibrate.n_tokens float", {"calibrate": {"n_tokens": 1024.0}}),
    ("calibrate.n_tokens below n_ctx", {"calibrate": {"n_tokens": 100}}),
    ("calibrate.n_ctx 0", {"calibrate": {"n_ctx": 0}}),
    ("calibrate.n_ctx bool", {"calibrate": {"n_ctx": True}}),
    ("calibrate.offset_seqs negative", {"calibrate": {"offset_seqs": -1}}),
    ("calibrate.batch_size 0", {"calibrate": {"batch_size": 0}}),
    ("calibrate.text empty", {"calibrate": {"text": ""}}),
    ("calibrate.n_tokens above int64", {"calibrate": {"n_tokens": 10**30}}),
    ("fold.alpha above 1", {"fold": {"alpha": 1.5}}),
    ("fold.alpha nan", {"fold": {"alpha": float("nan")}}),
    ("fold.alpha string", {"fold": {"alpha": "half"}}),
    ("fold.max_logit_diff negative", {"fold": {"max_logit_diff": -0.1}}),
    ("fold.formats empty", {"fold": {"formats": []}}),
    ("fold.formats unknown", {"fold": {"formats": ["Q4_0", "Q9_9"]}}),
    ("fold.formats string", {"fold": {"formats": "Q4_0"}}),
    ("fold.enabled string", {"fold": {"enabled": "yes"}}),
    ("sensitivity.windows 0", {"sensitivity": {"windows": 0}}),
    ("sensitivity.probes negative", {"sensitivity": {"probes": -2}}),
    ("sensitivity.top_k 0", {"sensitivity": {"top_k": 0}}),
    ("train.budget_bpw 100", {"train": {"budget_file_bytes": None, "budget_bpw": 100}}),
    ("train.budget_bpw above the largest format", {"train": {"budget_file_bytes": None, "budget_bpw": 9.0}}),
    ("train.budget_bpw 0", {"train": {"budget_file_bytes": None, "budget_bpw": 0}}),
    ("train.budget_bpw inf", {"train": {"budget_file_bytes": None, "budget_bpw": float("inf")}}),
    ("train both budgets", {"train": {"budget_bpw": 4.5}}),
    ("train no budget", {"train": {"budget_file_bytes": None}}),
    ("train.reward_windows 0", {"train": {"reward_windows": 0}}),
    ("train.top_k float", {"train": {"top_k": 64.0}}),
    ("train.demos unknown", {"train": {"demos": ["greedy", "random"]}}),
    ("train.action_map unknown", {"train": {"action_map": "bits"}}),
    ("train.sac.episodes 0", {"train": {"sac": {"episodes": 0}}}),
    ("train.sac.episodes float", {"train": {"sac": {"episodes": 60.0}}}),
    ("train.sac unknown key", {"train": {"sac": {"episode": 3}}}),
    ("train.reward.reference 0", {"train": {"reward": {"reference": 0}}}),
    ("allocate.budget_file_bytes 1e30", {"allocate": {"budget_file_bytes": 1e30}}),
    ("allocate.budget_file_bytes above int64", {"allocate": {"budget_file_bytes": 2**63}}),
    ("allocate.budget_file_bytes 0", {"allocate": {"budget_file_bytes": 0}}),
    ("allocate.budget_file_bytes negative", {"allocate": {"budget_file_bytes": -5}}),
    ("allocate.budget_file_bytes float", {"allocate": {"budget_file_bytes": 93510208.0}}),
    ("allocate.budget_bytes (old name)", {"allocate": {"budget_bytes": 1e30}}),
    ("allocate.policy unknown", {"allocate": {"policy": "best"}}),
    ("allocate.embedding_type unknown", {"allocate": {"embedding_type": "Q9_9"}}),
    ("allocate.norm_type quantized", {"allocate": {"norm_type": "Q4_0"}}),
    ("quantize.imatrix int", {"quantize": {"imatrix": 1}}),
    ("evaluate.n_chunks 0", {"evaluate": {"n_chunks": 0}}),
    ("evaluate.n_ctx 4", {"evaluate": {"n_ctx": 4}}),
    ("evaluate.top_k 0", {"evaluate": {"top_k": 0}}),
    ("evaluate.batch_size negative", {"evaluate": {"batch_size": -1}}),
    ("evaluate.uniform unknown format", {"evaluate": {"uniform": ["Q4_0", "Q7_0"]}}),
    ("evaluate.uniform string", {"evaluate": {"uniform": "Q4_0"}}),
    ("evaluate.commonsense_tasks unknown", {"evaluate": {"commonsense_tasks": ["mmlu"]}}),
    ("evaluate.commonsense_n negative", {"evaluate": {"commonsense_n": -1}}),
    ("evaluate.knapsack unknown", {"evaluate": {"knapsack": ["greedy", "magic"]}}),
    ("evaluate.presets unknown", {"evaluate": {"presets": ["Q9_K_M"]}}),
    ("evaluate.evolution_evaluations negative", {"evaluate": {"evolution_evaluations": -1}}),
    ("evaluate.evolution_evaluations inf", {"evaluate": {"evolution_evaluations": float("inf")}}),
    ("evaluate.evolution_screen_windows above windows", {"evaluate": {"evolution_screen_windows": 5}}),
    ("export.llama_chunks 0", {"export": {"llama_chunks": 0}}),
    ("export.llama_n_ctx 0", {"export": {"llama_n_ctx": 0}}),
    ("export.llama_check string", {"export": {"llama_check": "no"}}),
    ("section not a mapping", {"evaluate": [1, 2]}),
    ("section null", {"fold": None}),
]

# (name, text of a params file): each invalid as a whole
PARAMS_FILES: list[tuple[str, str | bytes]] = [
    ("not YAML", "seed: [0\nmodel: {"),
    ("a list", "- 1\n- 2\n"),
    ("empty", ""),
    ("binary", b"\xff\xfe\x00\x01"),
    ("tabs", "seed:\t0\n\tmodel: x\n"),
]

# (name, stage, overlay): through ``python -m stages.<stage>`` in a throw-away folder
STAGE_OVERLAYS: list[tuple[str, str, dict[str, Any]]] = [
    ("calibrate: model.source empty", "calibrate", {"model": {"source": ""}}),
    ("calibrate: model.tiny.heads 0", "calibrate", {"model": {"tiny": {"heads": 0}}}),
    ("calibrate: seed negative", "calibrate", {"seed": -1}),
    ("calibrate: n_tokens float", "calibrate", {"calibrate": {"n_tokens": 1024.0}}),
    ("evaluate: n_chunks 0", "evaluate", {"evaluate": {"n_chunks": 0}}),
    ("allocate: budget_file_bytes above int64", "allocate", {"allocate": {"budget_file_bytes": 10**30}}),
    ("train: budget_bpw 100", "train", {"train": {"budget_file_bytes": None, "budget_bpw": 100}}),
]


@dataclass
class ParamsResult:
    name: str
    outcome: str  # clean | traceback | accepted_invalid
    detail: str = ""
    extra: dict = field(default_factory=dict)


def _load_overlay(overlay: dict[str, Any]) -> ParamsResult:
    from ramp.params import ParamsError, load_pipeline

    try:
        load_pipeline(REPO / "params.yaml", overlay)
    except ParamsError as e:
        return ParamsResult("", "clean", str(e))
    except Exception as e:  # noqa: BLE001 - any other exception is the defect counted
        return ParamsResult("", "traceback", f"{type(e).__name__}: {e}")
    return ParamsResult("", "accepted_invalid", "loaded without an error")


def _load_file(path: Path) -> ParamsResult:
    from ramp.params import ParamsError, load_pipeline

    try:
        load_pipeline(path)
    except ParamsError as e:
        return ParamsResult("", "clean", str(e))
    except Exception as e:  # noqa: BLE001
        return ParamsResult("", "traceback", f"{type(e).__name__}: {e}")
    return ParamsResult("", "accepted_invalid", "loaded without an error")


def _run_stage(stage: str, overlay: dict[str, Any], folder: Path, timeout_s: float) -> ParamsResult:
    import yaml

    from ramp.params import merge

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(
        yaml.safe_dump(merge(yaml.safe_load((REPO / "params.yaml").read_text()), overlay))
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    env.pop("RAMP_VERBOSE", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return ParamsResult("", "accepted_invalid", f"stage {stage} still running after {timeout_s:g} s")
    left = sorted(p.name for p in folder.iterdir() if p.name != "params.yaml")
    tail = proc.stderr.strip().splitlines()[-1:] or [""]
    extra = {"exit_code": proc.returncode, "left_behind": left}
    if "Traceback (most recent call last)" in proc.stderr:
        return ParamsResult("", "traceback", tail[0], extra)
    if proc.returncode == 0:
        return ParamsResult("", "accepted_invalid", "stage exited 0", extra)
    return ParamsResult("", "clean", tail[0], extra)


def run_params_cases(workdir: str | Path, timeout_s: float = 180.0) -> list[ParamsResult]:
    workdir = Path(workdir)
    results = []
    for name, overlay in PARAMS_OVERLAYS:
        r = _load_overlay(overlay)
        r.name = f"overlay: {name}"
        results.append(r)
    files = workdir / "params_files"
    files.mkdir(parents=True, exist_ok=True)
    for i, (name, text) in enumerate(PARAMS_FILES):
        p = files / f"params_{i}.yaml"
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        r = _load_file(p)
        r.name = f"file: {name}"
        results.append(r)
    for i, (name, stage, overlay) in enumerate(STAGE_OVERLAYS):
        r = _run_stage(stage, overlay, workdir / "stages" / f"{i:02d}", timeout_s)
        r.name = f"stage {name}"
        results.append(r)
    return results


def summarize_params(results: list[ParamsResult]) -> dict[str, int]:
    return {
        "cases": len(results),
        "traceback": sum(r.outcome == "traceback" for r in results),
        "accepted_invalid": sum(r.outcome == "accepted_invalid" for r in results),
    }


def params_cases(workdir: str | Path) -> dict[str, int]:
    """``{"cases", "traceback", "accepted_invalid"}`` over every invalid params overlay, file and stage run
    (section ``params`` of results/reliability.json)."""
    return summarize_params(run_params_cases(workdir))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ramp-fuzz-cli"))
    ap.add_argument("--jobs", type=int, default=2, help="CLI subprocesses at a time")
    ap.add_argument("--only", choices=("cli", "params"), default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the summaries and defects as JSON")
    args = ap.parse_args()
    report: dict[str, Any] = {}
    if args.only in (None, "params"):
        pres = run_params_cases(args.workdir)
        report["params"] = summarize_params(pres)
        report["params_defects"] = [r.__dict__ for r in pres if r.outcome != "clean"]
        print(json.dumps(report["params"]), flush=True)
        for r in pres:
            if r.outcome != "clean":
                print(f"  {r.outcome}: {r.name}: {r.detail}")
    if args.only in (None, "cli"):
        t0 = time.perf_counter()
        cres = run_cli_cases(args.workdir, args.jobs)
        report["cli"] = summarize_cli(cres)
        report["cli_seconds"] = round(time.perf_counter() - t0, 1)
        report["cli_unclear"] = [
            {"name": r.name, "exit_code": r.exit_code, "error_lines": r.error_lines, "stderr": r.stderr_tail}
            for r in cres
            if not r.clear
        ]
        report["cli_defects"] = [r.__dict__ for r in cres if r.traceback or r.partial]
        report["cli_results"] = [
            {"name": r.name, "exit_code": r.exit_code, "seconds": r.seconds, "stderr": r.stderr_tail} for r in cres
        ]
        print(json.dumps(report["cli"]), f"in {report['cli_seconds']} s", flush=True)
        for r in cres:
            if r.traceback or r.partial or not r.clear:
                print(f"  {r.name}: exit {r.exit_code}, traceback {r.traceback}, partial {r.partial}")
                print("    " + r.stderr_tail.replace("\n", "\n    "))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
