"""Safe files for the data layer: inter-process locks, unique temporaries and stale-temporary cleanup.

* ``lock(target, what)``: an exclusive ``fcntl.flock`` on ``<target>.lock`` (next to ``target``), held while one
  process makes ``target`` (generates a data set, prepares a cache, extracts the release); a second process
  waits (it says for whom) and then finds the result made. The kernel drops the lock of a killed process.
* ``partial_name(final)``: ``<final>.partial-<host>-<pid>``, the unique temporary a file or folder is written
  under before its atomic rename to ``final``.
* ``remove_stale_partials(folder)``: removes the temporaries left in ``folder`` by killed processes of this host
  (their process is gone); those of live processes and of other hosts (a shared file system) are left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no inter-process lock (renames stay atomic)
    fcntl = None

HOST = socket.gethostname() or "localhost"
PARTIAL = re.compile(r"\.partial-(?:(?P<host>.+)-)?(?P<pid>\d+)$")  # <host>- absent: written by older versions
_warned_no_lock: set[str] = set()


def partial_name(final: Path) -> Path:
    """The unique temporary ``final`` is written under by this process: ``<final>.partial-<host>-<pid>``."""
    return final.with_name(f"{final.name}.partial-{HOST}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (when unsure: yes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the temporaries (``*.partial-<host>-<pid>``, and the older ``*.partial-<pid>``) under ``folder``
    whose process is gone from this host; returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = PARTIAL.search(entry.name)
        if not match or match["host"] not in (None, HOST) or pid_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextmanager
def lock(target: Path, what: str):
    """Hold the exclusive inter-process lock of ``target`` (the file ``<target>.lock``) for the block.

    A process that finds it held says what it waits for (``what``, e.g. "preparing listops") and waits.
    On a file system without ``flock`` the block runs unlocked, with a warning (callers still rename atomically).
    """
    path = Path(target).with_name(Path(target).name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                print(f"[lra] waiting for {holder} to finish {what} (lock {path})", flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as err:  # e.g. ENOLCK on a network file system without locks
                if str(path.parent) not in _warned_no_lock:
                    _warned_no_lock.add(str(path.parent))
                    print(f"[lra] warning: cannot lock {path} ({err.strerror}); {what} runs unlocked",
                          file=sys.stderr, flush=True)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {HOST} ({what})\n")
            handle.flush()
        yield  # closing the file releases the lock


def make_once(target: Path, done, make, what: str) -> bool:
    """Run ``make()`` unless ``done()``, under ``target``'s lock, checking ``done()`` again once the lock is
    held (a concurrent process may have made it meanwhile). Returns whether this process made it."""
    if done():
        return False
    with lock(target, what):
        if done():
            return False
        make()
        return True
