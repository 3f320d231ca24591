"""Screenshots of what a user looks at after ``make demo``, taken by a real browser (Debian's headless Chromium).

For a project where the demo ran (``data/export/report.html``, ``mlflow.db`` with a ``ramp-policy`` champion,
``.prefect/`` with a ``ramp-pipeline`` flow run), this starts the MLflow UI and the Prefect server on free local
ports, opens three pages in Chromium (the run's HTML report, the MLflow page of the champion ``ramp-policy``
version, the Prefect page of the latest flow run), saves a PNG of each into ``docs/`` and checks, on the DOM
Chromium rendered (scripts run), that each page shows the run's own numbers: the report RAMP's KLD and the
GGUF's sha256, the MLflow page the version, its alias and its recorded held-out KLD, the Prefect page the flow
run's name, its flow, its state and its number of task runs. Any check that fails is an error (exit 1).

    python benchmarks/screenshots.py --project . --docs docs --out results/screenshots.json  (make bench-screenshots)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what the environment guide says Chromium needs on a machine with a closed network
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class CheckFailed(AssertionError):
    """A page did not show what the run recorded."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=5).read()
            return
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


@contextlib.contextmanager
def server(cmd: list[str], health: str, env: dict[str, str], log: Path) -> Iterator[None]:
    """A server process for the duration of the block (its output in ``log``), killed with its children."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def chromium(url: str, profile: Path, *args: str, budget_ms: int = 20000) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"chromium {url} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


def shoot(url: str, png: Path, expect: dict[str, str], size: str = "1400,1000") -> dict:
    """Screenshot ``url`` into ``png`` and check its rendered DOM contains each value of ``expect``."""
    with tempfile.TemporaryDirectory(prefix="ramp-chromium-") as d:
        dom = chromium(url, Path(d) / "profile", "--dump-dom").stdout
        png.parent.mkdir(parents=True, exist_ok=True)
        tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp.png")
        chromium(url, Path(d) / "profile", f"--screenshot={tmp}", f"--window-size={size}")
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise RuntimeError(f"chromium wrote no screenshot of {url}")
        tmp.replace(png)
    missing = {k: v for k, v in expect.items() if v not in dom}
    if missing:
        raise CheckFailed(f"{url}: the rendered page does not show {missing}")
    print(f"{png}: {url} shows {sorted(expect)}")
    return {"url": url, "png": str(png), "checked": expect}


def mlflow_champion(project: Path) -> tuple[str, dict[str, str]]:
    """The champion version of ``ramp-policy`` and its tags, read from the project's registry."""
    sys.path.insert(0, str(REPO))
    from mlflow.tracking import MlflowClient

    from flows.registry import MODEL_NAME, setup

    setup(project)
    mv = MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion")
    return str(mv.version), dict(mv.tags)


def latest_flow_run(api: str) -> dict:
    body = json.dumps({"sort": "START_TIME_DESC", "limit": 1, "flows": {"name": {"any_": ["ramp-pipeline"]}}})
    req = urllib.request.Request(
        f"{api}/flow_runs/filter", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    runs = json.loads(urllib.request.urlopen(req, timeout=30).read())
    if not runs:
        raise CheckFailed(f"{api}: no ramp-pipeline flow run recorded (run `make demo` first)")
    return runs[0]


def task_runs(api: str, flow_run: str) -> int:
    """How many task runs the flow run had (one per DVC stage, plus the registry gate when a policy was trained)."""
    body = json.dumps({"flow_runs": {"id": {"any_": [flow_run]}}})
    req = urllib.request.Request(
        f"{api}/task_runs/count", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    return int(json.loads(urllib.request.urlopen(req, timeout=30).read()))


def take(project: Path, docs: Path) -> dict:
    """The three screenshots of a project where the demo ran; returns what was shot and checked."""
    project = project.resolve()
    report = project / "data" / "export" / "report.html"
    export = json.loads((project / "data" / "metrics" / "export.json").read_text())
    evaluate = json.loads((project / "data" / "metrics" / "evaluate.json").read_text())
    if not report.exists():
        raise SystemExit(f"{report} does not exist: run `make demo` first")
    shots = [
        shoot(
            report.as_uri(),
            docs / "report.png",
            {"ramp KLD": f"{evaluate['ramp_kld_mean']:.4f}", "GGUF sha256": export["sha256"]},
            size="1400,2400",
        )
    ]
    version, tags = mlflow_champion(project)
    kld_tag = next((v for k, v in sorted(tags.items()) if k.startswith("eval.kld_mean.")), None)
    if kld_tag is None:
        raise CheckFailed(f"ramp-policy v{version} has no eval.kld_mean.<budget> tag: {sorted(tags)}")
    env = dict(os.environ)
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_UI_ENABLED"] = "true"
    env.pop("PREFECT_API_URL", None)
    mport, pport = free_port(), free_port()
    logs = Path(tempfile.mkdtemp(prefix="ramp-ui-logs-"))
    mlflow_cmd = [
        str(VENV_BIN / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(mport),
        "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}", "--default-artifact-root",
        str(project / "mlartifacts"),
    ]  # fmt: skip
    with server(mlflow_cmd, f"http://127.0.0.1:{mport}/health", env, logs / "mlflow.log"):
        shots.append(
            shoot(
                f"http://127.0.0.1:{mport}/#/models/ramp-policy/versions/{version}",
                docs / "mlflow-champion.png",
                {"model": "ramp-policy", "alias": "champion", "held-out KLD": kld_tag[:8]},
            )
        )
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{pport}/api"  # the UI calls the API it was served with
    prefect_cmd = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pport)]
    with server(prefect_cmd, f"http://127.0.0.1:{pport}/api/health", env, logs / "prefect.log"):
        run = latest_flow_run(f"http://127.0.0.1:{pport}/api")
        state = run["state"]["name"] if run.get("state") else run.get("state_name")
        if state != "Completed":
            raise CheckFailed(f"flow run {run['name']} is {state}, not Completed")
        shots.append(
            shoot(
                f"http://127.0.0.1:{pport}/runs/flow-run/{run['id']}",
                docs / "prefect-flow-run.png",
                {
                    "flow run": run["name"],
                    "flow": "ramp-pipeline",
                    "state": "Completed",
                    "task runs": f"{task_runs(f'http://127.0.0.1:{pport}/api', run['id'])} Task runs",
                },
            )
        )
    shutil.rmtree(logs, ignore_errors=True)
    return {"champion_version": int(version), "flow_run": run["id"], "shots": shots}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=REPO)
    ap.add_argument("--docs", type=Path, default=REPO / "docs")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "screenshots.json")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM}: no Chromium; install Debian's package (apt-get install chromium)")
    result = take(args.project, args.docs)
    result["command"] = "python benchmarks/screenshots.py  (make bench-screenshots)"
    sys.path.insert(0, str(REPO))
    from ramp.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
