"""Process-wide settings, read from the environment with the ``OGCLIP_`` prefix (pydantic-settings).

Stage and model parameters live in config schemas (``ogclip.config``, ``ogclip_jobs.config``,
``ogclip_serve.config``); settings hold only what belongs to the machine or deployment: where data goes, which
device, how to reach the graph.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Deployment settings. Every field can be set as ``OGCLIP_<FIELD>`` (e.g. ``OGCLIP_HOME=/data/ogclip``)."""

    model_config = SettingsConfigDict(env_prefix="OGCLIP_", extra="forbid")

    home: Path = Field(default=Path(".ogclip"), description="Root folder for data, checkpoints and bundles.")
    device: str = Field(default="auto", description="Torch device; 'auto' picks CUDA when present.")
    log_level: str = Field(default="INFO", description="Level of the platform's loggers on the console (DEBUG also "
                           "shows Ray's own logs: `ogclip -v`), and of every Ray worker's loggers in a job.")
    log_format: Literal["text", "json"] = Field(
        default="text", description="How log records are written: text, or one JSON object per line (the console's "
        "records, and through Ray's LoggingConfig those of every task and actor of a job, with Ray's job, node, "
        "worker and task ids), for a log pipeline to route and filter.")
    neo4j_uri: str | None = Field(default=None, description="Bolt URI of a Neo4j server; unset = embedded server.")
    neo4j_user: str = Field(default="neo4j", description="User for neo4j_uri (the embedded server's is 'root').")
    neo4j_password: SecretStr | None = Field(
        default=None, description="Password for neo4j_uri; the embedded server generates and keeps its own if unset."
    )
    neo4j_database: str = Field(default="neo4j")
    neo4j_analyst_user: str | None = Field(
        default=None, description="User that analysts' queries (`kg query`) run as on neo4j_uri, ideally one whose "
        "role can only read; unset = neo4j_user. The embedded server's analyst is always 'analyst'.")
    neo4j_analyst_password: SecretStr | None = Field(
        default=None, description="Password of the analyst user; the embedded server generates and keeps its own if "
        "unset.")
    kg_host: str = Field(default="127.0.0.1", description="Address the embedded graph server binds to.")
    kg_bolt_port: int = Field(default=17687, gt=0, lt=65536)
    kg_http_port: int = Field(default=12480, gt=0, lt=65536)
    kg_heap: str = Field(default="1g", description="JVM heap of the embedded graph server.")
    kg_query_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Server-side time limit of an analyst's query: on the embedded "
        "server the analyst group's readTimeout and a watchdog that terminates older analyst queries; on Neo4j the "
        "transaction timeout.")
    kg_query_max_rows: int = Field(
        default=100_000, gt=0, description="The analyst group's resultSetLimit on the embedded server: a scan of one "
        "type stops after this many records.")
    api_token: SecretStr | None = Field(
        default=None, description="Bearer token the classification service requires on /v1/*. Outside local mode a "
        "service without one refuses to start (`ogclip serve up` generates one and keeps it under home/serve).")
    local_mode: bool = Field(
        default=False, description="A single-user machine: the service may run without a token, on a loopback "
        "address only.")

    @property
    def kg_dir(self) -> Path:
        """Where the embedded graph server keeps its databases, credentials, pid file and log."""
        return self.home / "kg"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read once from the environment."""
    return Settings()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now, for servers that tests and benchmarks start on their own ports.

    The sockets are held open together while the ports are chosen, so the OS cannot hand out one port twice (Ray,
    for one, refuses to start a node given the same port for two components). Another process may still take a
    port before the server binds it; callers that start servers retry on fresh ports.
    """
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]



def keep_local_ray_on_loopback() -> None:
    """Make the local Ray that this process is about to start (``ray.init(address="local")``, Ray imported already)
    listen on 127.0.0.1 only.

    By default Ray's GCS, raylet, workers, agents and metrics endpoints listen on every interface, and
    ``ray.init(_node_ip_address="127.0.0.1")`` is turned back into the machine's address. A local Ray is never
    joined from elsewhere, so none of it needs to be reachable from the network. This sets, for this process only,
    Ray's own single-node switch (its default on macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``): the
    node's address is then the loopback one, and every server Ray starts for the node binds it. The environment
    is left alone, so ``ray start`` or a driver started from here can still join a cluster. Never call it before
    joining a cluster: the driver must be reachable from the other nodes.
    """
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is None:
        raise RuntimeError("import ray before keep_local_ray_on_loopback(): it sets a switch of the imported Ray")
    constants.ENABLE_RAY_CLUSTER = False


# The platform's packages: each module logs to ``logging.getLogger(__name__)`` under one of these.
PACKAGE_LOGGERS = ("ogclip", "ogclip_kg", "ogclip_jobs", "ogclip_serve")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the one it was created with (a tool or
    a test that replaces ``sys.stderr`` still gets the lines, and a closed replacement is never written to)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the keys of Ray's JSON log encoding (``asctime``, ``levelname``,
    ``message``, ``filename``, ``lineno``) and the logger's ``name``; ``exc_text`` holds a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"asctime": self.formatTime(record), "levelname": record.levelname, "name": record.name,
               "message": record.getMessage(), "filename": record.filename, "lineno": record.lineno}
        if record.exc_info:
            out["exc_text"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def log_level_number(level: str) -> int:
    """The ``logging`` level of a name (DEBUG, INFO, WARNING, ERROR); ValueError for any other."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; expected DEBUG, INFO, WARNING or ERROR")
    return numeric


def configure_logging(level: str | None = None, log_format: str | None = None) -> None:
    """Send the platform's loggers to stderr at ``level`` (default ``OGCLIP_LOG_LEVEL``), as ``log_format`` says
    (default ``OGCLIP_LOG_FORMAT``). Text: the message alone at INFO and above, so the console reads as the job's
    progress lines; time, level and logger name at DEBUG. JSON: :class:`JsonFormatter`. The command line does this
    once per process; a program that embeds the platform configures ``logging`` its own way, and the loggers then
    reach its handlers as usual. Calling it again replaces the handler, never adds a second."""
    settings = get_settings()
    numeric = log_level_number(level or settings.log_level)
    handler = _StderrHandler()
    if (log_format or settings.log_format) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"
                                               if numeric < logging.INFO else "%(message)s"))
    handler.set_name("ogclip-console")
    for package in PACKAGE_LOGGERS:
        logger = logging.getLogger(package)
        for old in [h for h in logger.handlers if h.get_name() == "ogclip-console"]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(numeric)
        logger.propagate = False  # one line per message, whatever the root logger has (Ray adds its own)
