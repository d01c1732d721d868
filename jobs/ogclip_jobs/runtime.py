"""What every job needs before it starts: a Ray to run on and the knowledge graph to read from.

Console output: a job prints its own progress lines; Ray's own logs (driver INFO lines, worker output, Ray Data's
progress reports) stay in Ray's session folder unless ``OGCLIP_LOG_LEVEL`` is ``DEBUG`` (``ogclip -v``). Ray Data's
progress bars are shown only where a terminal is attached. In the job's tasks and actors, Ray's ``LoggingConfig``
sets up ``logging`` at ``OGCLIP_LOG_LEVEL`` and in ``OGCLIP_LOG_FORMAT`` (text or JSON), each record tagged with
Ray's job, node, worker and task ids; the driver's console is the platform's own (``configure_logging``).
"""

from __future__ import annotations

import logging
import os
import sys

import ray
from ray.job_config import JobConfig

from ogclip.settings import get_settings, keep_local_ray_on_loopback, log_level_number
from ogclip_kg.store import GraphStore

# Ray loggers that report routine progress on the driver; a job shows their warnings only when verbose.
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def verbose() -> bool:
    """Whether Ray's own logs go to the console too (``OGCLIP_LOG_LEVEL=DEBUG``, ``ogclip -v``)."""
    return get_settings().log_level.upper() == "DEBUG"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray of this process
    (``address="local"``: a ``ray start`` cluster elsewhere on the machine is not joined by accident), whose servers
    listen on 127.0.0.1 only."""
    if ray.is_initialized():
        return
    loud = verbose()
    quiet = {} if loud else {"log_to_driver": False, "logging_level": logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(job_config=job_config(), **quiet)
    else:
        keep_local_ray_on_loopback()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, job_config=job_config(), **quiet)
    if not loud:
        for name in _RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = loud or sys.stderr.isatty()
    context.print_on_execution_start = loud
    # Ray 2.60's V2 file readers list files in a task that asks for a whole CPU and cannot be told otherwise;
    # beside a stage actor or a training worker on a small Ray it never schedules and the job hangs.
    context.use_datasource_v2 = False


def job_config() -> JobConfig:
    """The job's config: Ray's ``LoggingConfig`` for its tasks and actors, at the platform's log level and format.
    It goes in the job config rather than ``ray.init(logging_config=…)``, which would also give the driver's root
    logger a handler of Ray's (every library's INFO lines on the console)."""
    settings = get_settings()
    config = JobConfig()
    log_level_number(settings.log_level)  # a clear error for a bad OGCLIP_LOG_LEVEL before Ray starts
    # The logger's name too, so a platform team can route and filter records by module (``ogclip_jobs.data…``).
    config.set_py_logging_config(ray.LoggingConfig(encoding=settings.log_format.upper(),
                                                   log_level=settings.log_level.upper(),
                                                   additional_log_standard_attrs=["name"]))
    return config


def ray_log_folder() -> str | None:
    """The local Ray session's log folder (where worker output goes when it is not shown), if known."""
    try:
        from ray._private.worker import global_worker

        return os.path.join(global_worker.node.get_session_dir_path(), "logs")
    except (AttributeError, ImportError):
        return None


def open_graph(seed_if_empty: bool = True) -> GraphStore:
    """A store on the configured graph: Neo4j when ``OGCLIP_NEO4J_URI`` is set, else the embedded server (started
    if needed). An empty graph is seeded first, so a fresh machine runs any job without a separate step."""
    from ogclip_kg import server
    from ogclip_kg.seeds import seed_graph

    settings = get_settings()
    if not settings.neo4j_uri:
        server.up(settings)
    store = GraphStore.from_settings(settings)
    if seed_if_empty and store.counts()["Target"] == 0:
        seed_graph(store)
    return store
