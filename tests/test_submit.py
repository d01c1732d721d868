"""``ogclip submit`` against a real multi-node Ray cluster on this machine, with token authentication on.

The cluster is two ``ray start`` nodes of one CPU each (a head and a worker), started with ports, a temp folder and
a token of their own, each in its own process session so that a node (and every process it spawned) can be killed
at once, and the whole cluster torn down without touching any other Ray on the machine. The jobs run the curation
pipeline on the synthetic world, reading class facts from the test session's embedded graph server.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
import yaml

from ogclip.settings import free_ports
from ogclip_jobs.submit import (
    SubmitInputError,
    build_runtime_env,
    normalise_argv,
    resolve_ray_token,
    split_argv,
)

BIN = Path(sys.executable).parent
OGCLIP = str(BIN / "ogclip")


class NodeExited(RuntimeError):
    """A ``ray start --block`` process ended; the message carries the end of its log, so that CI shows why."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        # `ray start --block` exits when any of its processes dies; that process's own error log says why.
        logs = [log, *sorted((log.parent / "session_latest" / "logs").glob("*.err")),
                log.parent / "session_latest" / "logs" / "dashboard.log"]
        tails = [f"--- {path}:\n{path.read_text(errors='replace')[-2000:]}" for path in logs
                 if path.exists() and path.stat().st_size]
        super().__init__(f"ray node {name} exited\n" + "\n".join(tails))


class LocalRayCluster:
    """A Ray cluster of ``ray start`` processes on 127.0.0.1, every port chosen here, token auth on."""

    def __init__(self) -> None:
        # Short path: Ray's unix sockets live under it and socket paths are limited to ~107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="ogray-", dir="/tmp")
        self.token = secrets.token_hex(24)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OGCLIP_"))}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.gcs_port = self.dashboard_port = 0  # chosen when the head starts
        self.nodes: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, role: Callable[[Iterator[int]], list[str]], nodes: int, attempts: int = 3) -> None:
        """Start a node and wait until ``nodes`` are alive. Every port is picked afresh on each attempt: a port found
        free can be taken by another process before Ray binds it, and then the node exits at once."""
        for attempt in range(1, attempts + 1):
            ports = iter(free_ports(9))
            args = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    "--num-gpus=0", f"--temp-dir={self.temp_dir}", "--object-store-memory=150000000",
                    "--disable-usage-stats", f"--node-manager-port={next(ports)}",
                    f"--object-manager-port={next(ports)}", f"--dashboard-agent-listen-port={next(ports)}",
                    f"--dashboard-agent-grpc-port={next(ports)}", f"--runtime-env-agent-port={next(ports)}",
                    f"--metrics-export-port={next(ports)}", *role(ports)]
            with open(Path(self.temp_dir) / f"{name}.log", "wb") as log:
                # A session of its own: killing its process group kills the node's raylet, workers and agents.
                self.nodes[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                self.wait_for_nodes(nodes)
                return
            except NodeExited as exited:
                if exited.name != name or attempt == attempts:
                    raise
                warnings.warn(f"attempt {attempt} of {attempts}: {exited}", stacklevel=2)
                self.kill(name)

    def _head_role(self, ports: Iterator[int]) -> list[str]:
        self.gcs_port, self.dashboard_port = next(ports), next(ports)
        return ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={next(ports)}"]

    def start_head(self) -> None:
        self._start("head", self._head_role, nodes=1)

    def add_worker(self, name: str) -> None:
        self._start(name, lambda _: [f"--address=127.0.0.1:{self.gcs_port}"], nodes=len(self.nodes) + 1)

    def api(self, path: str) -> dict:
        response = requests.get(self.address + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        response.raise_for_status()
        return response.json()

    def alive_nodes(self) -> list[dict]:
        rows = self.api("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
        return [n for n in rows if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.nodes.items():
                if process.poll() is not None:
                    raise NodeExited(name, Path(self.temp_dir) / f"{name}.log")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except (requests.RequestException, KeyError, ValueError):
                pass  # the dashboard is still starting
            time.sleep(1.0)
        raise TimeoutError(f"{count} Ray nodes did not come up within {timeout:.0f}s")

    def worker_node_ids(self) -> set[str]:
        return {n["node_id"] for n in self.alive_nodes() if not n["is_head_node"]}

    def work_on(self, node_ids: set[str]) -> list[str]:
        """The names of the running tasks and live actors on these nodes (Ray's state API)."""
        query = "limit=1000&detail=true&filter_keys=state&filter_predicates=%3D&filter_values="
        tasks = self.api(f"/api/v0/tasks?{query}RUNNING")["data"]["result"]["result"]
        actors = self.api(f"/api/v0/actors?{query}ALIVE")["data"]["result"]["result"]
        return ([t["name"] for t in tasks if t.get("node_id") in node_ids]
                + [a["class_name"] for a in actors if a.get("node_id") in node_ids])

    def kill(self, name: str) -> None:
        """SIGKILL a node's whole process group: the same as the machine under it disappearing."""
        process = self.nodes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.nodes):
            self.kill(name)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(kg_settings):
    ray_cluster = LocalRayCluster()
    try:
        ray_cluster.start_head()
        ray_cluster.add_worker("worker-1")
        ray_cluster.kg_env = {"OGCLIP_HOME": str(Path(kg_settings.home).resolve()),
                              "OGCLIP_KG_BOLT_PORT": str(kg_settings.kg_bolt_port),
                              "OGCLIP_KG_HTTP_PORT": str(kg_settings.kg_http_port)}
        yield ray_cluster
    finally:
        ray_cluster.stop()


@pytest.fixture(scope="module")
def quality_bundle(tmp_path_factory) -> Path:
    """A fresh og-clip-tiny export bundle: with it the quality filter runs, in the job's only stage actors."""
    from ogclip.bundle import export_bundle
    from ogclip.models import create_model

    return export_bundle(create_model("og-clip-tiny", device="cpu"), tmp_path_factory.mktemp("bundle") / "b").path


def _pipeline_config(output_dir: Path, bundle: Path) -> Path:
    """A small run on the synthetic world whose stages fit on one surviving 1-CPU node: each stage runs one
    half-CPU task or actor at a time, which leaves room for Ray Data's quarter-CPU reads and writes beside it. The
    quality filter embeds with a bundle in an actor (a stage that loads a model); the other stages are tasks."""
    one = {"num_cpus": 0.5, "concurrency": 1, "batch_size": 4}
    cfg = {"output_dir": str(output_dir),
           "source": {"kind": "synth", "class_set": "train", "max_classes": 3, "per_class": 4, "image_size": 32},
           "dedup": {"enabled": False},
           "quality": {"enabled": True, "model": str(bundle), "drop_outliers": False, "resources": one},
           "masks": {"method": "provided"}, "captions": {"method": "template", "resources": one},
           "writer": {"formats": ["parquet"], "rows_per_shard": 4}}
    path = output_dir.parent / f"{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit_argv(cluster: LocalRayCluster, config: Path, *extra: str) -> list[str]:
    env = [arg for name, value in cluster.kg_env.items() for arg in ("--env", f"{name}={value}")]
    # submit's own options after the command, as users type them.
    return [OGCLIP, "submit", "data", "pipeline", "--config", str(config), "--address", cluster.address, *env, *extra]


def _client_env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    env["HOME"] = tempfile.gettempdir()  # no ~/.ray/auth_token of the machine's user leaks into the test
    return env


def _shard_ids(output_dir: Path) -> list[str]:
    table = pq.read_table(output_dir / "stages" / "shards" / "parquet", columns=["id"])
    return [str(i) for i in table.column("id").to_pylist()]


def _stage_seconds(records: dict) -> str:
    """Each stage's seconds, or, for the row stages of a full run, the seconds of the stream they ran in."""
    return ", ".join(f"{name} {record['seconds']}s" if "seconds" in record else f"{name} (streamed)"
                     for name, record in records.items()) + f"; stream {records['ingest'].get('streamed')}s"


@pytest.fixture(scope="module")
def first_run(cluster, quality_bundle, tmp_path_factory) -> dict:
    output_dir = tmp_path_factory.mktemp("submit") / "run-1"
    started = time.perf_counter()
    result = subprocess.run(_submit_argv(cluster, _pipeline_config(output_dir, quality_bundle), "--wait"),
                            capture_output=True, text=True, env=_client_env(cluster.token), timeout=600)
    return {"result": result, "output_dir": output_dir, "seconds": time.perf_counter() - started}


@pytest.mark.slow
def test_submitted_pipeline_job_finishes(first_run) -> None:
    result = first_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")
    assert '"status": "SUCCEEDED"' in result.stderr
    assert "[shards] done" in result.stdout  # the job's own log lines were streamed back
    ids = _shard_ids(first_run["output_dir"])
    assert len(ids) == len(set(ids)) == 12  # 3 classes × 4 renders
    record = json.loads((first_run["output_dir"] / "pipeline.json").read_text())
    assert record["shards"]["rows"] == len(ids)
    print(f"\nfirst job: {first_run['seconds']:.1f}s; stages: {_stage_seconds(record)}")


@pytest.mark.slow
def test_job_survives_a_worker_node_dying_mid_run(cluster, first_run, quality_bundle, tmp_path_factory) -> None:
    """SIGKILL the worker node while the job runs something there: Ray retries the lost tasks on the head (and
    restarts the quality filter's actor there when it was on the worker), and the shards hold exactly the rows of an
    undisturbed run, each once."""
    assert first_run["result"].returncode == 0
    output_dir = tmp_path_factory.mktemp("submit") / "run-2"
    started = time.perf_counter()
    job = subprocess.Popen(_submit_argv(cluster, _pipeline_config(output_dir, quality_bundle), "--wait"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_client_env(cluster.token))
    workers = cluster.worker_node_ids()
    killed_during: list[str] | None = None
    streaming = None
    try:
        deadline = time.monotonic() + 400
        while killed_during is None and job.poll() is None and time.monotonic() < deadline:
            # Once the stream has begun: kill the worker while the job runs something there, or, if the scheduler
            # keeps it all on the head for 5 s, anyway (the quality filter's actor is still starting then): the
            # blocks the worker holds are lost then and must be recomputed.
            if (output_dir / "stages" / "stream.partial").exists():
                streaming = streaming or time.monotonic()
                running = [name for name in cluster.work_on(workers) if not name.startswith("_StatsActor")]
                if running or time.monotonic() - streaming > 5:
                    cluster.kill("worker-1")
                    killed_during = running or ["(nothing running there)"]
            time.sleep(0.3)
        stdout, stderr = job.communicate(timeout=500)
    finally:
        if job.poll() is None:
            job.kill()
    assert killed_during, "the job ended before the worker node could be killed"
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert len(cluster.alive_nodes()) == 1
    ids = _shard_ids(output_dir)
    assert len(ids) == len(set(ids)), "duplicated rows"
    assert sorted(ids) == sorted(_shard_ids(first_run["output_dir"])), "lost or extra rows"
    stages = _stage_seconds(json.loads((output_dir / "pipeline.json").read_text()))
    print(f"\nkilled the worker node while it ran {sorted(set(killed_during))}; "
          f"job: {time.perf_counter() - started:.1f}s; stages: {stages}")


@pytest.mark.slow
def test_failed_job_exits_2_with_its_status(cluster) -> None:
    # A command the job's own CLI rejects: the job fails fast with the CLI's exit status 2.
    argv = [OGCLIP, "submit", "models", "--no-such-option", "--address", cluster.address, "--wait"]
    result = subprocess.run(argv, capture_output=True, text=True, env=_client_env(cluster.token), timeout=300)
    assert result.returncode == 2
    assert "FAILED" in result.stderr and "exit code 2" in result.stderr
    assert "unrecognized arguments: --no-such-option" in result.stdout  # the job's own error, streamed back


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "not-the-token"])
def test_missing_or_wrong_token_is_refused_clearly(cluster, token: str | None) -> None:
    result = subprocess.run([OGCLIP, "submit", "models", "--address", cluster.address], capture_output=True,
                            text=True, env=_client_env(token), timeout=120)
    assert result.returncode == 1  # refused by the cluster: a runtime error, not a usage error
    assert "requires authentication" in result.stderr
    assert ("RAY_AUTH_TOKEN" in result.stderr) == (token is None)
    assert token is None or token not in result.stderr + result.stdout


# -- the parts that need no cluster --------------------------------------------------------------------------------


def test_submit_options_may_follow_the_command() -> None:
    own, command = split_argv(["data", "pipeline", "--config", "c.yaml", "--address", "http://h:8265", "--wait",
                               "--env=A=1"])
    assert command == ["data", "pipeline", "--config", "c.yaml"]
    assert own == ["--address", "http://h:8265", "--wait", "--env=A=1"]
    assert split_argv(["--wait", "--", "kg", "query", "--address", "x"]) == (["--wait"], ["kg", "query", "--address",
                                                                                         "x"])
    assert normalise_argv(["models"]) == ["models"]
    assert normalise_argv(["submit", "models", "--json", "--wait"]) == ["submit", "--wait", "--", "models", "--json"]


def test_token_is_found_where_ray_looks(tmp_path: Path) -> None:
    assert resolve_ray_token({"RAY_AUTH_TOKEN": " abc \n"}, home=tmp_path) == "abc"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert resolve_ray_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home=tmp_path) == "from-file"
    with pytest.raises(SubmitInputError, match="cannot be read"):
        resolve_ray_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=tmp_path)
    assert resolve_ray_token({}, home=tmp_path) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default\n")
    assert resolve_ray_token({}, home=tmp_path) == "default"


def test_runtime_env_merges_file_folder_and_variables(tmp_path: Path) -> None:
    spec = tmp_path / "env.yaml"
    spec.write_text("env_vars: {A: '1'}\nconfig: {setup_timeout_seconds: 60}\n")
    env = build_runtime_env(spec, tmp_path, {"B": "2"})
    assert env == {"env_vars": {"A": "1", "B": "2"}, "config": {"setup_timeout_seconds": 60},
                   "working_dir": str(tmp_path)}
    assert build_runtime_env() is None
    with pytest.raises(SubmitInputError, match="not a folder"):
        build_runtime_env(working_dir=tmp_path / "missing")


def test_submit_refuses_bad_input_without_a_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    from ogclip_jobs.cli import main

    assert main(["submit", "models", "--env", "no-equals", "--address", "http://127.0.0.1:9"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    assert main(["submit", "--address", "http://127.0.0.1:9"]) == 2
    assert "no command" in capsys.readouterr().err


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, "http://127.0.0.1:8265"),
    ({"RAY_ADDRESS": "http://head:8265"}, "http://head:8265"),
    ({"RAY_ADDRESS": "http://head:8265", "RAY_API_SERVER_ADDRESS": "https://jobs:443"}, "https://jobs:443"),
])
def test_submit_address_falls_back_as_ray_does(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str],
                                               expected: str) -> None:
    from ogclip_jobs.cli import build_parser

    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert build_parser().parse_args(["submit", "--", "models"]).address == expected
