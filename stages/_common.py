"""What every stage script shares: logging, the workspace (the repository root), one-line errors.

Each stage reads only its own sections of ``params.yaml`` (``ramp.params.STAGE_SECTIONS``) into frozen
dataclasses and calls its function in ``ramp.pipeline``; outputs are written atomically by that function. The
workspace also carries the quantization cache's bounds (section ``cache``, which is no stage's params: the cache's
size changes no output).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ramp.params import PARAMS_FILE, CacheParams, ParamsError, load_cache_params
from ramp.pipeline.workspace import Workspace


def workspace_from_params(path: str | Path = PARAMS_FILE) -> Workspace:
    """The repository-root workspace with the cache bounds of ``path``'s ``cache`` section (defaults when the
    file or the section is absent)."""
    cache = load_cache_params(path) if Path(path).exists() else CacheParams()
    return Workspace(cache_disk_bytes=cache.disk_bytes, cache_memory_bytes=cache.memory_bytes)


# built when a stage script is imported; an unreadable params.yaml is reported by stage_main (one line, exit 1)
_WORKSPACE_ERROR: ParamsError | None = None
try:
    WORKSPACE = workspace_from_params()
except ParamsError as e:
    WORKSPACE, _WORKSPACE_ERROR = Workspace(), e


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("RAMP_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from ramp.offline import set_offline_env

    set_offline_env()


def stage_main(name: str, run: Callable[[], Any]) -> None:
    """Run a stage: a project error (bad params, bad input: a :class:`ramp.errors.RampError`, or an OSError or
    ValueError on a file it reads) is one line on stderr, ``stage <name>: <Error>: <message>``, and exit 1;
    ``RAMP_VERBOSE=1`` shows the traceback."""
    from ramp.errors import RampError

    setup_logging()
    try:
        if _WORKSPACE_ERROR is not None:
            raise _WORKSPACE_ERROR
        run()
    except (RampError, OSError, ValueError) as e:
        if os.environ.get("RAMP_VERBOSE"):
            raise
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"stage {name}: {type(e).__name__}: {message}", file=sys.stderr)
        sys.exit(1)
