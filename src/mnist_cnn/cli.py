"""The frame every command runs in, stages and tools alike: a mistake the user can fix is one line on
stderr and exit 2, never a traceback; Ctrl-C and SIGTERM end it as interrupted (exit 130)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix (bad params, bad data, unreachable source): one line, see `run_stage`."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a command's main(): a UserError becomes one line on stderr and exit 2. SIGTERM (`dvc queue
    kill`, a scheduler) is handled like Ctrl-C, so a stage's MLflow run ends KILLED, not RUNNING."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
