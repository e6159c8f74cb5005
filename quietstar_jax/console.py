"""What the command lines show of the library's log records.

Library modules log to `logging.getLogger(__name__)` (children of `quietstar_jax`) and
never print: a notebook sees their warnings through Python's logging defaults and
decides itself what else to show. The command lines (`train.py`,
`python -m quietstar_jax.generation`, `python -m quietstar_jax.evaluation`) run inside
`show_logs()`: INFO records go to stdout, WARNING and above to stderr, each as its bare
message, so the console reads as plain lines.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

LOGGER = "quietstar_jax"


class _StdStream(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to `sys.stdout` / `sys.stderr` as they are when a record is emitted, not
    when the handler was made (they may be replaced since, e.g. by a test's capture)."""

    def __init__(self, name: str, keep: logging.Filter | None = None) -> None:
        super().__init__(getattr(sys, name))
        self._name = name
        self.setFormatter(logging.Formatter("%(message)s"))
        if keep is not None:
            self.addFilter(keep)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self._name)
        super().emit(record)


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


@contextlib.contextmanager
def show_logs(level: int = logging.INFO) -> Iterator[None]:
    """Show the package's records from `level` up on the console while inside (INFO to
    stdout, WARNING and above to stderr); they do not reach the root logger's handlers
    (no duplicates under absl's handler)."""
    logger = logging.getLogger(LOGGER)
    handlers = [_StdStream("stdout", _Below(logging.WARNING)), _StdStream("stderr")]
    handlers[1].setLevel(logging.WARNING)
    saved = logger.level, logger.propagate
    for h in handlers:
        logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
