"""What every stage script shares: logging, the workspace (the repository root), one-line errors.

Each stage reads only its own sections of ``params.yaml`` (``ramp.params.STAGE_SECTIONS``) into frozen
dataclasses and calls its function in ``ramp.pipeline``; outputs are written atomically by that function.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from ramp.pipeline.workspace import Workspace

WORKSPACE = Workspace()


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
        run()
    except (RampError, OSError, ValueError) as e:
        if os.environ.get("RAMP_VERBOSE"):
            raise
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"stage {name}: {type(e).__name__}: {message}", file=sys.stderr)
        sys.exit(1)
