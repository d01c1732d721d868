"""Prometheus metrics of the service, through Ray's metrics system (``ray.serve.metrics``).

Ray exports them from every node at its metrics export port (``ray start --metrics-export-port``, or
``ray.init(_metrics_export_port=...)``) with the ``ray_`` prefix and the application, deployment and replica as
labels, so one Prometheus scrape config covers every replica wherever it runs; counters get a ``_total`` suffix.
"""

from __future__ import annotations

ENDPOINTS = ("/v1/classify", "/v1/embeddings", "/v1/classes", "/v1/models", "/healthz", "/readyz")
LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


def endpoint_label(path: str) -> str:
    """The metrics label of a request path: one of :data:`ENDPOINTS` or ``other`` (arbitrary paths must not blow
    up the metrics' cardinality)."""
    return next((e for e in ENDPOINTS if path.endswith(e)), "other")


class ServiceMetrics:
    """The service's counters, histograms and gauges (create inside a Serve replica)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("ogclip_requests", description="HTTP requests by endpoint and status code",
                                tag_keys=("endpoint", "status"))
        self.errors = Counter("ogclip_errors", description="requests answered with an error, by endpoint and code",
                              tag_keys=("endpoint", "code"))
        self.latency = Histogram("ogclip_request_latency_ms", description="request latency in the replica (ms)",
                                 boundaries=LATENCY_MS, tag_keys=("endpoint",))
        self.batch_size = Histogram("ogclip_batch_size", description="inputs per model forward pass (dynamic batches)",
                                    boundaries=BATCH_SIZES, tag_keys=("kind",))
        self.inputs = Counter("ogclip_inputs", description="images and texts embedded", tag_keys=("kind",))
        self.revision = Gauge("ogclip_embedding_revision", description="1 for the class-embedding revision a replica "
                              "serves, 0 for ones it served before", tag_keys=("model_version", "revision"))
        self.reload_time = Gauge("ogclip_embedding_revision_loaded_timestamp_seconds",
                                 description="when the served class-embedding revision was loaded (unix time)")
        self.classes = Gauge("ogclip_classes", description="classes served per class set", tag_keys=("class_set",))
        self.reloads = Counter("ogclip_embedding_reloads", description="class-embedding snapshots loaded")
        self.sync_errors = Counter("ogclip_embedding_sync_errors",
                                   description="failed polls or loads of the graph or the retrieval collection")
        self.retries = Counter("ogclip_retries", description="requests sent again to another replica because "
                               "theirs stopped mid-request", tag_keys=("endpoint",))
        self.on_demand = Counter("ogclip_on_demand_embeddings", description="classes embedded by the replica's text "
                                 "tower because the graph had no embedding for them")

    def request(self, endpoint: str, status: int, latency_ms: float) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        self.latency.observe(latency_ms, tags={"endpoint": endpoint})

    def error(self, endpoint: str, code: str) -> None:
        self.errors.inc(tags={"endpoint": endpoint, "code": code})

    def batch(self, kind: str, size: int) -> None:
        self.batch_size.observe(size, tags={"kind": kind})
        self.inputs.inc(size, tags={"kind": kind})

    def snapshot(self, model_version: str, revision: str, previous: str | None, loaded_at: float,
                 classes: dict[str, int], reloaded: bool) -> None:
        """Publish the served revision (``reloaded``: a new snapshot was just loaded)."""
        if previous and previous != revision:
            self.revision.set(0, tags={"model_version": model_version, "revision": previous})
        self.revision.set(1, tags={"model_version": model_version, "revision": revision})
        self.reload_time.set(loaded_at)
        for name, count in classes.items():
            self.classes.set(count, tags={"class_set": name})
        if reloaded:
            self.reloads.inc()
