"""The ramp CLI on the real SmolLM2 asset."""

import re

from typer.testing import CliRunner

from ramp.cli import app

K_AND_32 = "Q2_K Q3_K IQ4_NL Q4_0 Q4_K Q4_1 Q5_0 Q5_K Q5_1 Q6_K Q8_0 F16"
ONLY_32 = "IQ4_NL Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 F16"


def test_info_lists_every_matrix_with_legal_formats():
    res = CliRunner().invoke(app, ["info", "smollm2"])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if re.match(r"blk\.\d+\.", line)]
    assert len(rows) == 30 * 7
    for line in rows:
        formats = line.split(None, 3)[3]
        assert formats == (K_AND_32 if ".ffn_down." in line else ONLY_32), line
    assert "parameters: 134,515,008" in res.output
    assert "size at F16: 269,030,016 B" in res.output


def test_info_bad_path_is_one_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["info", str(tmp_path / "missing.gguf")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.splitlines()[-1].startswith(f"error: MODEL {tmp_path / 'missing.gguf'}: no such file")
