"""The service's HTTP ingress: a light deployment in front of the classifier replicas.

Serve's proxy answers 500 for every request that was in flight on a replica when the replica died (killed, out of
memory, its node gone). The gateway sits between the two: it reads each request (refusing bodies over
``limits.max_request_bytes`` and, on ``/v1``, requests without the bearer token before it buffers anything), hands
it whole to a classifier replica through a deployment handle, and returns the replica's answer unchanged. When
the replica dies first, an idempotent request (``POST /v1/classify``, ``POST /v1/embeddings``, any ``GET``) is
sent again, to another replica (Serve's router drops a dead replica at once), up to ``gateway.retries`` times;
anything else, or a request whose retries are spent, is answered 503 with ``Retry-After``. Back-pressure (the
replicas' queues full) is a 503 with ``Retry-After`` too, in the service's error format.
"""

# No ``from __future__ import annotations``: Serve resolves the ``request`` annotation of ``__call__``.
import logging
import time
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from ogclip_serve.auth import AuthPolicy
from ogclip_serve.config import service_config
from ogclip_serve.errors import InternalError, ServiceError, Unavailable
from ogclip_serve.metrics import endpoint_label
from ogclip_serve.transport import Answer, Forwarded, error_response, forwardable, read_body

log = logging.getLogger("ogclip_serve")

IDEMPOTENT_POSTS = ("/v1/classify", "/v1/embeddings")  # they change nothing a second call would see twice


def idempotent(method: str, path: str) -> bool:
    """May this request be sent again after its replica died? Reads, and the two POSTs that only compute."""
    return method in ("GET", "HEAD", "OPTIONS") or (method == "POST" and path.rstrip("/").endswith(IDEMPOTENT_POSTS))


def replica_lost(exc: BaseException) -> bool:
    """Did the request fail because its replica went away (rather than because of what it asked)?"""
    if isinstance(exc, (RayActorError, ReplicaUnavailableError)):
        return True
    return isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), RayActorError)


def _api(request: Request) -> bool:
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path == "/v1" or path.startswith("/v1/")


@serve.deployment
class OGClipGateway:
    """The ingress: buffers, authenticates, forwards, and retries on a lost replica."""

    def __init__(self, classifier: DeploymentHandle, config: Mapping[str, Any]) -> None:
        from ogclip.settings import Settings
        from ogclip_serve.metrics import ServiceMetrics

        self.cfg = cfg = service_config(dict(config))
        self.classifier = classifier
        self.auth = AuthPolicy.from_settings(Settings(), cfg.host)
        self.metrics = ServiceMetrics()

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        endpoint = endpoint_label(request.url.path)
        try:
            if _api(request):  # before the body is read: no buffering for anonymous clients
                self.auth.check(request.headers.get("authorization"))
            body = await read_body(request, self.cfg.limits.max_request_bytes)
            answer = await self._send(forwardable(request, body), endpoint,
                                      idempotent(request.method, request.url.path))
            return answer.response()
        except ServiceError as exc:  # answered here: the replicas never saw it, so it is counted here
            error = exc
        except Exception as exc:
            log.exception("gateway: %s %s failed", request.method, endpoint)
            error = InternalError(f"forwarding the request failed: {type(exc).__name__}")
        self.metrics.request(endpoint, error.status, (time.perf_counter() - started) * 1000)
        self.metrics.error(endpoint, str(error.status))
        return error_response(error)

    async def _send(self, request: Forwarded, endpoint: str, retry: bool) -> Answer:
        gateway = self.cfg.gateway
        attempts = 1 + (gateway.retries if retry else 0)
        for attempt in range(1, attempts + 1):
            try:
                return await self.classifier.forward.remote(request)
            except BackPressureError as exc:
                raise Unavailable(f"the service is at capacity ({exc}); send the request again later",
                                  retry_after=gateway.retry_after_s, code="overloaded") from exc
            except DeploymentUnavailableError as exc:
                raise Unavailable("no classifier replica is available", retry_after=gateway.retry_after_s,
                                  code="no_replica") from exc
            except Exception as exc:
                if not replica_lost(exc):
                    raise
                log.warning("%s %s: its replica stopped (%s); attempt %d of %d", request.scope.get("method"),
                            endpoint, type(exc).__name__, attempt, attempts)
                if attempt < attempts:
                    self.metrics.retries.inc(tags={"endpoint": endpoint})
        what = f"; it was sent {attempts} times" if attempts > 1 else " (it is not safe to send it again here)"
        raise Unavailable(f"the replica handling the request stopped before answering{what}; send it again",
                          retry_after=gateway.retry_after_s, code="replica_lost")
