"""Errors the service answers with: each carries its HTTP status and a message that names the problem.

The body is OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, on every endpoint, so the
``openai`` client raises its usual exceptions (BadRequestError, NotFoundError, ...) with our message.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service will not (or cannot now) serve; never a crash of the replica."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        message = printable(message)
        super().__init__(message)
        self.message = message
        self.param = None if param is None else printable(param)
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        """Extra response headers of this error (``WWW-Authenticate``, ``Retry-After``)."""
        return None


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates from a request's JSON) backslash-escaped, so an
    error message that quotes the request can always be sent."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def quoted(value: str, limit: int = 100) -> str:
    """``value`` as an error message quotes it (``repr``), cut to its first ``limit`` characters with its length
    said: a message never grows with what the request sent (a 1-million-character label used to come back whole)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


class BadRequest(ServiceError):
    """Input the service cannot use: undecodable, malformed, or naming something unsupported."""


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class RequestTimeout(ServiceError):
    status = 408
    code = "request_timeout"


class Unauthorized(ServiceError):
    status = 401
    type = "invalid_request_error"  # as OpenAI answers a missing or wrong key
    code = "invalid_api_key"

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class InternalError(ServiceError):
    """A failure of the service itself (a bug): 500, with a short message, and a log line where it happened."""

    status = 500
    type = "server_error"
    code = "internal_error"


class Unavailable(ServiceError):
    """No replica can take the request now (queues full, or its replica died and the retries are spent): the
    client may send it again after ``retry_after`` seconds."""

    status = 503
    type = "server_error"
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


class NotReady(Unavailable):
    """The replica is starting or has not loaded its class embeddings yet: a passing state, so the answer says
    when to ask again."""

    code = "not_ready"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class EmbeddingVersionError(RuntimeError):
    """Class embeddings and bundle disagree (no embeddings for the bundle's version, or another dimension).

    Raised at replica start, so the deployment fails loudly instead of serving a classifier whose classes were
    embedded by a different model.
    """
