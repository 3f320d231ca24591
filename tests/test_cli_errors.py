"""Every ``ramp`` command fails in one clear line (issue 20): a project or argument error is ``error: <message>``
on stderr and exit 1 with no traceback (``--verbose`` shows it), click's usage errors keep exit 2, numeric options
are checked in the unit the user gave, and a failed command leaves no file or folder behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ramp.cli import INT64_MAX, app, copy_together
from ramp.errors import RampError

REPO = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` -> its bytes (None for a folder): what a failed command must not change."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def fails_in_one_line(args: list[str], folder: Path) -> str:
    """Run ``ramp *args``; assert exit 1, one ``error:`` line, no traceback and ``folder`` unchanged; the line."""
    before = tree(folder)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.output
    assert tree(folder) == before, "a failed command left something behind"
    return errors[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The pipeline's tiny Llama (1024 positions) as an HF directory with its byte-level BPE tokenizer."""
    from ramp.params import ModelParams
    from ramp.pipeline.calibrate import build_tiny, calibration_text

    root = tmp_path_factory.mktemp("cli")
    return build_tiny(root / "tiny", ModelParams(source="tiny"), 0, calibration_text("wiki"))


@pytest.fixture(scope="module")
def tiny_allocation(tiny) -> dict[str, str]:
    from ramp.allocation import slots_for, uniform
    from ramp.models.loader import load_model

    return uniform(slots_for(load_model(tiny, with_tokenizer=False).matrices()), "Q8_0")


# argument checks that need no model: (argv with {tmp}, the expected error line)
ARGUMENT_CASES = [
    (["perplexity", "smollm2", "--chunks", "0"], "error: --chunks 0 windows: must be at least 1"),
    (["perplexity", "smollm2", "--n-ctx", "4"], "error: --n-ctx 4 tokens: must be at least 8"),
    (["perplexity", "smollm2", "--out", "{tmp}/missing/p.json"], "error: --out {tmp}/missing/p.json: folder "),
    (["export", "smollm2", "--out", "{tmp}/m.gguf", "--file-bytes", "-5"], "error: --file-bytes -5 bytes: must be at"),
    (
        ["export", "smollm2", "--out", "{tmp}/m.gguf", "--file-bytes", str(10**30)],
        f"error: --file-bytes {10**30} bytes: must be at most {INT64_MAX} (a 64-bit integer)",
    ),
    (["export", "smollm2", "--out", "{tmp}"], "error: --out {tmp}: is a folder; expected the path of a file"),
    (["export", "smollm2", "--out", "{tmp}/m.gguf", "--allocation", "{tmp}/a.json"], "--allocation {tmp}/a.json: no"),
    (["train", "tiny", "--out", "{tmp}/p", "--bpw", "100"], "error: --bpw 100.0 bits per weight: must be above 0 and"),
    (["train", "tiny", "--out", "{tmp}/p", "--bpw", "nan"], "error: --bpw nan bits per weight"),
    (["train", "tiny", "--out", "{tmp}/p", "--episodes", "0"], "error: --episodes 0 episodes: must be at least 1"),
    (["train", "tiny", "--out", "{tmp}/p", "--seed", "-1"], "error: --seed -1: must be at least 0"),
    (["train", "", "--out", "{tmp}/p"], "error: MODEL is empty"),
    (["train", "{tmp}/nope", "--out", "{tmp}/p"], "error: MODEL {tmp}/nope: no such model file or directory"),
    (["train", "tiny", "--out", "{tmp}/p", "--params", "{tmp}"], "error: --params {tmp}: is a folder"),
    (
        ["allocate", "tiny", "--policy", "{tmp}", "--out", "{tmp}/a.json", "--bpw", "4", "--file-bytes", "9"],
        "at most one",
    ),
    (["allocate", "tiny", "--policy", "{tmp}/nope", "--out", "{tmp}/a.json"], "error: --policy {tmp}/nope: no such"),
    (["evaluate", "smollm2", "--out", "{tmp}/r.json", "--top-k", "0"], "error: --top-k 0 log-probs per token: must be"),
    (["evaluate", "smollm2", "--out", "{tmp}/r.json", "--commonsense", "-1"], "error: --commonsense -1 documents per"),
    (["evaluate", "smollm2", "--out", "{tmp}/r.json", "--allocation", "{tmp}/a", "--reference", "x"], "not both"),
    (["verify", "{tmp}/m.gguf", "--reference", "{tmp}/r.gguf"], "error: GGUF_FILE {tmp}/m.gguf: no such file"),
    (["verify", "{tmp}", "--reference", "{tmp}/r.gguf", "--chunks", "0"], "error: --chunks 0 windows: must be at"),
    (["info", "{tmp}/missing.gguf"], "error: MODEL {tmp}/missing.gguf: no such file or directory (expected a GGUF"),
    (["evaluate", "smollm2", "--out", "{tmp}/r.json", "--reference", "{tmp}/f"], "error: --reference {tmp}/f: no such"),
    (["info", ""], "error: MODEL is empty"),
]


@pytest.mark.parametrize(("argv", "expected"), ARGUMENT_CASES, ids=[" ".join(a[:3]) for a, _ in ARGUMENT_CASES])
def test_bad_argument_is_one_line_naming_option_value_and_unit(tmp_path, argv, expected):
    line = fails_in_one_line([a.replace("{tmp}", str(tmp_path)) for a in argv], tmp_path)
    assert expected.replace("{tmp}", str(tmp_path)) in line


def test_click_usage_error_keeps_exit_2_without_traceback():
    res = CliRunner().invoke(app, ["perplexity", "smollm2", "--chunks", "abc"])
    assert res.exit_code == 2 and "Invalid value for '--chunks'" in res.output and "Traceback" not in res.output


def test_verbose_raises_the_project_error(tmp_path):
    res = CliRunner().invoke(app, ["--verbose", "info", str(tmp_path / "missing.gguf")])
    assert res.exit_code == 1 and isinstance(res.exception, RampError) and "missing.gguf" in str(res.exception)


def test_real_entry_point_prints_one_stderr_line_and_verbose_the_traceback(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a GGUF file")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ramp.cli", "info", str(bad)]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert quiet.returncode == 1 and quiet.stdout == "" and "Traceback" not in quiet.stderr
    lines = quiet.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: not a GGUF file"), quiet.stderr
    loud = subprocess.run([*cmd[:3], "--verbose", *cmd[3:]], capture_output=True, text=True, env=env)
    assert (
        loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr and "ModelLoadError" in loud.stderr
    )


def test_n_ctx_above_the_models_context(tmp_path, tiny):
    line = fails_in_one_line(["perplexity", str(tiny), "--n-ctx", "2048"], tmp_path)
    assert line == f"error: --n-ctx 2048: above the context of MODEL {tiny}, 1024 tokens (max_position_embeddings)"


def test_text_that_is_not_utf8_and_a_model_without_tokenizer(tmp_path, tiny):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(128, 256)))
    line = fails_in_one_line(["perplexity", str(tiny), "--text", str(text)], tmp_path)
    assert line.startswith(f"error: --text {text}: not UTF-8 text")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            (bare / f.name).write_bytes(f.read_bytes())
    line = fails_in_one_line(["perplexity", str(bare), "--n-ctx", "64"], tmp_path)
    assert line == f"error: MODEL {bare}: has no tokenizer (an HF directory needs tokenizer.json)"


def test_perplexity_still_runs_and_writes_its_json(tmp_path, tiny):
    from ramp.pipeline.calibrate import calibration_text

    text = tmp_path / "t.txt"
    text.write_text(calibration_text("wiki")[:20_000])
    out = tmp_path / "p.json"
    res = CliRunner().invoke(
        app, ["perplexity", str(tiny), "--text", str(text), "--n-ctx", "64", "--chunks", "2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["chunks"] == 2 and data["n_ctx"] == 64 and data["tokens_scored"] == 2 * 31 and data["ppl"] > 1


def test_allocation_of_the_wrong_kind_is_named_and_the_old_output_kept(tmp_path, tiny, tiny_allocation):
    fake = tmp_path / "alloc.parquet"
    fake.write_text(json.dumps(tiny_allocation))  # JSON named .parquet
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the previous export")
    line = fails_in_one_line(["export", str(tiny), "--out", str(out), "--allocation", str(fake)], tmp_path)
    assert line.startswith(f"error: {fake}: not an allocation Parquet file (")
    illegal = tmp_path / "illegal.json"
    illegal.write_text(json.dumps({**tiny_allocation, "blk.0.attn_q.weight": "Q9_9"}))
    line = fails_in_one_line(["export", str(tiny), "--out", str(out), "--allocation", str(illegal)], tmp_path)
    assert "blk.0.attn_q.weight: format 'Q9_9' is not legal" in line
    assert out.read_bytes() == b"the previous export"


def test_allocate_checks_recipe_and_policy_before_any_stage(tmp_path):
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "policy.json").write_text("{not json")
    (policy / "policy.safetensors").write_bytes(b"\0" * 16)
    base = ["allocate", "tiny", "--policy", str(policy), "--workspace", str(tmp_path / "ws")]
    line = fails_in_one_line(
        [*base, "--out", str(tmp_path / "a.json"), "--recipe", str(tmp_path / "no/r.txt")], tmp_path
    )
    assert line == f"error: --recipe {tmp_path / 'no/r.txt'}: folder {tmp_path / 'no'} does not exist"
    line = fails_in_one_line([*base, "--out", str(tmp_path / "a.json")], tmp_path)  # no workspace was started
    assert line.startswith(f"error: {policy / 'policy.json'}: not a policy description")


def test_train_rejects_bad_params_file_and_a_file_as_out_leaving_nothing(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [0\nmodel: {")
    base = ["train", "tiny", "--workspace", str(tmp_path / "ws"), "--bpw", "4"]
    line = fails_in_one_line([*base, "--out", str(tmp_path / "p"), "--params", str(bad)], tmp_path)
    assert line.startswith(f"error: {bad}: not valid YAML at line 2")
    line = fails_in_one_line([*base, "--out", str(bad)], tmp_path)
    assert line == f"error: --out {bad}: is a file; expected the path of a folder"
    zero = tmp_path / "zero.yaml"
    zero.write_text((REPO / "params.yaml").read_text().replace("n_chunks: 10", "n_chunks: 0"))
    line = fails_in_one_line([*base, "--out", str(tmp_path / "p"), "--params", str(zero)], tmp_path)
    assert line == f"error: {zero}: evaluate.n_chunks = 0: must be >= 1"


def test_copy_together_writes_every_destination_or_none(tmp_path):
    a, b = tmp_path / "a.src", tmp_path / "b.src"
    a.write_text("allocation")
    b.write_text("recipe")
    out = tmp_path / "out"
    out.mkdir()
    copy_together([(a, out / "a.json"), (b, out / "r.txt")])
    assert (out / "a.json").read_text() == "allocation" and (out / "r.txt").read_text() == "recipe"
    (out / "a.json").write_text("old allocation")
    with pytest.raises(FileNotFoundError):
        copy_together([(a, out / "a.json"), (tmp_path / "missing.src", out / "r.txt")])
    assert tree(out) == {"a.json": b"old allocation", "r.txt": b"recipe"}  # untouched, no temp files
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(FileNotFoundError):
        copy_together([(a, new / "a.json"), (tmp_path / "missing.src", new / "r.txt")])
    assert tree(new) == {}


def test_export_refuses_a_file_above_budget_and_writes_one_within(tmp_path, tiny):
    out = tmp_path / "m.gguf"
    args = ["export", str(tiny), "--out", str(out), "--type", "Q8_0", "--tokenizer-pre", "gpt-2"]
    line = fails_in_one_line([*args, "--file-bytes", "1000"], tmp_path)
    assert line.startswith("error: m.gguf: the file would be ") and line.endswith("above the budget of 1,000")
    res = CliRunner().invoke(app, [*args, "--file-bytes", str(10**9)])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output and out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp files beside it


def test_verify_names_a_reference_of_another_model_before_llama_cpp_runs(tmp_path, tiny):
    from ramp.assets import asset_path
    from ramp.gguf_export import export_gguf
    from ramp.models.loader import load_model

    gguf = export_gguf(load_model(tiny), tmp_path / "tiny.gguf", tokenizer_pre="gpt-2")
    ref = asset_path("smollm2")
    line = fails_in_one_line(
        ["verify", str(gguf), "--reference", str(ref), "--out", str(tmp_path / "v.json")], tmp_path
    )
    assert line == (
        f"error: --reference {ref}: a vocabulary of 49152 tokens, GGUF_FILE {gguf} has 512; expected the F32/F16 "
        "file of the same model"
    )
