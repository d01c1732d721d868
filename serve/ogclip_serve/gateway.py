"""The service's HTTP ingress: a light deployment in front of the classifier replicas.

Serve's proxy answers 500 for every request that was in flight on a replica when the replica died (killed, out of
memory, its node gone). The gateway sits between the two: it reads each request (refusing bodies over
``limits.max_request_bytes`` and, on ``/v1``, requests without the bearer token before it buffers anything; a body
sent anywhere else, where no path takes one, is refused unread), hands
it whole to a classifier replica through a deployment handle, and returns the replica's answer unchanged. When
the replica dies first, an idempotent request (``POST /v1/classify``, ``/v1/embeddings``, ``/v1/retrieve``, any
``GET``) is sent again, to another replica (Serve's router drops a dead replica at once), up to
``gateway.retries`` times; anything else, or a request whose retries are spent, is answered 503 with
``Retry-After``. Back-pressure (the
replicas' queues full) is a 503 with ``Retry-After`` too, in the service's error format.

Admission: each request carries the deadline its arrival sets, half of ``gateway.latency_budget_s`` later (the other
half is for Serve's HTTP proxy and the network, before the gateway sees the request and after it answers); a replica
refuses one that would be answered later (503, ``Retry-After``) before any work, so the time an admitted request
spends from the gateway on stays within its half however long the queues are. ``/healthz`` is answered here (the
HTTP path is alive, whatever the replicas' queues hold); ``/readyz`` asks a replica, and when every replica is too
busy to answer it within ``gateway.ready_timeout_s`` while they keep answering requests, answers the last readiness
a replica gave: busy is not unready. That answer is kept fresh by the gateway's own health check (every
``health_check_period_s`` from its start), so a gateway flooded before anyone asked ``/readyz`` still knows whether
its replicas can serve.
"""

# No ``from __future__ import annotations``: Serve resolves the ``request`` annotation of ``__call__``.
import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ogclip_serve.auth import AuthPolicy
from ogclip_serve.config import serve_config
from ogclip_serve.errors import InternalError, PayloadTooLarge, ServiceError, Unavailable, quoted
from ogclip_serve.metrics import endpoint_label
from ogclip_serve.transport import Answer, Forwarded, error_response, forwardable, read_body

log = logging.getLogger("ogclip_serve")

IDEMPOTENT_POSTS = ("/v1/classify", "/v1/embeddings", "/v1/retrieve")  # they only compute: safe to send twice
# The longest the gateway's health check waits for a replica's /readyz: within Serve's 30 s health-check timeout,
# past which Serve would count the gateway itself as unhealthy and replace it.
HEALTH_CHECK_WAIT_S = 20.0


def idempotent(method: str, path: str) -> bool:
    """May this request be sent again after its replica died? Reads, and the two POSTs that only compute."""
    return method in ("GET", "HEAD", "OPTIONS") or (method == "POST" and path.rstrip("/").endswith(IDEMPOTENT_POSTS))


def replica_lost(exc: BaseException) -> bool:
    """Did the request fail because its replica went away (rather than because of what it asked)?"""
    if isinstance(exc, (RayActorError, ReplicaUnavailableError)):
        return True
    return isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), RayActorError)


def _route(request: Request) -> str:
    """The request's path within the application (its route prefix removed)."""
    path, root = request.url.path, request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _carries_body(request: Request) -> bool:
    """Whether the request says it sends a body (a non-zero Content-Length, or any Transfer-Encoding)."""
    return request.headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in request.headers


class ConcurrencyLimit:
    """How many requests the gateway lets the replicas hold at once (working and queued), adapted to how fast they
    answer: additive increase, multiplicative decrease on latency, as TCP's congestion avoidance does with its
    window. An answer that took more than half the latency budget from here (the other half is for what the
    gateway cannot see: Serve's HTTP proxy, the network; a replica's refusal of a request as too late comes after
    such a wait too) cuts the limit by a tenth, once per round trip: answers to requests sent before the last cut
    report the queue that cut was for and do not cut again. Any other answer grows the limit by one over the
    limit, about one request per round trip, up to ``ceiling`` (what the replicas can hold at most). The limit
    starts at ``start``, what the replicas work on at once, not at what they can queue: the first burst of an
    overload then waits no longer than later ones. Under overload the queue thus stays as long as the replicas
    can work off within the budget, and what is over it is refused at once, before its body is read, instead of
    after a wait.

    A refusal's ``Retry-After`` (:meth:`retry_after`) is the time the replicas need to answer what they already
    hold, at the rate they answered over the last ``window_s``: clients that honour it come back when there is
    room, instead of every second, so refusals stop costing the HTTP proxy what the admitted requests need."""

    def __init__(self, target_s: float | None, ceiling: int, start: int | None = None, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target_s = target_s  # the replicas' half of the budget (``GatewayConfig.replica_budget_s``)
        self.ceiling = float(ceiling)
        # Without a budget nothing adapts: the limit is all the replicas can hold.
        self.limit = self.ceiling if start is None or target_s is None else float(min(max(start, 1), ceiling))
        self.window_s, self.clock = window_s, clock
        self._answers: deque[float] = deque()  # clock() of the answers within the window
        self._cut_at = -math.inf  # clock() of the last cut

    def admits(self, in_flight: int) -> bool:
        return in_flight < max(1, int(self.limit))

    def retry_after(self, in_flight: int, least: int, most: int) -> int:
        """Seconds until the replicas have answered the ``in_flight`` requests they hold, within [least, most]
        (``least`` until enough answers came to tell the rate)."""
        now = self.clock()
        while self._answers and self._answers[0] < now - self.window_s:
            self._answers.popleft()
        if len(self._answers) < 5:
            return least
        rate = len(self._answers) / max(now - self._answers[0], 1e-3)
        return max(least, min(most, math.ceil(in_flight / rate)))

    def answered(self, seconds: float) -> None:
        """An answer to a request sent ``seconds`` ago."""
        now = self.clock()
        self._answers.append(now)
        if self.target_s is None:
            return
        if seconds <= self.target_s:
            self.limit = min(self.ceiling, self.limit + 1.0 / self.limit)
        elif now - seconds >= self._cut_at:
            self.limit = max(1.0, self.limit * 0.9)
            self._cut_at = now


@serve.deployment
class OGClipGateway:
    """The ingress: buffers, authenticates, forwards, and retries on a lost replica."""

    def __init__(self, classifier: DeploymentHandle, config: Mapping[str, Any]) -> None:
        from ogclip.settings import Settings
        from ogclip_serve.metrics import ServiceMetrics

        self.cfg = cfg = serve_config(dict(config))
        self.classifier = classifier
        self.auth = AuthPolicy.from_settings(Settings(), cfg.host)
        self.metrics = ServiceMetrics()
        self._ready: Answer | None = None  # a replica's last answer to /readyz, if it was "ready" (200)
        self._answered_at = -math.inf  # time.monotonic() of a replica's last answer to any request
        self._in_flight = 0  # requests handed to the replicas and not answered yet
        self._limit = ConcurrencyLimit(cfg.gateway.replica_budget_s, cfg.classifier_capacity, cfg.classifier_working)

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        target = self.cfg.gateway.replica_budget_s
        deadline = time.time() + target if target is not None else None
        endpoint, route = endpoint_label(request.url.path), _route(request)
        try:
            if route == "/healthz" and request.method == "GET":
                return JSONResponse({"status": "ok"})
            if route == "/v1" or route.startswith("/v1/"):  # before the body is read: no buffering for anonymous
                self.auth.check(request.headers.get("authorization"))
                self._admit()
            elif _carries_body(request):  # nothing outside /v1 takes a body, and nothing there needs the token
                raise PayloadTooLarge(f"{quoted(route)} takes no request body", code="body_not_accepted")
            body = await read_body(request, self.cfg.limits)
            if route == "/readyz" and request.method == "GET":
                return (await self._readiness(forwardable(request, body))).response()
            answer = await self._send(forwardable(request, body, deadline), endpoint,
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

    def _admit(self) -> None:
        """Refuse a request before its body is read while the replicas already hold all they can answer within the
        latency budget (:class:`ConcurrencyLimit`), or all they can hold at all."""
        if not self._limit.admits(self._in_flight):
            gateway = self.cfg.gateway
            raise Unavailable(f"the service is at capacity ({self._in_flight} requests in progress or queued); "
                              "send the request again later", code="overloaded", retry_after=self._limit.retry_after(
                                  self._in_flight, gateway.retry_after_s, gateway.max_retry_after_s))

    async def _send(self, request: Forwarded, endpoint: str, retry: bool) -> Answer:
        gateway = self.cfg.gateway
        attempts = 1 + (gateway.retries if retry else 0)
        for attempt in range(1, attempts + 1):
            self._in_flight += 1
            sent = time.perf_counter()
            try:
                answer = await self.classifier.forward.remote(request)
                if answer.status < 500:
                    self._answered_at = time.monotonic()
                self._limit.answered(time.perf_counter() - sent)
                return answer
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
            finally:
                self._in_flight -= 1
        what = f"; it was sent {attempts} times" if attempts > 1 else " (it is not safe to send it again here)"
        raise Unavailable(f"the replica handling the request stopped before answering{what}; send it again",
                          retry_after=gateway.retry_after_s, code="replica_lost")

    async def _readiness(self, request: Forwarded) -> Answer:
        """A replica's /readyz answer; while every replica is busy but answering requests, the last one it gave."""
        gateway = self.cfg.gateway
        try:
            answer = await asyncio.wait_for(self._send(request, "/readyz", retry=True), gateway.ready_timeout_s)
        except (Unavailable, asyncio.TimeoutError) as exc:
            busy = isinstance(exc, asyncio.TimeoutError) or exc.code == "overloaded"
            serving = time.monotonic() - self._answered_at <= gateway.busy_ready_s
            if busy and serving and self._ready is not None:
                return self._ready
            if isinstance(exc, Unavailable):
                raise
            raise Unavailable(f"no replica answered within {gateway.ready_timeout_s:g} s",
                              retry_after=gateway.retry_after_s, code="overloaded") from exc
        self._ready = answer if answer.status == 200 else None
        return answer

    async def check_health(self) -> None:
        """Serve's periodic health check of the gateway: refresh the cached readiness by asking a replica's
        ``/readyz`` (waiting up to ``busy_ready_s`` behind the queued requests, at most ``HEALTH_CHECK_WAIT_S``). The
        gateway itself is healthy whatever the replicas answer, so nothing here raises."""
        probe = Forwarded(scope={"type": "http", "http_version": "1.1", "scheme": "http", "method": "GET",
                                 "root_path": "", "path": "/readyz", "raw_path": b"/readyz", "query_string": b"",
                                 "headers": [], "client": None, "server": None}, body=b"")
        wait = min(max(self.cfg.gateway.ready_timeout_s, self.cfg.gateway.busy_ready_s), HEALTH_CHECK_WAIT_S)
        try:
            answer = await asyncio.wait_for(self._send(probe, "/readyz", retry=True), wait)
        except Exception as exc:  # busy, unavailable or starting: keep what the last answer said
            log.info("gateway health check: no readiness answer from a replica within %g s (%s)", wait,
                     exc or type(exc).__name__)
            return
        self._ready = answer if answer.status == 200 else None
