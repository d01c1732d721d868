"""The embedded graph server: ArcadeDB with its Neo4j Bolt plugin, started on loopback by the platform.

``up`` starts it as a detached process (``python -m ogclip_kg.server``) that owns the JVM, keeps its data under
``Settings.kg_dir``, requires a password (generated once and kept in ``credentials.json``, mode 0600, unless
``OGCLIP_NEO4J_PASSWORD`` is set) and stops cleanly on SIGTERM; ``down`` sends that signal and waits; ``status``
reports. Clients reach it over Bolt with the official neo4j driver, exactly as they reach Neo4j.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ogclip import daemon
from ogclip.settings import Settings

EMBEDDED_USER = "root"  # ArcadeDB's administrator; its password is ours to set
PID_FILE, LOG_FILE, CREDENTIALS_FILE = "server.pid", "server.log", "credentials.json"


class EmbeddedServerError(RuntimeError):
    """The embedded graph server could not be started, reached or stopped."""


@dataclass(frozen=True)
class ServerStatus:
    running: bool
    pid: int | None
    uri: str
    data_dir: Path

    def describe(self) -> str:
        state = f"running (pid {self.pid})" if self.running else "stopped"
        return f"embedded graph server {state} at {self.uri}, data in {self.data_dir}"


def bolt_uri(settings: Settings) -> str:
    return f"bolt://{settings.kg_host}:{settings.kg_bolt_port}"


def embedded_password(settings: Settings) -> str:
    """The embedded server's password: the configured one, else one generated on first use and kept on disk."""
    if settings.neo4j_password is not None:
        return settings.neo4j_password.get_secret_value()
    path = settings.kg_dir / CREDENTIALS_FILE
    if path.exists():
        return json.loads(path.read_text())["password"]
    settings.kg_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"user": EMBEDDED_USER, "password": password}, handle)
    return password


def _pid(settings: Settings) -> int | None:
    return daemon.running_pid(settings.kg_dir / PID_FILE)


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def status(settings: Settings) -> ServerStatus:
    pid = _pid(settings)
    running = pid is not None and _port_open(settings.kg_host, settings.kg_bolt_port)
    return ServerStatus(running=running, pid=pid, uri=bolt_uri(settings), data_dir=settings.kg_dir)


def up(settings: Settings, timeout: float = 120.0) -> ServerStatus:
    """Start the embedded server unless it already runs; return once it accepts Bolt connections."""
    current = status(settings)
    if current.running:
        return current
    if current.pid is not None:
        raise EmbeddedServerError(f"a server process (pid {current.pid}) exists but does not answer; run `down`")
    if _port_open(settings.kg_host, settings.kg_bolt_port):
        raise EmbeddedServerError(f"port {settings.kg_bolt_port} on {settings.kg_host} is taken by another process")
    settings.kg_dir.mkdir(parents=True, exist_ok=True)
    password = embedded_password(settings)
    env = {**os.environ, "OGCLIP_KG_PASSWORD": password}
    data_dir = settings.kg_dir.resolve()
    command = [sys.executable, "-m", "ogclip_kg.server", "--data-dir", str(data_dir), "--host",
               settings.kg_host, "--bolt-port", str(settings.kg_bolt_port), "--http-port",
               str(settings.kg_http_port), "--database", settings.neo4j_database, "--heap", settings.kg_heap]
    def ready(pid: int) -> ServerStatus | None:
        if daemon.is_ours(settings.kg_dir / PID_FILE, pid) and _port_open(settings.kg_host, settings.kg_bolt_port):
            return status(settings)
        return None

    # The JVM writes its own log folder into the working directory: keep it beside the data.
    _, started = daemon.start(command, settings.kg_dir / LOG_FILE, ready, what="graph server",
                              error=EmbeddedServerError, timeout=timeout, poll=0.3, env=env, cwd=data_dir)
    return started


def down(settings: Settings, timeout: float = 60.0) -> ServerStatus:
    """Stop the embedded server (SIGTERM, then SIGKILL after ``timeout``); a stopped server is left as is."""
    daemon.stop(settings.kg_dir / PID_FILE, timeout)
    return status(settings)


def _serve(args: argparse.Namespace) -> None:
    """Run the server in this process until SIGTERM or SIGINT."""
    import arcadedb_embedded as arcadedb

    password = os.environ.pop("OGCLIP_KG_PASSWORD", "")
    if len(password) < 8:
        raise SystemExit("OGCLIP_KG_PASSWORD must hold the server password (8 characters or more)")
    data_dir = Path(args.data_dir).resolve()
    server = arcadedb.ArcadeDBServer(
        root_path=str(data_dir / "databases"),
        root_password=password,
        config={
            "host": args.host,
            "http_port": args.http_port,
            "server_plugins": "Bolt:com.arcadedb.bolt.BoltProtocolPlugin",
            "bolt_port": args.bolt_port,
        },
        jvm_kwargs={"heap_size": args.heap},
    )
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if not (data_dir / "databases" / args.database).exists():
            server.create_database(args.database)
        (data_dir / PID_FILE).write_text(str(os.getpid()))
        print(f"graph server ready: bolt://{args.host}:{args.bolt_port} database {args.database}", flush=True)
        stop.wait()
    finally:
        server.stop()
        (data_dir / PID_FILE).unlink(missing_ok=True)
        print("graph server stopped", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the embedded graph server in the foreground.")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bolt-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--heap", default="1g")
    _serve(parser.parse_args())
    # Stopped and cleaned up. A client still connected over Bolt holds a non-daemon JVM thread that would keep this
    # process alive, deaf, after its pid file is gone: end it here.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
