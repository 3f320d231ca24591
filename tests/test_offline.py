"""The offline environment is one list, set in the tests, the CLI, the stages and the Makefile."""

import os
import re
from pathlib import Path

from ramp.offline import OFFLINE_ENV


def test_tests_run_offline():
    for key, value in OFFLINE_ENV.items():
        assert os.environ.get(key) == value, key


def test_makefile_exports_the_same_variables():
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    exported = dict(re.findall(r"^export (\w+) := (\S+)$", text, flags=re.M))
    assert {k: exported.get(k) for k in OFFLINE_ENV} == OFFLINE_ENV
