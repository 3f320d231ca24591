"""Atomic stage outputs: a failed or killed writer leaves no output, and the next run cleans its leftovers."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ramp.io import atomic_dir
from ramp.pipeline.workspace import Workspace


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "stage"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("stage failed")
    assert (out / "a.txt").read_text() == "one"  # the old complete output, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]  # no temp folder left
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # usual modes, not mkdtemp's 0700


def test_killed_writer_leaves_no_output_and_next_run_cleans_up(tmp_path):
    out = tmp_path / "stage"
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from ramp.io import atomic_dir\n"
        "with atomic_dir(sys.argv[2]) as tmp:\n"
        "    (tmp / 'big.bin').write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, str(repo), str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert len(list(tmp_path.glob(".stage.*.tmp"))) == 1  # the killed run's partial folder, beside, never in place
    with atomic_dir(out) as tmp:
        (tmp / "ok").write_text("done")
    assert (out / "ok").read_text() == "done"
    assert not list(tmp_path.glob(".stage.*.tmp"))


def test_write_metrics_is_json_in_the_workspace(tmp_path):
    import resource

    ws = Workspace(tmp_path / "ws")
    got = ws.write_metrics("demo", {"seconds": 1.5, "n": 3})
    # every stage's metrics also say how much memory its process needed at most (RUSAGE_SELF, bytes)
    peak = got.pop("peak_rss_bytes")
    assert got == {"seconds": 1.5, "n": 3}
    assert peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak so far, in bytes
    assert peak > 10 << 20  # a Python process with torch imported holds more than 10 MiB
    text = (tmp_path / "ws/data/metrics/demo.json").read_text()
    assert '"seconds": 1.5' in text and f'"peak_rss_bytes": {peak}' in text
