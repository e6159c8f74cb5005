"""The training workdir: checks before anything is written, and the lock that keeps
a second trainer out of it.

`check_workdir` finds what would make the first write fail (the workdir is a file,
a parent is a file, the directory is read-only) without creating anything, so the
trainer can say so in one line before loading or compiling anything.

`WorkdirLock` is `<workdir>/train.lock`, holding the pid, host and start time of the
trainer that uses the workdir, and locked with `flock` while it runs: the kernel
releases the lock when the process ends however it ends, so a lock file left behind
by a killed trainer is recognised as stale and taken over (with a note), and one
whose trainer still runs makes the next one refuse, naming it. Where the file system
has no `flock`, a lock file is live when its pid runs on this host (or it was
written on another host, which this host cannot check). Taken once at start and
released at the end: nothing per step.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any

LOCK_NAME = "train.lock"

try:  # POSIX; elsewhere the pid check stands in
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None  # type: ignore[assignment]


class WorkdirBusy(ValueError):
    """Another trainer holds the workdir (one line naming it)."""


def _reason(path: str) -> str:
    """Why `path` (an existing directory) cannot be written to."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def check_workdir(workdir: str) -> None:
    """Raise ValueError (one line naming the path) when `workdir` cannot be used:
    it is a file, a parent of it is a file, or the directory that would hold it (it
    or its nearest existing parent) is not writable. Creates nothing."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir} is a file, not a directory")
    existing = workdir
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise ValueError(f"workdir {workdir} cannot be created: {existing} is a file, not a "
                         "directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == workdir:
            raise ValueError(f"workdir {workdir} is not writable ({_reason(existing)})")
        raise ValueError(f"workdir {workdir} cannot be created: {existing} is not writable "
                         f"({_reason(existing)})")


def _describe(holder: dict[str, Any]) -> str:
    parts = [f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"]
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    return ", ".join(parts)


def _read(fd: int) -> dict[str, Any] | None:
    """The holder recorded in an open lock file, or None when it is empty/unreadable."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace").strip()
        holder = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class WorkdirLock:
    """`<workdir>/train.lock`, held from `acquire` to `release`."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def _busy(self, holder: dict[str, Any] | None) -> WorkdirBusy:
        who = _describe(holder) if holder else "a process that has not written its pid yet"
        return WorkdirBusy(f"workdir {self.workdir} is in use by another trainer ({who}; lock "
                           f"file {self.path}); wait for it to finish or stop it")

    def check_free(self) -> None:
        """Raise WorkdirBusy when a running trainer holds the lock; writes nothing
        (the early check, before the model is loaded)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # no lock file (or unreadable: `acquire` will say why)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise self._busy(_read(fd)) from None
                except OSError:
                    self._check_pid(_read(fd))
                else:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                self._check_pid(_read(fd))
        finally:
            os.close(fd)

    def _check_pid(self, holder: dict[str, Any] | None) -> None:
        """Without flock: a holder whose pid runs here, or one on another host, is live."""
        if holder is None or holder.get("pid") == os.getpid():
            return
        if holder.get("host") != socket.gethostname() or _pid_alive(holder.get("pid")):
            raise self._busy(holder)

    def acquire(self) -> str | None:
        """Create the workdir if needed and take the lock; returns a note when a stale
        lock (its trainer gone) was taken over. Raises WorkdirBusy when a running
        trainer holds it, OSError when the workdir cannot be written."""
        os.makedirs(self.workdir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                previous = self._lock(fd)
                try:  # the holder before us may have removed the file we opened
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                record = {"pid": os.getpid(), "host": socket.gethostname(),
                          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(record) + "\n").encode())
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            if previous is None:
                return None
            return (f"note: took over the stale lock {self.path} ({_describe(previous)}; "
                    "that trainer is gone)")

    def _lock(self, fd: int) -> dict[str, Any] | None:
        """Lock `fd`; the stale holder it records, if any."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return _read(fd)  # a record left there: its trainer ended without releasing
            except BlockingIOError:
                raise self._busy(_read(fd)) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        holder = _read(fd)
        self._check_pid(holder)
        return holder

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing releases the flock
