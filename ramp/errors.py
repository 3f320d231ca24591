"""The root of RAMP's error classes.

Every error the project raises on bad input (a file, a params value, a command-line argument) derives from
:class:`RampError`, next to the builtin it has always been (``ValueError``, ``OSError``, ...), so that callers that
catch the builtin keep working and the command line can turn every project error into one line on stderr.
A message names the bad file or value and what was expected.
"""

from __future__ import annotations


class RampError(Exception):
    """Bad input that RAMP detected and described; the message is meant for the user as-is."""
