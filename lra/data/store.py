"""Safe files for the data layer: inter-process locks, unique temporaries, stale-temporary cleanup and content
fingerprints.

* ``lock(target, what)``: an exclusive ``fcntl.flock`` on ``<target>.lock`` (next to ``target``), held while one
  process makes ``target`` (generates a data set, prepares a cache, extracts the release); a second process
  waits (it says for whom) and then finds the result made. The kernel drops the lock of a killed process.
* ``partial_name(final)``: ``<final>.partial-<host>-<pid>``, the unique temporary a file or folder is written
  under before its atomic rename to ``final``.
* ``remove_stale_partials(folder)``: removes the temporaries left in ``folder`` by killed processes of this host
  (their process is gone); those of live processes and of other hosts (a shared file system) are left alone.
* ``FingerprintIndex``: the SHA-256 of each source file's content, computed once and kept in a JSON index keyed
  by path with the file's size, ``mtime_ns``, ``ctime_ns`` and inode; a file whose stat differs is hashed again.
  ``ctime`` cannot be set back by ``tar``, ``rsync -t`` or ``cp -p``, so an edit that keeps size and mtime is
  still seen. Files changed within ``RACY_WINDOW_NS`` of hashing are not remembered (hashed again next time):
  a write in the same timestamp tick would otherwise go unseen.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no inter-process lock (renames stay atomic)
    fcntl = None

HOST = socket.gethostname() or "localhost"
PARTIAL = re.compile(r"\.partial-(?:(?P<host>.+)-)?(?P<pid>\d+)$")  # <host>- absent: written by older versions
RACY_WINDOW_NS = 2_000_000_000
HASH_CHUNK = 1 << 20
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


# ---- content fingerprints -----------------------------------------------------------------------------------
def hash_file(path: Path) -> str:
    """SHA-256 of the file's content (hex, the first 128 bits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def signature(st: os.stat_result) -> list[int]:
    """What a cheap re-check compares: size, mtime_ns, ctime_ns, inode."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


MISSING, NOT_A_FILE = "missing", "not a regular file"


def _data_error(message: str) -> Exception:
    from lra.data.base import DataError  # here: lra.data.base imports this module

    return DataError(message)


class FingerprintIndex:
    """Content fingerprints of files, remembered in ``index_file`` (JSON ``{folder: {name: [size, mtime_ns,
    ctime_ns, inode, sha256]}}``) so that a file is hashed once and later only stat'ed."""

    def __init__(self, index_file: Path):
        self.file = Path(index_file)
        self.entries = self._load()
        self.updates: dict[str, dict[str, list | None]] = {}

    def _load(self) -> dict:
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):  # absent or damaged: every file is hashed again
            return {}
        return data.get("files", {}) if isinstance(data, dict) else {}

    def digest(self, path: Path, strict: bool = True) -> tuple[str, list[int] | None]:
        """``(fingerprint, stat signature)`` of ``path``. Not strict: a missing path, a directory or an
        unreadable file gets a fingerprint saying so (``missing``, ``not a regular file``, ``unreadable: ...``)
        instead of an error."""
        text = os.fspath(path)
        where, _, name = (text if os.path.isabs(text) else os.path.abspath(text)).rpartition(os.sep)
        try:
            st = os.stat(text)
        except FileNotFoundError:
            if strict:
                raise _data_error(f"{path} does not exist.") from None
            self.updates.setdefault(where, {})[name] = None
            return MISSING, None
        except OSError as err:
            if strict:
                raise _data_error(f"{path}: cannot read it ({err.strerror}). Fix its permissions.") from None
            return f"unreadable: {err.strerror}", None
        if not stat.S_ISREG(st.st_mode):
            if strict:
                raise _data_error(f"{path} is not a regular file. Put the file there (or remove what is there).")
            return NOT_A_FILE, None
        sig = signature(st)
        known = self.entries.get(where, {}).get(name)
        if isinstance(known, list) and known[:4] == sig:
            return known[4], sig
        started = time.time_ns()
        try:
            value = hash_file(path)
        except OSError as err:
            if strict:
                raise _data_error(f"{path}: cannot read it ({err.strerror}). Fix its permissions.") from None
            return f"unreadable: {err.strerror}", sig
        fresh = max(st.st_mtime_ns, st.st_ctime_ns) > started - RACY_WINDOW_NS
        self.updates.setdefault(where, {})[name] = None if fresh else [*sig, value]
        return value, sig

    def save(self) -> None:
        """Merge this object's updates into the index file (under its lock, atomically)."""
        if not self.updates:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with lock(self.file, "updating the fingerprint index"):
            current = self._load()
            for where, names in self.updates.items():
                folder = current.setdefault(where, {})
                for name, entry in names.items():
                    if entry is None:
                        folder.pop(name, None)
                    else:
                        folder[name] = entry
                if not folder:
                    del current[where]
            tmp = partial_name(self.file)
            tmp.write_text(json.dumps({"version": 1, "files": current}, separators=(",", ":")))
            os.replace(tmp, self.file)
        self.entries, self.updates = current, {}
