"""Running the service on this machine, and rendering it for a cluster.

``python -m ogclip_serve.server up|down|status|run|render`` (``ogclip serve up|down|status`` runs this module in a
subprocess: the jobs package never imports the serving one):

* ``up --config FILE`` checks the bundle and the graph first (a bundle whose version has no class embeddings is
  refused here, with the versions the graph has), then starts ``run`` as a detached process and returns once the
  service answers ``/readyz``.
* ``run --config FILE`` is the foreground process: local Ray (or the cluster in ``RAY_ADDRESS``), Serve's HTTP
  proxy on the configured address, the app; it stops everything it started on SIGTERM or SIGINT.
* ``down`` stops it; ``status`` reports.
* ``render --config FILE`` prints the Ray Serve config (``import_path: ogclip_serve.app:build_app`` with the config
  as ``args``) for ``serve deploy`` or a RayService's ``serveConfigV2``.

Outside local mode the service requires a bearer token: ``OGCLIP_API_TOKEN``, or else one generated here once and
kept in ``<OGCLIP_HOME>/serve/token`` (mode 0600).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ogclip import daemon
from ogclip.config import load_yaml_config
from ogclip.settings import Settings, keep_local_ray_on_loopback
from ogclip_serve.config import ServeConfig

PID_FILE, LOG_FILE, STATE_FILE, TOKEN_FILE = "server.pid", "server.log", "server.json", "token"


class ServeError(RuntimeError):
    """The service could not be started, reached or stopped; the message says why."""


def serve_dir(settings: Settings) -> Path:
    return settings.home / "serve"


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def ensure_token(settings: Settings) -> tuple[str | None, Path | None]:
    """The API token the service will require, and the file it is kept in when generated here."""
    if settings.api_token is not None and settings.api_token.get_secret_value():
        return settings.api_token.get_secret_value(), None
    if settings.local_mode:
        return None, None
    path = serve_dir(settings) / TOKEN_FILE
    if path.exists():
        return path.read_text().strip(), path
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token, path


def preflight(cfg: ServeConfig, settings: Settings) -> dict[str, Any]:
    """Check, before any replica starts, that the bundle is intact and the graph holds its class embeddings."""
    from ogclip.bundle import CONFIG, read_bundle_info
    from ogclip_kg import server as kg_server
    from ogclip_kg.store import GraphStore
    from ogclip_serve.sync import check_graph

    if not cfg.bundle.exists():
        raise ServeError(f"bundle {cfg.bundle} does not exist: train and export one first (`make demo` or "
                         "`ogclip train`), or point `bundle` at it")
    info = read_bundle_info(cfg.bundle, cfg.model_version)
    full_dim = json.loads((info.path / CONFIG).read_text())["config"]["embed_dim"]
    if not settings.neo4j_uri:
        kg_server.up(settings)  # the embedded graph: started if it is not running
    with GraphStore.from_settings(settings) as store:
        classes = check_graph(store, info.model_version, full_dim, cfg.classes.class_sets)
    return {"model_version": info.model_version, "model": info.name, "class_embeddings": classes}


def _ready(cfg: ServeConfig, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(base_url(cfg) + "/readyz", timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _pid(settings: Settings) -> int | None:
    return daemon.running_pid(serve_dir(settings) / PID_FILE)


def deploy_config(cfg: ServeConfig) -> dict[str, Any]:
    """The Ray Serve config (``serve deploy`` / RayService ``serveConfigV2``) of this service."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": cfg.route_prefix,
            "import_path": "ogclip_serve.app:build_app",
            "args": cfg.model_dump(mode="json"),
        }],
    }


def run(cfg: ServeConfig, settings: Settings) -> None:
    """Serve in the foreground until SIGTERM/SIGINT, then stop what this process started."""
    import ray
    from ray import serve

    from ogclip_serve.app import build_app

    token, _ = ensure_token(settings)
    if token:
        os.environ["OGCLIP_API_TOKEN"] = token  # replicas are Ray workers of this process: they inherit it
    own_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if own_ray:
        keep_local_ray_on_loopback()
        ray.init(address="local", num_cpus=cfg.ray_num_cpus, include_dashboard=False,
                 _metrics_export_port=cfg.metrics_port)
    elif not ray.is_initialized():
        ray.init()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    directory = serve_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
        (directory / STATE_FILE).write_text(json.dumps({"url": base_url(cfg), "pid": os.getpid(),
                                                        "app": cfg.app_name, "metrics_port": cfg.metrics_port}))
        (directory / PID_FILE).write_text(str(os.getpid()))
        print(f"classification service ready at {base_url(cfg)}/ (app {cfg.app_name})", flush=True)
        stop.wait()
    finally:
        if own_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(cfg.app_name)
        (directory / PID_FILE).unlink(missing_ok=True)
        print("classification service stopped", flush=True)


def load_config(config_path: Path | None) -> ServeConfig:
    """The service's config: a YAML file, or the built-in defaults (the demo's bundle under ./outputs/demo)."""
    return load_yaml_config(config_path, ServeConfig) if config_path is not None else ServeConfig()


def up(config_path: Path | None, settings: Settings, timeout: float = 600.0) -> str:
    """Start ``run`` detached and wait until the service is ready; returns a one-line description."""
    cfg = load_config(config_path)
    if _pid(settings) is not None:
        raise ServeError(f"a service is already running (pid {_pid(settings)}); `ogclip serve down` first")
    summary = preflight(cfg, settings)
    _, token_file = ensure_token(settings)
    command = [sys.executable, "-m", "ogclip_serve.server", "run"]
    if config_path is not None:
        command += ["--config", str(Path(config_path).resolve())]
    pid_file = serve_dir(settings) / PID_FILE  # written by `run` once its app is deployed

    def ready(pid: int) -> dict[str, Any] | None:
        return _ready(cfg) if daemon.is_ours(pid_file, pid) else None

    process, ready_state = daemon.start(command, serve_dir(settings) / LOG_FILE, ready, what="the service",
                                        error=ServeError, timeout=timeout, poll=1.0)
    auth = f"token in {token_file}" if token_file else ("token from OGCLIP_API_TOKEN"
                                                       if settings.api_token else "local mode, no token")
    return (f"classification service up at {base_url(cfg)}/ (pid {process.pid}): {summary['model']} "
            f"{ready_state['model_version']}, class sets {ready_state['classes']}, revision {ready_state['revision']}; "
            f"{auth}")


def down(settings: Settings, timeout: float = 120.0) -> str:
    pid = daemon.stop(serve_dir(settings) / PID_FILE, timeout, poll=0.5)
    return "classification service stopped" if pid is None else f"classification service (pid {pid}) stopped"


def status(settings: Settings) -> dict[str, Any]:
    """The service's state: running, pid, url, ready, and what ``/readyz`` says (or why it could not be asked)."""
    pid = _pid(settings)
    if pid is None:
        return {"running": False, "pid": None, "url": None, "ready": False}
    url = json.loads((serve_dir(settings) / STATE_FILE).read_text())["url"]
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
            return {"running": True, "pid": pid, "url": url, "ready": True, "readyz": json.loads(response.read())}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"running": True, "pid": pid, "url": url, "ready": False, "error": str(exc)}


def describe(state: dict[str, Any]) -> str:
    """:func:`status` as one line."""
    if not state["running"]:
        return "classification service stopped"
    if state["ready"]:
        ready = state["readyz"]
        health = f"ready: {ready['model_version']}, revision {ready['revision']}, classes {ready['classes']}"
    else:
        health = f"not ready ({state['error']})"
    return f"classification service running (pid {state['pid']}) at {state['url']}/, {health}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ogclip serve", description="The classification service (Ray Serve).")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("up", "start the service in the background and wait until it is ready"),
                       ("run", "run the service in the foreground"),
                       ("render", "print the Ray Serve config for `serve deploy` / a RayService")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", type=Path, help="ServeConfig YAML, e.g. infra/serve/demo.yaml (default: "
                             "built-in defaults, serving the demo's bundle under ./outputs/demo)")
    commands.add_parser("down", help="stop the service")
    commands.add_parser("status", help="is the service running and ready").add_argument(
        "--json", action="store_true", help="print the service's state as JSON")
    args = parser.parse_args(argv)
    settings = Settings()
    try:
        if args.command == "up":
            print(up(args.config, settings))
        elif args.command == "run":
            run(load_config(args.config), settings)
        elif args.command == "render":
            print(yaml.safe_dump(deploy_config(load_config(args.config)), sort_keys=False),
                  end="")
        elif args.command == "down":
            print(down(settings))
        else:
            state = status(settings)
            print(json.dumps(state) if args.json else describe(state))
    except (ServeError, ValueError, KeyError, OSError, RuntimeError) as exc:
        print(f"ogclip serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
