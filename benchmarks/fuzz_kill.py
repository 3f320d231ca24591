"""kill -9 recovery: SIGKILL ``dvc repro`` of the tiny pipeline inside every stage, rerun it, compare the GGUF file.

A throw-away DVC copy of the pipeline with the tiny profile (``tests/pipeline/harness.py``) runs ``dvc repro``
once uninterrupted: its ``data/export/model.gguf`` sha256 is the reference, and the lifetime of every stage's
process is measured. Then, for each kill point (a stage and a moment inside it), a copy of that finished
repository has the outputs and ``dvc.lock`` entries of the stage, of everything downstream of it and of export
removed, and DVC's run cache emptied, so that ``dvc repro`` must recompute them. ``dvc repro`` is started in its
own process group; when the point's stage process has run for a fraction of its measured lifetime (or when the
stage's temporary output folder ``data/.<stage>.<pid>.*.tmp`` appears), the whole group gets SIGKILL. A second,
plain ``dvc repro`` must then finish, export a file with the reference sha256, and leave no temporary
(``.*.tmp``) under ``data/`` or the quantization cache.

    .venv/bin/python benchmarks/fuzz_kill.py --points 12 --out results/fuzz_kill.json

``kill_points(points, workdir)`` is the section of ``benchmarks/reliability.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402 - dvc's own dependency

from ramp.io import sha256_file  # noqa: E402
from ramp.pipeline import STAGES  # noqa: E402
from tests.pipeline.harness import VENV_BIN, make_pipeline_copy, pipeline_env  # noqa: E402

EXPORT = Path("data") / "export" / "model.gguf"
POLL_S = 0.005
REPRO_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: in ``stage``, ``fraction`` of its measured lifetime after its process started, or, with
    ``fraction`` None, as soon as its temporary output folder appears (while it writes its outputs)."""

    stage: str
    fraction: float | None

    @property
    def label(self) -> str:
        return f"{self.stage}@{'temp' if self.fraction is None else f'{self.fraction:.2f}'}"


# One pass over the stages at mid-run, then while the long-lived temporary folders exist (calibrate's wraps the
# whole stage, train's the training, export's the write and check of the file), then early and late.
PLAN: tuple[KillPoint, ...] = (
    *(KillPoint(s, 0.5) for s in STAGES),
    *(KillPoint(s, None) for s in ("calibrate", "train", "export")),
    *(KillPoint(s, f) for f in (0.2, 0.8) for s in STAGES),
)


@dataclass
class PointResult:
    point: str
    killed_in_stage: bool  # the stage's process was alive when the group was killed
    kill_after_s: float  # seconds after the stage's process appeared
    left_behind: list[str]  # temporaries the kill left
    rerun_ok: bool
    rerun_error: str
    same_sha: bool
    stale_after_rerun: list[str]  # temporaries still there after the rerun (should be none)
    rerun_seconds: float


@dataclass
class KillReport:
    reference_sha256: str
    reference_seconds: float
    stage_seconds: dict[str, float]
    results: list[PointResult] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, int]:
        ok = [r for r in self.results if r.killed_in_stage and r.rerun_ok and r.same_sha and not r.stale_after_rerun]
        return {"points": len(self.results), "recovered_same_sha": len(ok)}


def downstream(stage: str, root: Path) -> list[str]:
    """``stage`` and every stage that depends on it (transitively), in DAG order."""
    from ramp.pipeline.dag import upstream

    ups = upstream(root / "dvc.yaml")
    out = {stage}
    for s in STAGES:  # DAG order: a stage's upstream stages come before it
        if any(u in out for u in ups[s]):
            out.add(s)
    return [s for s in STAGES if s in out]


def declared_outputs(stage: str, root: Path) -> list[Path]:
    """The ``outs``, ``metrics`` and ``plots`` paths of ``stage`` in ``root/dvc.yaml``."""
    from ramp.pipeline.dag import stage_graph

    spec = stage_graph(root / "dvc.yaml")[stage]
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind, []):
            paths.extend(entry if isinstance(entry, dict) else [entry])
    return [root / p for p in paths]


def temporaries(root: Path) -> list[str]:
    """Every ``.*.tmp`` under ``data/`` and the quantization cache (relative paths)."""
    found = [p for base in (root / "data", root / "cache") if base.exists() for p in base.rglob(".*.tmp")]
    return sorted(str(p.relative_to(root)) for p in found)


def stage_processes(root: Path) -> dict[str, psutil.Process]:
    """stage -> its running ``python -m stages.<stage>`` in the repository ``root``."""
    out = {}
    where = str(root.resolve())
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = proc.info.get("cmdline") or []
        if "-m" in cmd and proc.info.get("cwd") == where:
            for s in STAGES:
                if f"stages.{s}" in cmd:
                    out[s] = proc
    return out


def start_repro(root: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [str(VENV_BIN / "dvc"), "repro"],
            cwd=root,
            env=pipeline_env(root),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGKILL reaches dvc and the stage it runs
        )


def repro(root: Path, log: Path) -> tuple[bool, str, float]:
    """``dvc repro`` to completion: (ok, last error line, seconds)."""
    t0 = time.perf_counter()
    proc = start_repro(root, log)
    try:
        rc = proc.wait(timeout=REPRO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False, f"dvc repro ran past {REPRO_TIMEOUT_S:.0f} s", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    if rc != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "ERROR" in ln or "Error" in ln), lines[-1] if lines else "")
        return False, f"exit {rc}: {err[:300]}", seconds
    return True, "", seconds


def measure_reference(root: Path, log: Path) -> tuple[str, float, dict[str, float]]:
    """Uninterrupted ``dvc repro``: (export sha256, seconds, stage -> seconds its process lived)."""
    t0 = time.perf_counter()
    proc = start_repro(root, log)
    seen: dict[str, list] = {}  # stage -> [pid, first seen, last seen]
    while proc.poll() is None:
        now = time.perf_counter()
        for s, p in stage_processes(root).items():
            if s not in seen:
                seen[s] = [p.pid, now, now]
            elif seen[s][0] == p.pid:
                seen[s][2] = now
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"uninterrupted dvc repro failed:\n{log.read_text(errors='replace')[-3000:]}")
    missing = [s for s in STAGES if s not in seen]
    if missing:
        raise SystemExit(f"never saw the process of stage(s) {missing} during dvc repro")
    lifetimes = {s: round(last - first, 2) for s, (_, first, last) in seen.items()}
    return sha256_file(root / EXPORT), time.perf_counter() - t0, lifetimes


def reset(root: Path, stage: str) -> None:
    """Make ``dvc repro`` recompute ``stage``, what depends on it and export: their outputs, their ``dvc.lock``
    entries (else DVC checks the outputs out of its cache) and DVC's run cache are removed; the stages before
    keep theirs."""
    import yaml

    redo = list(dict.fromkeys([*downstream(stage, root), "export"]))
    for s in redo:
        for path in declared_outputs(s, root):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    for s in redo:
        lock["stages"].pop(s, None)
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.rmtree(root / ".dvc" / "cache" / "runs", ignore_errors=True)


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_at(root: Path, point: KillPoint, lifetime: float, log: Path) -> tuple[bool, float]:
    """Start ``dvc repro`` and SIGKILL its process group at ``point``: (killed inside the stage, seconds after
    the stage's process appeared)."""
    proc = start_repro(root, log)
    target, started = None, 0.0
    try:
        while proc.poll() is None:
            if target is None:
                target = stage_processes(root).get(point.stage)
                started = time.perf_counter()
            elif not alive(target):
                break  # the stage ended before the moment: the kill lands after it (not counted as in the stage)
            elif point.fraction is None:
                if any((root / "data").glob(f".{point.stage}.*.tmp")):
                    break
            elif time.perf_counter() - started >= point.fraction * lifetime:
                break
            time.sleep(POLL_S)
        in_stage = target is not None and alive(target)
        after = time.perf_counter() - started if target is not None else 0.0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.perf_counter() + 10
    while target is not None and alive(target) and time.perf_counter() < deadline:
        time.sleep(0.05)  # the stage's process is gone before the rerun starts
    return in_stage, after


def run_kill_points(points: int, workdir: str | Path, log: Callable[[str], None] = print) -> KillReport:
    """The reference run, then ``points`` kill points of :data:`PLAN` (cycled), each in a fresh copy."""
    t0 = time.perf_counter()
    workdir = Path(workdir)
    base = make_pipeline_copy(workdir / "base")
    sha, ref_seconds, lifetimes = measure_reference(base, workdir / "base.log")
    log(f"reference: dvc repro {ref_seconds:.0f} s, export sha256 {sha[:16]}, stage seconds {lifetimes}")
    report = KillReport(sha, round(ref_seconds, 1), lifetimes)
    for i in range(points):
        point = PLAN[i % len(PLAN)]
        root = workdir / f"point-{i:02d}"
        # without the quantization cache: the stages recompute as in the reference run, at the same pace
        shutil.copytree(base, root, symlinks=True, ignore=lambda d, _: ["cache"] if Path(d) == base else [])
        reset(root, point.stage)
        plog = workdir / f"point-{i:02d}.log"
        in_stage, after = kill_at(root, point, lifetimes[point.stage], plog)
        left = temporaries(root)
        ok, err, seconds = repro(root, plog)
        same = ok and (root / EXPORT).exists() and sha256_file(root / EXPORT) == sha
        result = PointResult(
            point.label, in_stage, round(after, 2), left, ok, err, same, temporaries(root), round(seconds, 1)
        )
        report.results.append(result)
        log(
            f"{point.label:16s} killed in stage: {in_stage} ({after:.1f} s in), left {len(left)} temporaries; "
            f"rerun {'ok' if ok else err} in {seconds:.0f} s, same sha256: {same}, "
            f"stale after: {result.stale_after_rerun}"
        )
        shutil.rmtree(root, ignore_errors=True)
    report.seconds = round(time.perf_counter() - t0, 1)
    return report


def kill_points(points: int, workdir: str) -> dict[str, int]:
    """``{"points": n, "recovered_same_sha": k}``: of ``points`` kills inside the stages of ``dvc repro``, how many
    were killed inside their stage and recovered (a plain rerun finished, exported the reference sha256 and left
    no temporary). ``workdir``: an empty folder; the caller removes it."""
    return run_kill_points(points, workdir, log=lambda _msg: None).summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=len(STAGES) + 3)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "fuzz_kill.json")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ramp-fuzz-kill-"))
    try:
        report = run_kill_points(args.points, workdir)
    finally:
        if args.keep:
            print(f"work folder kept at {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    from ramp.io import write_json

    result = {
        **report.summary(),
        "seconds": report.seconds,
        "reference_seconds": report.reference_seconds,
        "reference_sha256": report.reference_sha256,
        "stage_seconds": report.stage_seconds,
        "results": [asdict(r) for r in report.results],
        "machine": f"{os.cpu_count()} CPU cores",
        "command": f"python benchmarks/fuzz_kill.py --points {args.points}",
    }
    write_json(args.out, result)
    print(json.dumps(report.summary()), f"in {report.seconds:.0f} s ->", args.out)


if __name__ == "__main__":
    main()
