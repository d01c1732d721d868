"""The embedded graph server: ArcadeDB with its Neo4j Bolt plugin, started on loopback by the platform.

``up`` starts it as a detached process (``python -m ogclip_kg.server``) that owns the JVM, keeps its data under
``Settings.kg_dir``, requires a password (generated once and kept in ``credentials.json``, mode 0600, unless
``OGCLIP_NEO4J_PASSWORD`` is set) and stops cleanly on SIGTERM; ``down`` sends that signal and waits; ``status``
reports. Clients reach it over Bolt with the official neo4j driver, exactly as they reach Neo4j.

Two accounts: ``root`` for the platform, and ``analyst`` for people's Cypher (its own generated password, kept in
``analyst-credentials.json``, mode 0600, unless ``OGCLIP_NEO4J_ANALYST_PASSWORD`` is set). Each start (re)writes the
analyst's server group, so that the server itself keeps analysts read-only: records of every type may be read, none
created, updated or deleted; no schema, security or database-settings changes (so no new labels or relationship
types, indexes, constraints or users, no SHOW USERS, no LOAD CSV from local files); a scan of a type stops after
``kg_query_max_rows`` records and after ``kg_query_timeout_s``. A watchdog in this process terminates any analyst
query still running after ``kg_query_timeout_s`` (ArcadeDB's own readTimeout bounds type scans only); the platform's
statements, as root, are not bounded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ogclip import daemon
from ogclip.settings import Settings, configure_logging

EMBEDDED_USER = "root"  # ArcadeDB's administrator; its password is ours to set
ANALYST_USER = "analyst"  # people's Cypher runs as this user, in the group of the same name
PID_FILE, LOG_FILE, CREDENTIALS_FILE = "server.pid", "server.log", "credentials.json"
ANALYST_CREDENTIALS_FILE = "analyst-credentials.json"
TIME_LIMIT = "the analyst time limit"  # how a terminated query names who stopped it

_log = logging.getLogger(__name__)


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

    def as_dict(self) -> dict[str, Any]:
        return {"running": self.running, "pid": self.pid, "uri": self.uri, "data_dir": str(self.data_dir)}


def bolt_uri(settings: Settings) -> str:
    return f"bolt://{settings.kg_host}:{settings.kg_bolt_port}"


def _kept_password(settings: Settings, file_name: str, user: str) -> str:
    """The password kept in ``kg_dir/file_name``, generated and written (mode 0600) on first use."""
    path = settings.kg_dir / file_name
    if path.exists():
        return json.loads(path.read_text())["password"]
    settings.kg_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"user": user, "password": password}, handle)
    return password


def embedded_password(settings: Settings) -> str:
    """The embedded server's password: the configured one, else one generated on first use and kept on disk."""
    if settings.neo4j_password is not None:
        return settings.neo4j_password.get_secret_value()
    return _kept_password(settings, CREDENTIALS_FILE, EMBEDDED_USER)


def analyst_password(settings: Settings) -> str:
    """The embedded analyst's password: the configured one, else one generated on first use and kept on disk."""
    if settings.neo4j_analyst_password is not None:
        return settings.neo4j_analyst_password.get_secret_value()
    return _kept_password(settings, ANALYST_CREDENTIALS_FILE, ANALYST_USER)


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
    env = {**os.environ, "OGCLIP_KG_PASSWORD": embedded_password(settings),
           "OGCLIP_KG_ANALYST_PASSWORD": analyst_password(settings)}
    data_dir = settings.kg_dir.resolve()
    command = [sys.executable, "-m", "ogclip_kg.server", "--data-dir", str(data_dir), "--host",
               settings.kg_host, "--bolt-port", str(settings.kg_bolt_port), "--http-port",
               str(settings.kg_http_port), "--database", settings.neo4j_database, "--heap", settings.kg_heap,
               "--query-timeout-ms", str(round(settings.kg_query_timeout_s * 1000)),
               "--max-rows", str(settings.kg_query_max_rows)]
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


def analyst_group(timeout_ms: int, max_rows: int) -> dict:
    """The analyst's server group: read records of every type, nothing else; scans bounded in rows and time.

    No database-level access (``updateSchema``, ``updateSecurity``, ``updateDatabaseSettings``): ArcadeDB then refuses
    new types (a label or relationship type, even in a transaction that is rolled back), indexes, constraints, user
    administration, SHOW USERS and LOAD CSV from local files. ``readRecord`` alone on ``*`` refuses every record
    create, update and delete, on every type present and future.
    """
    return {"access": [], "resultSetLimit": max_rows, "readTimeout": timeout_ms,
            "types": {"*": {"access": ["readRecord"]}}}


def _grant_analyst(server, database: str, password: str, timeout_ms: int, max_rows: int) -> None:
    """Create or reset the analyst user and its group for ``database`` (and only it), on every start."""
    import jpype

    json_object = jpype.JClass("com.arcadedb.serializer.json.JSONObject")
    # ArcadeDB's server security (users and groups, kept in config/server-users.jsonl and server-groups.json, mode
    # 0600); the Python wrapper has no API for it, so it is reached through the Java server it wraps.
    security = server._java_server.getSecurity()
    security.saveGroup(database, ANALYST_USER, json_object(json.dumps(analyst_group(timeout_ms, max_rows))))
    user = json_object(json.dumps({"name": ANALYST_USER, "password": str(security.encodePassword(password)),
                                   "databases": {database: [ANALYST_USER]}}))
    if security.existsUser(ANALYST_USER):
        security.updateUser(user)
    else:
        security.createUser(user)


def _configure_queries() -> None:
    """Server-wide query settings, set before the server starts so every database it opens has them.

    No LOAD CSV from local files or URLs, for anyone: the platform never uses it (the analyst group alone already
    refuses local files). No admission gate (``arcadedb.queryMaxConcurrent``, at least 4 running queries, the rest
    queued): in ArcadeDB 26.10 a Bolt query that dies of a stack overflow in a function or comparison
    (``convert.toJson`` of a list nested 3,000 deep, which one ``reduce`` builds) never gives its slot back, so four
    such queries from an analyst made the server refuse every query after them, the platform's own included, until
    a restart. The heap budget (``arcadedb.queryMaxHeapRAM``)
    still bounds what running queries hold; the analyst's time limit and scan cap bound the rest."""
    import jpype

    config = jpype.JClass("com.arcadedb.GlobalConfiguration")
    config.OPENCYPHER_LOAD_CSV_ALLOW_FILE_URLS.setValue(False)
    config.OPENCYPHER_LOAD_CSV_ALLOW_REMOTE_URLS.setValue(False)
    config.QUERY_MAX_CONCURRENT.setValue(0)


def _watch_analysts(server, timeout_ms: int, stop: threading.Event, every: float = 0.2) -> None:
    """Terminate every analyst query that has run longer than ``timeout_ms``, until ``stop`` is set.

    ArcadeDB keeps a registry of the queries it runs, with their user and age, and a terminated query stops at the
    next check inside its scan, expansion, filter, UNWIND or streaming loop, whether or not its client still waits.
    That bounds what readTimeout does not (a product built with UNWIND, a long stream of rows) for the analyst only.
    An analyst query still registered at twice the limit, terminated, is taken off the registry: its thread died
    without closing it (a stack overflow) or it runs where no check reaches, and either way SHOW TRANSACTIONS would
    list it, and this watch visit it, for good.
    """
    running = server._java_server.getRunningQueries()
    while not stop.wait(every):
        try:
            for query in running.getRunning():
                if str(query.getUser()) != ANALYST_USER or query.getElapsedMillis() <= timeout_ms:
                    continue
                if not query.isTerminated():
                    query.terminate(TIME_LIMIT)
                elif query.getElapsedMillis() > 2 * timeout_ms:
                    _log.warning("analyst query %s did not end after its termination; taken off the registry",
                                 query.getId())
                    query.close()
        except Exception as exc:  # a query that ends while it is looked at; the watch must go on
            _log.warning("analyst watchdog: %s", exc)


def _serve(args: argparse.Namespace) -> None:
    """Run the server in this process until SIGTERM or SIGINT."""
    import arcadedb_embedded as arcadedb

    password = os.environ.pop("OGCLIP_KG_PASSWORD", "")
    analyst = os.environ.pop("OGCLIP_KG_ANALYST_PASSWORD", "")
    if len(password) < 8 or len(analyst) < 8:
        raise SystemExit("OGCLIP_KG_PASSWORD and OGCLIP_KG_ANALYST_PASSWORD must hold the server's passwords "
                         "(8 characters or more)")
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
    _configure_queries()
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if not (data_dir / "databases" / args.database).exists():
            server.create_database(args.database)
        _grant_analyst(server, args.database, analyst, args.query_timeout_ms, args.max_rows)
        threading.Thread(target=_watch_analysts, args=(server, args.query_timeout_ms, stop), daemon=True,
                         name="analyst-watchdog").start()
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
    parser.add_argument("--query-timeout-ms", type=int, default=30_000)
    parser.add_argument("--max-rows", type=int, default=100_000)
    configure_logging()  # into the server's log file, where its stdout and stderr go
    _serve(parser.parse_args())
    # Stopped and cleaned up. A client still connected over Bolt holds a non-daemon JVM thread that would keep this
    # process alive, deaf, after its pid file is gone: end it here.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
