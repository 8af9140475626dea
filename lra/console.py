"""The run's console output, kept: ``tee_console(path)`` copies everything written to stdout and stderr (the
suite's messages, Lightning's and Python's warnings, the progress bars) into ``<run folder>/train.log`` while it
still goes to the terminal.

Progress bars redraw one line with carriage returns; the log keeps only what a line finally said (a bar's final
state, not its hundreds of redraws), and drops terminal control sequences (cursor moves, colours).
"""

from __future__ import annotations

import contextlib
import re
import sys
import traceback
import warnings
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# Warnings that say nothing about the run (library internals), printed otherwise on every run.
KNOWN_NOISE = [
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning's pytree helper, torch >= 2.10
]


def quiet_known_noise() -> None:
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


class LineLog:
    """A file that receives terminal output and keeps final lines: ``\\r`` starts the current line again."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8", errors="replace")
        self.line = ""

    def write(self, text: str) -> None:
        text = ANSI.sub("", text)
        *done, self.line = (self.line + text).split("\n")
        for line in done:
            self.file.write(line.rsplit("\r", 1)[-1].rstrip() + "\n")
        if done:
            self.file.flush()

    def close(self) -> None:
        last = self.line.rsplit("\r", 1)[-1].rstrip()
        if last:
            self.file.write(last + "\n")
        self.file.close()


class Tee:
    """A text stream that writes to ``stream`` and to a ``LineLog``; everything else is ``stream``'s."""

    def __init__(self, stream, log: LineLog):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno, ...: the terminal's
        return getattr(self._stream, name)


@contextlib.contextmanager
def tee_console(path: Path | None):
    """Within the block, stdout and stderr are also written to ``path`` (appended; None: nothing is kept). An
    exception leaving the block is written to the log (only: whoever catches it prints it on the console)."""
    if path is None:
        yield
        return
    log = LineLog(Path(path))
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(out, log), Tee(err, log)
    try:
        yield
    except Exception:  # the caller (Hydra) prints it on the console; the log keeps it too
        log.write(traceback.format_exc())
        raise
    finally:
        sys.stdout, sys.stderr = out, err
        log.close()
