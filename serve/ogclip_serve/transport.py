"""How a request travels: read (within a byte limit) by the gateway, handed whole to a classifier replica, run
there through the FastAPI app, and its answer handed back.

The gateway keeps the request's bytes until a replica has answered, so a request whose replica died mid-way can be
sent again to another one (:mod:`ogclip_serve.gateway`). Everything here is plain data and plain ASGI: no Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ogclip_serve.config import ServeLimitsConfig
from ogclip_serve.errors import BadRequest, PayloadTooLarge, RequestTimeout, ServiceError

ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                   Awaitable[None]]

# The parts of an HTTP ASGI scope a replica needs to route and answer the request (all of them picklable).
SCOPE_KEYS = ("type", "asgi", "http_version", "scheme", "method", "root_path", "path", "raw_path", "query_string",
              "headers", "client", "server")


# Where the replica's app finds a request's deadline in its ASGI scope.
DEADLINE_KEY = "ogclip.deadline"


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request, whole: what the replica's ASGI app is called with, and when its answer is due (wall-clock
    ``time.time()``; None: no latency budget)."""

    scope: dict[str, Any]
    body: bytes
    deadline: float | None = None


@dataclass(frozen=True)
class Answer:
    """One HTTP response, whole."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def response(self) -> Response:
        response = Response(self.body, status_code=self.status)
        response.raw_headers = list(self.headers)  # as the app sent them (its content-length included)
        return response


def forwardable(request: Request, body: bytes, deadline: float | None = None) -> Forwarded:
    scope = {key: request.scope[key] for key in SCOPE_KEYS if key in request.scope}
    scope["headers"] = [(bytes(k), bytes(v)) for k, v in request.scope.get("headers", [])]
    for key in ("client", "server"):
        if scope.get(key) is not None:
            scope[key] = tuple(scope[key])
    return Forwarded(scope=scope, body=body, deadline=deadline)


async def run_asgi(app: ASGIApp, request: Forwarded) -> Answer:
    """Call an ASGI app with a whole request and collect its whole response.

    After the body the app hears nothing until its response is complete, then a disconnect: a client that waits
    for its answer, as a real connection would look.
    """
    done = asyncio.Event()
    delivered = False
    status, headers, chunks = 500, [], []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = int(message["status"])
            headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                done.set()

    try:
        await app({**request.scope, DEADLINE_KEY: request.deadline}, receive, send)
    except Exception:
        if not done.is_set():
            raise
        # Starlette re-raises an unhandled exception after it has sent its 500: that answer stands (the app logged
        # the exception), and the replica's caller must not mistake it for a lost replica.
    finally:
        done.set()
    return Answer(status=status, headers=headers, body=b"".join(chunks))


async def read_body(request: Request, limits: ServeLimitsConfig) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limits.max_request_bytes`` (declared or streamed),
    and with 408 when it has not all arrived within ``limits.body_timeout_s`` (a client that sends it slowly, or
    stops half-way, holds a connection and a place in the gateway's and the replica's queues)."""
    limit = limits.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise BadRequest("invalid Content-Length header") from exc
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes is over the limit of {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {limits.body_timeout_s:g} s "
                             f"({size} bytes came)") from None
    body = b"".join(chunks)
    request._body = body  # Starlette's own body cache: request.form() then parses these bytes, not the used stream
    return body


def error_response(error: ServiceError) -> JSONResponse:
    """An error as the service answers it: OpenAI's error object, its status, and its headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())
