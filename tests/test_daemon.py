"""Background server processes (``ogclip.daemon``) with real child processes: start, readiness, exit, stop."""

from __future__ import annotations

import ipaddress
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


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return found


def _listening_addresses(pids: set[int]) -> dict[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], str]:
    """The TCP sockets that ``pids`` listen on, as {(address, port): process name}, read from /proc."""
    owners = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owners[target[8:-1]] = name
        except OSError:
            continue
    listening = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owners:  # 0A: LISTEN
                continue
            host, port = fields[1].split(":")
            raw = bytes.fromhex(host)  # /proc prints the address as 32-bit words in host (little-endian) order
            address = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            listening[(address, int(port, 16))] = owners[fields[9]]
    return listening


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket bound to loopback
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.slow
def test_a_local_ray_listens_on_loopback_only() -> None:
    # The job runtime's local Ray (GCS, raylet, workers, agents, metrics): nothing reachable from the network.
    code = ("import sys, ray\nfrom ogclip_jobs.runtime import ensure_ray\nensure_ray(1)\n"
            "ray.get(ray.remote(lambda: 1).remote())\nprint('ready', flush=True)\nsys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        listening = _listening_addresses(_descendants(child.pid))
    finally:
        child.communicate("\n", timeout=120)
    assert {"gcs_server", "raylet"} <= set(listening.values()), listening  # the check sees Ray's servers
    exposed = {f"{address}:{port}": name for (address, port), name in listening.items() if not _loopback(address)}
    assert not exposed, f"listening beyond loopback: {exposed}"
