"""Background servers of the platform (the embedded graph server, the classification service).

Each runs as a detached process in a session of its own, writes its output to a log file, and keeps a pid file
that it writes once it serves and removes when it stops. ``start``, ``running_pid`` and ``stop`` are the one place
that handles those processes; the servers supply their command, their readiness check and their error type.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def running_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` while that process is alive; None when there is no file or no such process."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user
    return pid


def start(command: list[str], log_path: Path, ready: Callable[[int], T | None], *, what: str,
          error: type[Exception], timeout: float, poll: float = 0.5, **popen: Any) -> tuple[subprocess.Popen, T]:
    """Start ``command`` detached, its output appended to ``log_path``, and wait until ``ready(pid)`` returns a value.

    ``ready`` should check that the pid file holds ``pid`` (the process started here, not one started before or
    beside it) as well as that the server answers; ``is_ours`` does the first.

    The server's folder (the log's) is private to the user: mode 0700, the log 0600, and the server runs with
    umask 077, so its data, keys and logs are readable by no one else whatever the caller's umask.

    Raises ``error`` naming the log when the process exits first or is not ready within ``timeout`` seconds (it is
    then sent SIGTERM, with everything it started).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path.parent.chmod(0o700)
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        os.fchmod(log.fileno(), 0o600)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, umask=0o077, **popen)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"{what} exited with {process.returncode} while starting; see {log_path}")
        result = ready(process.pid)
        if result is not None:
            return process, result
        time.sleep(poll)
    os.killpg(process.pid, signal.SIGTERM)
    raise error(f"{what} was not ready within {timeout:.0f}s; see {log_path}")


def is_ours(pid_file: Path, pid: int) -> bool:
    """Whether ``pid_file`` names the live process ``pid``: the server has written it, so it is serving."""
    return running_pid(pid_file) == pid


def stop(pid_file: Path, timeout: float, poll: float = 0.2) -> int | None:
    """Stop the process of ``pid_file``: SIGTERM, then SIGKILL after ``timeout`` seconds. Returns its pid, or None
    when none was running. The pid file is gone afterwards."""
    pid = running_pid(pid_file)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while running_pid(pid_file) is not None and time.monotonic() < deadline:
            time.sleep(poll)
        if running_pid(pid_file) is not None:
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return pid
