"""Log lines on stderr: with their own time stamp on a terminal or in a file, for journald under systemd.

journald stamps every line itself and reads a syslog priority from a `<N>`
prefix (sd-daemon(3)), so under systemd a line carries no time of its own,
and its level as that prefix: `journalctl -p warning` then shows warnings and
worse. Whether stderr is the journal is what systemd says in JOURNAL_STREAM
(the device and inode of the stream it connected): matched against stderr
itself, not merely present, since a shell started from a service inherits
the variable with another stderr. Node processes a supervisor starts share its
stderr and environment, so they log the same way.
"""

from __future__ import annotations

import logging
import os
import sys

# sd-daemon(3): the syslog priorities journald reads from a line's `<N>` prefix.
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
PLAIN = "%(asctime)s %(name)s %(levelname)s %(message)s"
JOURNAL = "%(name)s %(levelname)s %(message)s"


def to_journal(stream=None) -> bool:
    """Whether `stream` (stderr) is the journal stream systemd connected."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):   # closed or not a file: not the journal
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (one between two levels takes the more severe)."""
    return next((p for level, p in sorted(PRIORITY.items()) if levelno <= level), 2)


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback's too) prefixed with the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def setup(level: int) -> None:
    """Log to stderr at `level`, in the form its reader wants."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(JOURNAL) if to_journal() else logging.Formatter(PLAIN))
    logging.basicConfig(level=level, handlers=[handler])


def error_line(text: str) -> str:
    """A line a command prints on stderr itself (not through logging), as an error for the journal."""
    return f"<{PRIORITY[logging.ERROR]}>{text}" if to_journal() else text
