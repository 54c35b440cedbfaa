"""One job per output file: an exclusive lock next to the output that a killed job never leaves behind.

Two `vision-gpt caption` runs appending to one file would caption every image twice (each reads what is done only at
its start) and could interleave CSV headers. The lock is `flock` on `OUTPUT.lock`: the kernel drops it when its process
dies, even by `kill -9`, so a stale lock file blocks nobody, and the file records who holds it for the message the next
job prints.
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class OutputLockedError(ValueError):
    """Another live process holds the output's lock."""


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the holder has not written its details yet, or wrote them in a format we do not know


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"process {holder['pid']} on {holder.get('host', '?')} (started {started}: {holder.get('command', '?')})"


class OutputLock:
    """
    Exclusive lock on `output` for one job. `acquire()` returns notes for the user (a stale lock taken over) or raises
    `OutputLockedError` naming the file and the process that holds it; `release()` removes the lock file.

    Example:

    ```python
    >>> lock = OutputLock(Path("captions.jsonl"))
    >>> lock.acquire()
    []
    >>> lock.release()
    ```"""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.fd = None

    def acquire(self) -> list[str]:
        if fcntl is None:
            return [f"warning: no file locking on this platform; do not run two jobs on '{self.output}' at once."]
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputLockedError(
                    f"'{self.output}' is being written by {_describe(_holder(self.path))}. Wait for that job to "
                    f"finish (rerunning then resumes where it stopped), or pass another --output. Lock: {self.path}"
                ) from None
            # The previous holder unlinks the file before it lets go; if that happened between our open and our
            # flock, we hold a lock on a file no one else can see, so start again on the one at the path.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        stale = _holder(self.path)
        details = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                   "command": " ".join(["vision-gpt", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(details).encode("utf-8", "surrogateescape"))
        self.fd = fd
        if stale.get("pid"):
            return [f"{self.output}: took over the lock of {_describe(stale)}, which stopped without releasing it "
                    "(killed?)."]
        return []

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink while still holding the lock, so that the next job never locks a file that is about to vanish.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


__all__ = ["OutputLock", "OutputLockedError", "lock_path"]
