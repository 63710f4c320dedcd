"""One run per save folder: rank 0 holds an exclusive lock on ``SAVE/.lock`` for the life of the run.

Two runs writing one folder (a requeued job racing its old allocation, a mistyped path) would write the same
temporary checkpoint names and mix their files.  The lock is an ``flock`` on a file in the folder: the kernel
releases it when the holding process exits, however it exits (so a lock is never stale after its holder
died, and there is nothing to clean up), and a second run fails at once.  The file records who holds it
(host, pid, start time, command) for the second run's error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"


class SaveFolderBusy(RuntimeError):
    """Another live process holds the save folder's lock; the message names the folder and the holder."""


class SaveFolderLock:
    """An exclusive, non-blocking lock on ``folder`` (created if missing), held until :meth:`release` or exit."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(self._fd, 4096, 0))
            os.close(self._fd)
            raise SaveFolderBusy(
                f"--save {folder} is in use by another run ({holder}); wait for it to end, stop it, or choose "
                "another --save folder"
            ) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        info["command"] = " ".join(sys.argv)[:500]
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown"
