"""One error family and one command-line error tail for the whole project.

Every error nnunet-feddah raises about its input or its state derives from :class:`FedDAHError`, so a
caller (a CLI, the Flower adapter, a user's script) can catch the project's errors in one clause and
let genuine bugs through. Each subclass keeps the built-in base it always had (``ValueError`` for bad
input, ``OSError`` for the environment, ``RuntimeError`` for processes), so existing ``except`` clauses
keep working. Messages name the file, the field and the fix.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


class FedDAHError(Exception):
    """Base of every error the project raises on bad input, a bad environment or an unusable state."""


def run_cli(prog: str, action: Callable[[], int | None]) -> int:
    """Run a command's body; a project error, ``ValueError`` or ``OSError`` becomes one line on stderr and exit 2.

    The one place that turns an expected failure into ``<prog>: error: <message>`` (no traceback): the
    message already says what is wrong and how to fix it. Anything else is a bug and propagates.
    """
    try:
        code = action()
    except (FedDAHError, ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK if code is None else code
