"""``ogclip submit``: run any ``ogclip`` command as a Ray job on a cluster, through Ray's job submission API.

The command is sent as the job's entrypoint (``ogclip data pipeline --config …``) to the cluster's dashboard
(``http://host:8265``, usually reached through ``kubectl port-forward``). The job runs with the cluster's own
installation of the platform (the container image), optionally with a ``working_dir`` and environment variables
added through a Ray runtime environment.

Authentication: the platform's clusters keep Ray 2.60's token authentication on (``RAY_AUTH_MODE=token``; KubeRay
sets it from the Secret named in ``authOptions``, ``ray start`` turns it on when a token exists, a local
``ray.init()`` by default), and the dashboard answers 401 to a request without ``Authorization: Bearer <token>``.
Ray's own job client attaches that header only when the *submitting* process itself runs in token mode, which a
laptop or CI runner talking to a remote cluster usually does not, so this module finds the token the way Ray's
token loader does and always sends it explicitly:

1. ``RAY_AUTH_TOKEN`` (the token itself),
2. ``RAY_AUTH_TOKEN_PATH`` (a file holding it; set but unreadable is an error, as in Ray),
3. ``~/.ray/auth_token`` (written by ``ray get-auth-token --generate``).

With none of them the request goes out without the header; a cluster with authentication on then refuses it and
the command says which variable to set. The token is never printed, logged or put into the job's runtime
environment. Token authentication does not encrypt traffic: reach a remote dashboard through a port-forward or TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

# ``ogclip submit``'s own options; every other argument belongs to the submitted command. They may stand before or
# after the command (``ogclip submit data pipeline --config f.yaml --address …``); ``--`` ends them.
_OWN_FLAGS = {"--wait", "--no-wait", "-h", "--help"}
_OWN_OPTIONS = {"--address", "--working-dir", "--runtime-env", "--env", "--submission-id", "--entrypoint-num-cpus",
                "--entrypoint-num-gpus"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """The job could not be submitted or did not succeed; the message says why. ``exit_code``: the status
    ``ogclip submit`` exits with (a failed job's own exit code where it has one, else 1)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class SubmitInputError(ValueError):
    """Bad input to ``ogclip submit`` itself (its flags, files or command): a usage error, exit status 2."""


def resolve_ray_token(environ: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """The Ray authentication token, looked up in the order Ray's own token loader uses (see the module doc)."""
    environ = dict(os.environ if environ is None else environ)
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise SubmitInputError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {exc.strerror}") from None
        if not token:
            raise SubmitInputError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return token
    default = (home or Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None
    return None


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``submit``'s arguments into its own options and the command to run (in their original order)."""
    own: list[str] = []
    command: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if arg == "--":
            command.extend(args[i + 1:])
            break
        if arg in _OWN_FLAGS:
            own.append(arg)
        elif name in _OWN_OPTIONS:
            if "=" in arg:
                own.append(arg)
            elif i + 1 < len(args):
                own.extend(args[i: i + 2])
                i += 1
            else:
                own.append(arg)  # argparse reports the missing value
        else:
            command.append(arg)
        i += 1
    return own, command


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SubmitInputError(f"--env expects NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def _warn_if_cleartext(address: str, token: str | None) -> None:
    """Token auth does not encrypt: say so when the token would cross a network in clear text."""
    parsed = urllib.parse.urlparse(address)
    if token and parsed.scheme == "http" and parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        print(f"ogclip submit: warning: sending the Ray token unencrypted to {parsed.hostname}; use a port-forward "
              "(--address http://127.0.0.1:8265) or https", file=sys.stderr)


def build_runtime_env(runtime_env_file: Path | None = None, working_dir: Path | None = None,
                      env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The job's runtime environment: a YAML/JSON file, plus ``working_dir`` and ``env_vars`` given on the line."""
    runtime_env: dict[str, Any] = {}
    if runtime_env_file is not None:
        loaded = yaml.safe_load(Path(runtime_env_file).read_text()) or {}  # JSON is YAML
        if not isinstance(loaded, dict):
            raise SubmitInputError(f"{runtime_env_file}: a runtime environment must be a mapping")
        runtime_env.update(loaded)
    if working_dir is not None:
        if not Path(working_dir).is_dir():
            raise SubmitInputError(f"--working-dir {working_dir} is not a folder")
        runtime_env["working_dir"] = str(working_dir)
    if env:
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    return runtime_env or None


@contextlib.contextmanager
def _explained(address: str, token: str | None) -> Iterator[None]:
    """Turn the job client's authentication and connection failures into one-line errors that say what to do."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        hint = ("the token was refused" if token else
                "no token found: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or write ~/.ray/auth_token)")
        raise SubmitError(f"the Ray cluster at {address} requires authentication; {hint}") from exc
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach the Ray job server at {address}: {exc}") from exc


def make_client(address: str, token: str | None = None) -> Any:
    """A ``JobSubmissionClient`` on ``address`` that sends ``token`` as a bearer token when there is one."""
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _explained(address, token):
        return JobSubmissionClient(address, headers=headers)


def submit(command: Sequence[str], address: str, *, runtime_env: dict[str, Any] | None = None,
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
           entrypoint_num_gpus: float | None = None, token: str | None = None) -> tuple[Any, str]:
    """Submit ``ogclip <command>`` as a Ray job; returns the client and the job's submission id."""
    if not command:
        raise SubmitInputError("no command to submit, e.g. `ogclip submit data pipeline --config FILE --address URL`")
    if command[0] == "submit":
        raise SubmitInputError("`submit` runs an ogclip command on the cluster; it cannot submit itself")
    client = make_client(address, token)
    entrypoint = "ogclip " + shlex.join(command)
    with _explained(address, token):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                   entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
                                   metadata={"ogclip_command": shlex.join(command)})
    return client, job_id


def _print(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


async def _tail(client: Any, job_id: str, write: Callable[[str], Any]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        write(chunk)


def follow(client: Any, job_id: str, write: Callable[[str], Any] = _print) -> dict[str, Any]:
    """Stream the job's logs until it ends; returns its final status, message and the entrypoint's exit code."""
    try:
        asyncio.run(_tail(client, job_id, write))
    except RuntimeError as exc:
        # The log stream can drop (a dashboard restart, a flaky port-forward); the job's status is what counts.
        print(f"ogclip submit: log stream ended early ({exc}); waiting for the job's status", file=sys.stderr)
    info = client.get_job_info(job_id)
    while str(info.status) not in TERMINAL:
        time.sleep(1.0)
        info = client.get_job_info(job_id)
    return {"status": str(info.status), "message": info.message, "exit_code": info.driver_exit_code}


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``ogclip submit`` on the CLI's sub-command set."""
    parser = commands.add_parser(
        "submit", help="run an ogclip command as a Ray job on a cluster (Ray job submission API, token auth)",
        description="Submit `ogclip COMMAND …` as a Ray job. Options of submit may come before or after the "
        "command; put the command after `--` if it has an option of the same name. The Ray token is read from "
        "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.")
    parser.add_argument("job", nargs="*", metavar="COMMAND", help="the ogclip command to run, e.g. data pipeline")
    parser.add_argument("--address", default=(os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
                                              or "http://127.0.0.1:8265"),
                        help="the cluster's job server (dashboard) URL, or its GCS address (default, as Ray's own "
                        "CLI: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265)")
    parser.add_argument("--working-dir", type=Path, help="a local folder uploaded as the job's working_dir")
    parser.add_argument("--runtime-env", type=Path, help="a Ray runtime environment as a YAML or JSON file")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the job (repeatable); never pass secrets this way, the "
                        "cluster's pods get them from Kubernetes Secrets")
    parser.add_argument("--submission-id", help="the job's id (default: generated by Ray)")
    parser.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver")
    parser.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the job's driver")
    wait = parser.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_true",
                      help="follow the logs; a failed job exits with its own exit code (1 if it has none)")
    wait.add_argument("--no-wait", dest="wait", action="store_false", help="print the job id and return (default)")
    parser.set_defaults(func=run_submit, wait=False)
    return parser


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """Reorder ``ogclip submit …`` so argparse sees submit's options first and the command after ``--``."""
    argv = list(argv)
    if not argv or argv[0] != "submit":
        return argv
    own, command = split_argv(argv[1:])
    return ["submit", *own, "--", *command]


def run_submit(args: argparse.Namespace) -> int:
    """``ogclip submit``: submit, print the job id, and with ``--wait`` follow the logs and report the outcome."""
    runtime_env = build_runtime_env(args.runtime_env, args.working_dir, _parse_env(args.env))
    token = resolve_ray_token()
    _warn_if_cleartext(args.address, token)
    client, job_id = submit(args.job, args.address, runtime_env=runtime_env, submission_id=args.submission_id,
                            entrypoint_num_cpus=args.entrypoint_num_cpus,
                            entrypoint_num_gpus=args.entrypoint_num_gpus, token=token)
    print(job_id, flush=True)
    if not args.wait:
        print(f"submitted; follow it with `ray job logs --follow {job_id}` or the dashboard", file=sys.stderr)
        return 0
    result = follow(client, job_id)
    print(json.dumps({"job_id": job_id, **result}), file=sys.stderr)
    if result["status"] != "SUCCEEDED":
        code = "" if result["exit_code"] is None else f", exit code {result['exit_code']}"
        raise SubmitError(f"job {job_id} {result['status']}{code}: {result['message'] or 'no message'}",
                          exit_code=result["exit_code"] or 1)
    return 0
