"""The service's configuration schema: :class:`ServeConfig` (``ogclip serve up``'s YAML) and its sections. The
application builder, ``ogclip_serve.server``, the gateway and the replicas all validate against it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ogclip.config import StrictModel


class ServeAutoscalingConfig(StrictModel):
    """Ray Serve autoscaling of the classifier replicas (``autoscaling_config``)."""

    min_replicas: int = Field(default=1, ge=1, description="kept warm: a cold replica loads the model and index")
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=4.0, gt=0, description="per replica, what Serve scales towards")
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=120.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> ServeAutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        return self


class ServeDeploymentConfig(StrictModel):
    """Resources and admission control of the classifier deployment."""

    name: str = Field(default="OGClipClassifier", pattern=r"^[A-Za-z0-9_-]+$")
    num_cpus: float = Field(default=1.0, gt=0, description="per replica; also its torch threads (rounded up)")
    num_gpus: float = Field(default=0.0, ge=0)
    autoscaling: ServeAutoscalingConfig = ServeAutoscalingConfig()
    max_ongoing_requests: int = Field(default=16, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(
        default=64, ge=1, description="requests waiting for a replica; beyond this the service answers 503 at once "
        "(back-pressure) instead of letting latency grow without bound")
    health_check_period_s: float = Field(default=10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)
    access_log: bool = Field(default=True, description="Serve's per-request access log lines in the replica logs")


class ServeBatchingConfig(StrictModel):
    """Dynamic batching across requests (``@serve.batch``): images (and texts) of concurrent requests share one
    forward pass."""

    enabled: bool = True
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0, description="how long a partial batch waits to fill; 0: a batch is what queued while the "
        "last one ran (a lone request is not held back; under load the queue fills the batches)")


class ServeLimitsConfig(StrictModel):
    """Input limits: anything over them is a 4xx answer, never work for the replica; and the bounds on what one
    request may make a replica decode and process."""

    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description="a request body, in bytes")
    body_timeout_s: float = Field(default=60.0, gt=0, description="a request body not all arrived by then is "
                                  "refused with 408: a slow or stalled sender holds a connection and a queue place")
    max_images_per_request: int = Field(default=16, ge=1)
    max_image_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="encoded bytes of one image or mask")
    max_pixels: int = Field(default=16_000_000, ge=1, description="width × height; larger is refused before decoding")
    max_texts_per_request: int = Field(default=64, ge=1)
    max_text_chars: int = Field(default=4096, ge=1)
    max_labels: int = Field(default=512, ge=1, description="explicit candidate labels in one request")
    max_label_chars: int = Field(default=256, ge=1, le=65_536, description="one explicit label (a graph class key): "
                                 "labels are looked up in the graph, whose Bolt messages stop at 16 MiB")
    max_top_k: int = Field(default=100, ge=1)


    max_request_pixels: int = Field(
        default=16_000_000, ge=1, description="decoded pixels of all images and masks of one request together, "
        "counted from their headers (JPEGs at the reduced size they are decoded at) before anything is decoded; "
        "more is refused with 413")
    working_pixels: int = Field(
        default=512 * 512, ge=4096, description="a decoded image (and its mask) larger than this is reduced to "
        "about this many pixels before segmentation and preprocessing, which then cost the same for any input "
        "size; JPEGs are decoded at a reduced scale to begin with")


class ServeClassesConfig(StrictModel):
    """Which class embeddings a replica serves and how it follows the graph."""

    class_sets: list[str] = Field(default=["test"], min_length=1, description="graph class sets to serve")
    default_class_set: str | None = Field(default=None, description="when a request names none (default: first)")
    poll_interval_s: float = Field(default=5.0, gt=0, description="how often a replica checks the graph for changes")
    full_refresh_s: float = Field(default=600.0, gt=0, description="reload everything even without a change seen")
    embed_missing: bool = Field(
        default=True, description="embed classes that have no stored embedding with the bundle's own text tower "
        "(prompts from the graph's facts), instead of leaving them out")
    write_back: bool = Field(default=True, description="store those on-demand embeddings in the graph")
    prompts: Literal["kg", "label"] = Field(default="kg", description="prompt mode, as the export step used")
    prompt_seed: int = Field(default=0, description="seed of the graph prompts, as the export step used")

    @model_validator(mode="after")
    def _default_is_served(self) -> ServeClassesConfig:
        if self.default_class_set is not None and self.default_class_set not in self.class_sets:
            raise ValueError(f"default_class_set {self.default_class_set!r} is not in class_sets {self.class_sets}")
        return self

    @property
    def default(self) -> str:
        return self.default_class_set or self.class_sets[0]


class ServeMaskConfig(StrictModel):
    """Where the ROI mask comes from when a request brings none: 'none' (all ones, the plain-CLIP reading), 'cpu'
    (the weight-free segmenter) or 'sam2' (a local checkpoint, prompted with the request's box when there is one)."""

    segmenter: Literal["none", "cpu", "sam2"] = "none"
    sam2_checkpoint: Path | None = None
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"

    @model_validator(mode="after")
    def _needs_checkpoint(self) -> ServeMaskConfig:
        if self.segmenter == "sam2" and self.sam2_checkpoint is None:
            raise ValueError("masks.segmenter 'sam2' needs masks.sam2_checkpoint (a local path)")
        return self


class ServeRetrievalConfig(StrictModel):
    """The collection ``/v1/retrieve`` searches (``ogclip index build`` writes it; embedded with this bundle), and
    how often a replica looks for a new revision of it."""

    collection: Path | None = Field(default=None, description="collection folder; None: no /v1/retrieve")
    poll_interval_s: float = Field(default=5.0, gt=0, description="how often a replica checks for a new revision")
    storage: Literal["float16", "float32"] = Field(
        default="float16", description="how a replica holds the collection's vectors (one copy per served size, "
        "images and captions): float16 halves the memory and the search time of a large collection, and ranks as "
        "float32 does but for near-ties (similarities differ by about 1e-3); float32 is exact")


class GatewayConfig(StrictModel):
    """The ingress deployment in front of the classifier replicas: it buffers each request (at most
    ``limits.max_request_bytes``), hands it to a replica, and re-sends an idempotent request (classify,
    embeddings, GET) to another replica when its replica dies mid-request; otherwise, and once the retries are
    spent, it answers 503 with ``Retry-After``."""

    enabled: bool = Field(
        default=True, description="false: no gateway, the classifier replicas are the HTTP ingress themselves. One "
        "Serve hop less per request, but a request in flight on a replica that dies gets Serve's 500 instead of a "
        "re-send or a 503, no latency budget applies (latency_budget_s is not read) and /readyz is the replica's own")
    replicas: int = Field(default=1, ge=1, description="gateway replicas (each is light: no model)")
    num_cpus: float = Field(default=0.1, ge=0, description="CPUs reserved per gateway replica")
    max_ongoing_requests: int = Field(
        default=1024, ge=1, description="requests one gateway replica holds at once (at least twice what the "
        "classifier replicas can hold); each is light until admitted. Serve's proxy queues as many again for it and "
        "refuses what is beyond that itself, as plain-text 503s")
    retries: int = Field(
        default=1, ge=0, description="re-sends of a request whose replica died (0: answer 503). Each re-send goes to "
        "another replica; more than one would let a request that kills its replica take down more of them")
    retry_after_s: int = Field(default=1, ge=0, description="the Retry-After of a 503 (seconds); the least one")
    max_retry_after_s: int = Field(
        default=30, ge=0, description="the longest Retry-After of a refusal at capacity, which asks for the time the "
        "replicas need to answer what they hold, at the rate they answer now")
    latency_budget_s: float | None = Field(
        default=2.0, gt=0, description="how long an admitted request may take, as its client sees it. Half of it is "
        "the replicas': a request that would be answered later than half the budget after it reached the gateway "
        "(it waited too long for a replica) is refused with 503 and Retry-After when it reaches the replica, "
        "before any work; the other half is for Serve's HTTP proxy and the network, which the gateway cannot see. "
        "null: no budget, requests wait as long as the queues make them")
    ready_timeout_s: float = Field(
        default=1.0, gt=0, description="how long /readyz waits for a replica before it counts them as busy")
    busy_ready_s: float = Field(
        default=10.0, ge=0, description="while every replica is busy, /readyz stays ready (answering the last "
        "readiness a replica gave) as long as a replica has answered a request within this many seconds")

    @property
    def replica_budget_s(self) -> float | None:
        """The replicas' half of the latency budget: how long after a request reached the gateway it must be answered
        there (the other half is for Serve's HTTP proxy and the network, which the gateway cannot see)."""
        return None if self.latency_budget_s is None else self.latency_budget_s / 2


class ServeConfig(StrictModel):
    """``ogclip serve up``: the classification service (Ray Serve), one app serving one export bundle."""

    bundle: Path = Path("outputs/demo/train/og-clip-tiny-demo/bundle")
    model_version: str | None = Field(
        default=None, description="the version the bundle must have; a different bundle is refused at start")
    app_name: str = Field(default="ogclip", pattern=r"^[A-Za-z0-9_-]+$")
    host: str = Field(default="127.0.0.1", description="HTTP address of the Serve proxy")
    port: int = Field(default=8000, gt=0, lt=65536)
    route_prefix: str = Field(default="/", pattern=r"^/")
    dims: list[int] | None = Field(default=None, description="served embedding sizes (default: all of the model's)")
    device: str = "auto"
    deployment: ServeDeploymentConfig = ServeDeploymentConfig()
    batching: ServeBatchingConfig = ServeBatchingConfig()
    limits: ServeLimitsConfig = ServeLimitsConfig()
    gateway: GatewayConfig = GatewayConfig()
    classes: ServeClassesConfig = ServeClassesConfig()
    masks: ServeMaskConfig = ServeMaskConfig()
    retrieval: ServeRetrievalConfig = ServeRetrievalConfig()
    ray_num_cpus: int | None = Field(default=None, ge=1, description="local Ray's CPUs when no cluster is set")
    metrics_port: int | None = Field(
        default=None, gt=0, lt=65536, description="local Ray's Prometheus export port (on a cluster: "
        "`ray start --metrics-export-port`)")

    @property
    def classifier_capacity(self) -> int:
        """How many requests the classifier replicas can work on and queue at most (all replicas up)."""
        d = self.deployment
        return d.autoscaling.max_replicas * d.max_ongoing_requests + d.max_queued_requests

    @property
    def classifier_working(self) -> int:
        """How many requests the replicas kept warm work on at once (``min_replicas`` of them, none queued)."""
        d = self.deployment
        return d.autoscaling.min_replicas * d.max_ongoing_requests


def serve_config(value: ServeConfig | Mapping[str, Any]) -> ServeConfig:
    """A ServeConfig from a ServeConfig or a mapping of its fields (what a deployment is handed)."""
    return value if isinstance(value, ServeConfig) else ServeConfig.model_validate(dict(value))
