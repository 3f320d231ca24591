"""Reliability benchmark (issue 20): fuzz every reader, the CLI and params, kill the pipeline, race promotions.

    python benchmarks/reliability.py            # writes results/reliability.json (about 25 minutes on 2 cores)
    python benchmarks/reliability.py --quick    # a smaller run of every section (a few minutes)

Sections (each a function of its own module, also used by the tests with small counts):

- readers: seeded mutants of the GGUF model file (``fuzz_gguf``), the imatrix (GGUF and legacy ``.dat``), HF
  ``model.safetensors`` and ``config.json``, and the folded model (``fuzz_readers``), each loaded by the real
  reader in a worker process with a timeout and an address-space limit (``fuzz``): counts of clean errors, valid
  inputs, other exceptions, hangs, crashes, memory blow-ups and corrupt inputs accepted;
- cli / params: bad invocations of every command as real processes, invalid params overlays (``fuzz_cli``):
  how many printed a traceback, left partial output, or were accepted although invalid;
- kill: SIGKILL of the pipeline inside every stage, then a rerun (``fuzz_kill``): how many recovered to the
  uninterrupted run's export sha256;
- promotion_race: two processes promoting at once (``fuzz_registry``): how many ended with a wrong champion.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fuzz import Report, run_cases  # noqa: E402

FULL = {"gguf": 1200, "reader": 320, "kill": 10, "race": 50}
QUICK = {"gguf": 200, "reader": 60, "kill": 10, "race": 5}


def readers(counts: dict[str, int], seed: int, work: Path) -> tuple[dict, list]:
    from benchmarks import fuzz_gguf, fuzz_readers

    cases = fuzz_gguf.cases(seed, counts["gguf"], work / "gguf")
    for name in ("imatrix", "safetensors", "hf_config", "folded"):
        make = getattr(fuzz_readers, f"{name}_cases")
        cases += make(seed, counts["reader"], work / name)
    report: Report = run_cases(cases, timeout_s=60)
    return report.summary(), report.defects


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (a smoke run of every section)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "reliability.json")
    ap.add_argument("--sections", default="readers,cli,params,kill,promotion_race")
    args = ap.parse_args(argv)
    counts = QUICK if args.quick else FULL
    sections = args.sections.split(",")
    from ramp.io import atomic_write_text
    from ramp.offline import set_offline_env

    set_offline_env()
    result: dict = {"command": "python benchmarks/reliability.py" + (" --quick" if args.quick else ""), "seconds": {}}
    work = Path(tempfile.mkdtemp(prefix="ramp-reliability-"))
    try:
        if "readers" in sections:
            t = time.perf_counter()
            result["readers"], result["reader_defects"] = readers(counts, args.seed, work / "readers")
            result["seconds"]["readers"] = round(time.perf_counter() - t, 1)
        if "cli" in sections or "params" in sections:
            from benchmarks import fuzz_cli

            if "cli" in sections:
                t = time.perf_counter()
                result["cli"] = fuzz_cli.cli_cases(str(work / "cli"))
                result["seconds"]["cli"] = round(time.perf_counter() - t, 1)
            if "params" in sections:
                t = time.perf_counter()
                result["params"] = fuzz_cli.params_cases(str(work / "params"))
                result["seconds"]["params"] = round(time.perf_counter() - t, 1)
        if "kill" in sections:
            from benchmarks import fuzz_kill

            t = time.perf_counter()
            result["kill"] = fuzz_kill.kill_points(counts["kill"], str(work / "kill"))
            result["seconds"]["kill"] = round(time.perf_counter() - t, 1)
        if "promotion_race" in sections:
            from benchmarks import fuzz_registry

            t = time.perf_counter()
            result["promotion_race"] = fuzz_registry.promotion_race(counts["race"], str(work / "race"))
            result["seconds"]["promotion_race"] = round(time.perf_counter() - t, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failures = reliability_failures(result)
    result["failures"] = failures
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "reader_defects"}, indent=2))
    print(f"wrote {args.out}: {len(failures)} failing counts")
    return 1 if failures else 0


def reliability_failures(result: dict) -> list[str]:
    """Every count that must be 0 and is not, as 'section.field = n'."""
    bad = []
    for reader, s in result.get("readers", {}).items():
        bad += [f"readers.{reader}.{k} = {s[k]}" for k in s if k not in ("cases", "clean", "valid") and s[k]]
    for section, fields in (
        ("cli", ("traceback", "partial_output")),
        ("params", ("traceback", "accepted_invalid")),
        ("promotion_race", ("wrong_champion", "errors")),
    ):
        bad += [f"{section}.{f} = {result[section][f]}" for f in fields if result.get(section, {}).get(f)]
    kill = result.get("kill")
    if kill and kill["recovered_same_sha"] != kill["points"]:
        bad.append(f"kill.recovered_same_sha = {kill['recovered_same_sha']} of {kill['points']}")
    return bad


if __name__ == "__main__":
    raise SystemExit(main())
