"""One writer per run directory: ``<run>/.lock`` names the process that holds it.

Two processes training into one directory corrupt it (one renames a checkpoint over the
other's, one truncates ``log.jsonl`` while the other appends to the unlinked file). The lock
is a file created with ``O_EXCL`` holding ``{"pid", "host", "started"}``:

- a lock of a live process is a ``RunLockedError`` that says who holds it;
- a lock left by a dead process on this host (a SIGKILL, a power cut) is stale and taken over;
- a lock from another host cannot be checked from here (its pid means nothing on this
  machine): it is honoured, and the message says which file to remove if that run is gone.

An advisory ``flock`` would release itself when the process dies, but it is unreliable on the
network file systems clusters keep their runs on; a pid and a host name are not, and tell the
user who is writing.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "lock_holder"]

LOCK_FILE = ".lock"


class RunLockedError(ValueError):
    """The run directory is being written by another live process."""


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def lock_holder(run_dir: str | os.PathLike) -> dict | None:
    """What the lock file of ``run_dir`` says (pid, host, started), or None if there is none.
    An unreadable lock (cut short by a kill between create and write) reads as ``{}``."""
    path = Path(run_dir) / LOCK_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _is_stale(holder: dict) -> bool:
    if not holder:
        # Empty: its writer died between creating and filling it (writing takes microseconds),
        # or it is being filled right now; a second look tells the two apart.
        return True
    if holder.get("host") != _host():
        return False
    pid = holder.get("pid")
    return not isinstance(pid, int) or (pid != os.getpid() and not _alive(pid))


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.lock`` for the block (``acquire``/``release``
    for longer spans). Re-entrant within one process."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.held = False
        self.took_over: dict | None = None  # the stale holder replaced, for a notice

    def acquire(self) -> RunLock:
        if self.held:
            return self
        payload = json.dumps({"pid": os.getpid(), "host": _host(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        for attempt in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock_holder(self.run_dir)
                if holder is None:
                    continue  # released between our two looks
                if holder.get("pid") == os.getpid() and holder.get("host") == _host():
                    self.held = True  # this process holds it already (a second recipe in one run)
                    return self
                if not holder and attempt == 0:
                    time.sleep(0.05)  # perhaps being written right now
                    continue
                if not _is_stale(holder):
                    raise RunLockedError(self._held_message(holder)) from None
                self.took_over = holder
                # Remove the stale file and race for O_EXCL again: of two processes taking
                # over at once, exactly one creates the new file.
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            return self
        raise RunLockedError(self._held_message(lock_holder(self.run_dir) or {}))

    def _held_message(self, holder: dict) -> str:
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
        since = f" since {holder['started']}" if holder.get("started") else ""
        remote = holder.get("host") not in (None, _host())
        hint = (f"if that run is gone, remove {self.path}" if remote
                else "wait for it to finish or stop it")
        return f"{self.run_dir} is in use by {who}{since} ({hint})"

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = lock_holder(self.run_dir)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == _host():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
