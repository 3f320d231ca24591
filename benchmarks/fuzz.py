"""Run fuzz cases in isolated worker processes and count their outcomes (issue 20).

A :class:`Case` names a function (``"module:function"``) and its arguments. A worker process (spawned once,
reused until a case hangs or crashes it) calls it with a memory limit on its address space; the function
returns ``"valid"`` (the input was accepted and is genuinely valid, by the case's own oracle) or
``"accepted_corrupt"`` (accepted although it is corrupt). The outcome is:

- ``clean``: the function raised a :class:`ramp.errors.RampError` (one clear project error);
- ``valid`` / ``accepted_corrupt``: what the function returned;
- ``other``: any other exception (its type and message are kept);
- ``memory``: ``MemoryError`` or an allocator failure under the address-space limit;
- ``hang``: no answer within the timeout (the worker is killed and replaced);
- ``crash``: the worker died (a signal or an abort in native code).

Everything but ``clean`` and ``valid`` is a defect.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import resource
import time
import traceback
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

OUTCOMES = ("clean", "valid", "other", "hang", "crash", "memory", "accepted_corrupt")
DEFECTS = tuple(o for o in OUTCOMES if o not in ("clean", "valid"))


@dataclass(frozen=True)
class Case:
    reader: str  # the result group ("gguf", "imatrix", ...)
    name: str  # what was mutated, for the report
    target: str  # "module:function", called as function(*args) in a worker
    args: tuple = ()


@dataclass
class Report:
    counts: dict[str, Counter] = field(default_factory=dict)
    defects: list[dict[str, str]] = field(default_factory=list)

    def add(self, case: Case, outcome: str, detail: str) -> None:
        self.counts.setdefault(case.reader, Counter())[outcome] += 1
        if outcome in DEFECTS:
            self.defects.append({"reader": case.reader, "case": case.name, "outcome": outcome, "detail": detail[:500]})

    def summary(self) -> dict[str, dict[str, int]]:
        return {
            reader: {"cases": sum(c.values()), **{o: c.get(o, 0) for o in OUTCOMES}}
            for reader, c in sorted(self.counts.items())
        }


def _is_memory_error(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "std::bad_alloc" in str(e)


def _worker(conn: Any, memory_mb: int) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from ramp.errors import RampError

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + memory_mb * 2**20, hard))
    conn.send(("ready", ""))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        target, args = msg
        module, _, name = target.partition(":")
        try:
            result = getattr(importlib.import_module(module), name)(*args)
            if result not in ("valid", "accepted_corrupt"):
                raise TypeError(f"{target} returned {result!r}, expected 'valid' or 'accepted_corrupt'")
            conn.send((result, ""))
        except RampError as e:
            conn.send(("clean", f"{type(e).__name__}: {e}"))
        except BaseException as e:  # noqa: BLE001 - classifying every failure is the point
            kind = "memory" if _is_memory_error(e) else "other"
            conn.send((kind, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"))


class _Worker:
    def __init__(self, memory_mb: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, memory_mb), daemon=True)
        self.proc.start()
        if not self.conn.poll(300):
            raise RuntimeError("fuzz worker did not start within 300 s")
        self.conn.recv()

    def run(self, case: Case, timeout_s: float) -> tuple[str, str]:
        try:
            self.conn.send((case.target, case.args))
        except (BrokenPipeError, OSError):
            return "crash", "worker gone before the case was sent"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.conn.poll(0.05):
                try:
                    return self.conn.recv()
                except EOFError:
                    break
            if not self.proc.is_alive():
                break
        self.proc.join(1.0)  # a worker that just died is reaped here, not mistaken for a hang
        if self.proc.is_alive():
            self.close(kill=True)
            return "hang", f"no answer within {timeout_s:g} s"
        return "crash", f"worker exited with code {self.proc.exitcode}"

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def run_cases(
    cases: Iterable[Case], timeout_s: float = 30.0, memory_mb: int = 3072, report: Report | None = None
) -> Report:
    """Run every case in a worker process (replaced after a hang or a crash); the counted outcomes."""
    cases = list(cases)
    report = report or Report()
    worker: _Worker | None = None
    try:
        for case in tqdm(cases, desc="fuzz cases", unit="case"):
            if worker is None or not worker.proc.is_alive():
                worker = _Worker(memory_mb)
            outcome, detail = worker.run(case, timeout_s)
            report.add(case, outcome, detail)
            if outcome in ("hang", "crash"):
                worker.close(kill=True)
                worker = None
    finally:
        if worker is not None:
            worker.close()
    return report
