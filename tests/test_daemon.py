"""Background server processes (``ogclip.daemon``) with real child processes: start, readiness, exit, stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ogclip import daemon


class StartError(RuntimeError):
    pass


def _server(pid_file: Path, ignore_sigterm: bool = False, ready_after: float = 0.0) -> list[str]:
    """A stand-in server: writes its pid file after ``ready_after`` seconds and sleeps until signalled."""
    code = (
        "import os, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, {'signal.SIG_IGN' if ignore_sigterm else 'lambda *_: sys.exit(0)'})\n"
        f"time.sleep({ready_after})\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print('serving', flush=True)\n"
        "while True: time.sleep(0.1)\n"
    )
    return [sys.executable, "-c", code]


def _ready(pid_file: Path):
    return lambda pid: pid if daemon.is_ours(pid_file, pid) else None


def test_start_waits_for_ready_and_stop_terminates(tmp_path: Path) -> None:
    pid_file, log = tmp_path / "server.pid", tmp_path / "logs" / "server.log"
    pid_file.write_text(str(os.getpid()))  # a live process that is not the server: not a sign that it is ready
    process, pid = daemon.start(_server(pid_file, ready_after=0.5), log, _ready(pid_file), what="test server",
                                error=StartError, timeout=30, poll=0.05)
    assert pid == process.pid == daemon.running_pid(pid_file)
    assert os.getsid(pid) == pid, "the server runs in a session of its own"
    assert daemon.stop(pid_file, timeout=10) == pid
    assert process.wait(timeout=10) == 0, "stopped by SIGTERM, which it handles"
    assert not pid_file.exists() and daemon.running_pid(pid_file) is None
    assert "serving" in log.read_text()
    assert daemon.stop(pid_file, timeout=10) is None, "stopping a stopped server is a no-op"


def test_stop_kills_a_server_that_ignores_sigterm(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    process, pid = daemon.start(_server(pid_file, ignore_sigterm=True), tmp_path / "server.log", _ready(pid_file),
                                what="test server", error=StartError, timeout=30, poll=0.05)
    started = time.monotonic()
    assert daemon.stop(pid_file, timeout=1.0) == pid
    assert process.wait(timeout=10) == -9 and time.monotonic() - started >= 1.0
    assert not pid_file.exists()


def test_start_reports_an_exit_and_a_timeout_with_the_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    crash = [sys.executable, "-c", "import sys; print('no config', flush=True); sys.exit(3)"]
    with pytest.raises(StartError, match=f"test server exited with 3 while starting; see {log}"):
        daemon.start(crash, log, lambda _: None, what="test server", error=StartError, timeout=30, poll=0.05)
    assert "no config" in log.read_text()

    pid_file = tmp_path / "never.pid"
    with pytest.raises(StartError, match="was not ready within 1s"):
        daemon.start(_server(pid_file, ready_after=60), log, _ready(pid_file), what="test server",
                     error=StartError, timeout=1.0, poll=0.05)


def test_a_stale_pid_file_is_not_a_running_server(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    assert daemon.running_pid(pid_file) is None
    pid_file.write_text("not a pid")
    assert daemon.running_pid(pid_file) is None
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    pid_file.write_text(finished.stdout.strip())  # a process that has exited
    assert daemon.running_pid(pid_file) is None
    assert daemon.stop(pid_file, timeout=1) is None and not pid_file.exists()


def test_the_server_folder_and_what_the_server_writes_are_private(tmp_path: Path) -> None:
    folder = tmp_path / "server"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    pid_file, data = folder / "server.pid", folder / "data" / "store.bin"
    code = (f"import os, time\nos.makedirs({str(data.parent)!r})\nopen({str(data)!r}, 'w').write('x')\n"
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\nwhile True: time.sleep(0.1)\n")
    old_umask = os.umask(0o022)  # the caller's umask would let others read: the server's must not
    try:
        _, pid = daemon.start([sys.executable, "-c", code], folder / "server.log", _ready(pid_file),
                              what="test server", error=StartError, timeout=30, poll=0.05)
    finally:
        os.umask(old_umask)
    try:
        modes = {path.relative_to(folder).as_posix(): path.stat().st_mode & 0o777 for path in folder.rglob("*")}
        assert folder.stat().st_mode & 0o777 == 0o700
        assert modes == {"server.log": 0o600, "server.pid": 0o600, "data": 0o700, "data/store.bin": 0o600}
    finally:
        daemon.stop(pid_file, timeout=10)
