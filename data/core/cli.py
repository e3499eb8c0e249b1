"""How every `python -m` command talks to its user: one logging channel, one error convention.

- Messages (progress notes, warnings) go through `logging`; `configure_logging` sends them to
  stderr through tqdm, so they never break a progress bar. `-v` shows debug messages, `-q` only
  warnings and errors, `--log-level` sets any level.
- An error the user can fix (`data.core.errors.UserError`) is printed as one `error: ...`
  paragraph without a traceback, exit status 1 (`run_cli`); so is a write that fails on a read-only
  or unwritable folder or a full disk (`data.core.errors.output_error`). training.py and validation.py follow
  the same convention through Sacred (configs/experiment.py).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from tqdm import tqdm

from data.core.errors import UserError, fixable_error

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXIT_USER_ERROR = 1


class TqdmHandler(logging.Handler):
    """A stderr handler that writes between progress-bar refreshes instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _LowercaseLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def configure_logging(level: str = "INFO") -> None:
    """Route every logger of the project to stderr at `level` (idempotent: replaces our handler)."""
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, TqdmHandler)]
    handler = TqdmHandler()
    handler.setFormatter(_LowercaseLevel("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """-v / -q / --log-level, read by `run_cli`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="DEBUG",
                       help="also show debug messages")
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="WARNING",
                       help="only warnings and errors")
    group.add_argument("--log-level", dest="log_level", choices=LEVELS, help="message level (default INFO)")
    parser.set_defaults(log_level="INFO")


def run_cli(main_body: Callable[[], int], args: argparse.Namespace | None = None) -> int:
    """Configure logging from `args` (see add_logging_arguments), run a command body, and turn a
    `UserError` into one `error: ...` paragraph on stderr and exit code 1 (no traceback: the
    message names the file or key and the fix)."""
    configure_logging(getattr(args, "log_level", None) or "INFO")
    try:
        return main_body()
    except (UserError, OSError) as err:
        fixable = fixable_error(err)
        if fixable is None:
            raise
        print(f"error: {fixable}", file=sys.stderr)
        return EXIT_USER_ERROR
