"""`ramp evaluate` on SmolLM2: an allocation swapped in, a GGUF file as-is, and bad input."""

import json

import pytest
from typer.testing import CliRunner

from ramp.allocation import save_allocation, slots_for, uniform
from ramp.assets import asset_path
from ramp.cli import app
from ramp.models.loader import load_model


@pytest.fixture(scope="module")
def slots():
    return slots_for(load_model(asset_path("smollm2"), with_tokenizer=False).matrices())


@pytest.mark.slow
def test_evaluate_allocation_writes_json_and_table(tmp_path, slots):
    alloc = save_allocation(tmp_path / "q8.json", slots, uniform(slots, "Q8_0"))
    out = tmp_path / "res.json"
    args = ["evaluate", "smollm2", "--allocation", str(alloc), "--chunks", "2", "--n-ctx", "128"]
    res = CliRunner().invoke(app, [*args, "--cache-dir", str(tmp_path / "q"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["bpw"] == 8.5 and data["kld"]["n_tokens"] == 2 * 63
    assert 0 < data["kld"]["kld_mean"] < 0.02 and data["kld"]["top1"] > 0.9
    assert "KLD mean" in res.output and "top-1 agreement" in res.output


@pytest.mark.slow
def test_evaluate_gguf_as_is_against_reference(tmp_path):
    out = tmp_path / "res.json"
    args = ["evaluate", "smollm2", "--reference", "smollm2", "--chunks", "1", "--n-ctx", "128"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    kld = json.loads(out.read_text())["kld"]
    assert abs(kld["kld_mean"]) < 1e-6 and kld["top1"] == 1.0 and kld["ppl"] == pytest.approx(kld["ppl_fp"])


def test_evaluate_rejects_bad_allocation(tmp_path, slots):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**uniform(slots, "Q8_0"), "blk.0.attn_k.weight": "Q4_K"}))
    out = tmp_path / "res.json"
    res = CliRunner().invoke(app, ["evaluate", "smollm2", "--allocation", str(bad), "--out", str(out)])
    assert res.exit_code == 1 and not out.exists() and "Traceback" not in res.output
    assert "blk.0.attn_k.weight: format 'Q4_K' is not legal" in res.output.splitlines()[-1]
    both = ["evaluate", "smollm2", "--allocation", str(bad), "--reference", "smollm2", "--out", str(out)]
    res = CliRunner().invoke(app, both)
    assert res.exit_code == 1 and "not both" in res.output.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # nothing written, no temp files
