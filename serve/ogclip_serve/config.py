"""The service's configuration: :class:`ogclip.config.ServeConfig` plus the settings only the service reads.

``ServiceConfig`` accepts every ``ServeConfig`` file as it is and adds, with defaults, the per-request pixel budget
and working size under ``limits`` and the ``gateway`` section (the ingress that retries a request whose replica
died). The application builder, ``ogclip_serve.server`` and the replicas all validate against it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ogclip.config import ServeConfig, ServeLimitsConfig, StrictModel


class ServiceLimits(ServeLimitsConfig):
    """``ServeLimitsConfig`` plus the bounds on what one request may make a replica decode and process."""

    max_request_pixels: int = Field(
        default=16_000_000, ge=1, description="decoded pixels of all images and masks of one request together, "
        "counted from their headers (JPEGs at the reduced size they are decoded at) before anything is decoded; "
        "more is refused with 413")
    working_pixels: int = Field(
        default=512 * 512, ge=4096, description="a decoded image (and its mask) larger than this is reduced to "
        "about this many pixels before segmentation and preprocessing, which then cost the same for any input "
        "size; JPEGs are decoded at a reduced scale to begin with")


class GatewayConfig(StrictModel):
    """The ingress deployment in front of the classifier replicas: it buffers each request (at most
    ``limits.max_request_bytes``), hands it to a replica, and re-sends an idempotent request (classify,
    embeddings, GET) to another replica when its replica dies mid-request; otherwise, and once the retries are
    spent, it answers 503 with ``Retry-After``."""

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
        default=2.0, gt=0, description="how long an admitted request may take from its arrival here: one that would "
        "be answered later (it waited too long for a replica) is refused with 503 and Retry-After when it reaches "
        "the replica, before any work; null: no budget, requests wait as long as the queues make them")
    ready_timeout_s: float = Field(
        default=1.0, gt=0, description="how long /readyz waits for a replica before it counts them as busy")
    busy_ready_s: float = Field(
        default=10.0, ge=0, description="while every replica is busy, /readyz stays ready (answering the last "
        "readiness a replica gave) as long as a replica has answered a request within this many seconds")


class ServiceConfig(ServeConfig):
    """``ogclip serve up``'s configuration as the service reads it (a ServeConfig file is a valid one)."""

    limits: ServiceLimits = ServiceLimits()
    gateway: GatewayConfig = GatewayConfig()

    @property
    def classifier_capacity(self) -> int:
        """How many requests the classifier replicas can work on and queue at most (all replicas up)."""
        d = self.deployment
        return d.autoscaling.max_replicas * d.max_ongoing_requests + d.max_queued_requests


def service_config(value: ServeConfig | dict[str, Any]) -> ServiceConfig:
    """A ServiceConfig from a ServeConfig (or a subclass) or a mapping of its fields."""
    if isinstance(value, ServiceConfig):
        return value
    if isinstance(value, ServeConfig):
        value = value.model_dump()
    return ServiceConfig.model_validate(dict(value))
