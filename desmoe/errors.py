"""User-facing errors: one line naming the file, key or value, never a stack dump.

Anything a user can cause (a bad config value, a missing file, an incomplete
launcher environment) raises :class:`UserError`.  Entry points wrap their
``main`` in :func:`run_cli`, which prints ``desmoe: error: <message>`` and exits
with status 2.  A run that cannot go on (:class:`TrainingFailure`, e.g. a NaN
loss) prints ``desmoe: failed: <message>`` and exits 1.  Programming errors keep
their traceback.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input; the message is the whole report."""


class ConfigError(UserError):
    """A config file, key or value is wrong."""


class LaunchError(UserError):
    """The process environment cannot start a distributed job."""


class TrainingFailure(Exception):
    """The run cannot continue (e.g. a non-finite loss); reported in one line, exit 1."""


def run_cli(main: Callable[[], T]) -> Callable[[], T]:
    """Decorate a CLI entry point so user mistakes end in one line on stderr."""

    @functools.wraps(main)
    def wrapper() -> T:
        try:
            return main()
        except UserError as err:
            message = " ".join(str(err).split())  # one line, whatever the message held
            print(f"desmoe: error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except TrainingFailure as err:
            print(f"desmoe: failed: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except KeyboardInterrupt:  # Ctrl-C reaches every rank of the terminal's job: a line each, not a traceback
            print("desmoe: interrupted (Ctrl-C); the work since the last checkpoint is lost, a new launch resumes "
                  "from it", file=sys.stderr, flush=True)
            raise SystemExit(130) from None  # 128 + SIGINT, what a shell reports for a job ended by Ctrl-C

    return wrapper
