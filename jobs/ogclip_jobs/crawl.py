"""A polite, safe image crawler for URL manifests (for example, URLs found from knowledge-graph search terms).

Every URL becomes exactly one :class:`FetchResult` and one JSON log line; nothing raises for bad input or network
trouble, so one hostile or broken site never stops a manifest. The rules, in the order they are applied:

* **URL and address guard (SSRF).** Only ``http``/``https`` without userinfo. Before any connection (robots.txt
  and every redirect hop included) the host is resolved and refused if any address is loopback, private or
  otherwise not globally routable, link-local, multicast, reserved, unspecified or a cloud metadata endpoint
  (IPv4 embedded in IPv6 is unwrapped first). The same check runs again inside the socket connect, on the
  addresses actually dialled, so a DNS answer that changes between check and connect (rebinding) is refused too.
  Redirects are followed by hand so that each hop goes through the guard.
* **robots.txt (RFC 9309)** per (scheme, host, port), cached at most ``robots_cache_s`` (the RFC caps it at 24 h):
  2xx is parsed, 4xx means allow all, anything else (5xx, 429, network failure, a refused redirect) means
  disallow all until the entry expires. ``Crawl-delay`` is a floor on the per-host interval.
* **Politeness.** At least ``max(min_host_interval_s, crawl-delay)`` between requests to the same host name.
* **Retries** with exponential backoff on 5xx, 429 (honouring ``Retry-After``) and connection errors/timeouts.
* **Opt-outs.** ``X-Robots-Tag`` ``noindex``, ``none``, ``noimageindex``, ``noai`` or ``noimageai`` addressed to us
  (or to everyone) means the image is not kept.
* **Limits.** Content type allow-list and ``Content-Length`` checked before the body is read; the body is streamed
  under a hard byte cap; decoding refuses decompression bombs before pixels are decompressed.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, get_args
from urllib.parse import urldefrag, urljoin, urlsplit, urlunsplit

import requests
from PIL import Image
from protego import Protego
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as urllib3_connection

from ogclip_jobs.config import CrawlConfig, normalise_host

Decision = Literal[
    "ok",
    "disallowed_by_robots",
    "blocked_address",
    "bad_scheme",
    "bad_content_type",
    "too_large",
    "decode_error",
    "http_error",
    "network_error",
    "opted_out",
    "too_many_redirects",
    "robots_fetch",
]
DECISIONS: frozenset[str] = frozenset(get_args(Decision))

ROBOTS_MAX_REDIRECTS = 5  # RFC 9309 §2.3.1.2: follow at least five consecutive redirects
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 §2.5: parse at least 500 KiB; anything beyond may be ignored
MAX_RETRY_AFTER_S = 60.0  # a server may ask for a pause, but not stall the whole manifest on one URL
MAX_CRAWL_DELAY_S = 300.0  # a longer Crawl-delay would freeze a sequential crawl: treat the host as disallowed
BODY_DEADLINE_MIN_S = 60.0  # ``timeout`` bounds each socket read; this bounds a body trickled byte by byte
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
OPT_OUT_DIRECTIVES = frozenset({"noindex", "none", "noimageindex", "noai", "noimageai"})

# Instance-metadata endpoints hand out cloud credentials: never contacted, whatever allow_private says.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class CrawlRefusal(Exception):
    """A fetch that ended in a decision other than ``ok``; carries what the log line needs."""

    def __init__(
        self, decision: Decision, detail: str, *, status: int | None = None, final_url: str | None = None,
        nbytes: int = 0,
    ) -> None:
        super().__init__(f"{decision}: {detail}")
        self.decision: Decision = decision
        self.detail = detail
        self.status = status
        self.final_url = final_url
        self.nbytes = nbytes


@dataclass
class FetchResult:
    """The outcome of one manifest URL. ``image`` (RGB) and ``data`` (the original bytes) are set only for ``ok``."""

    url: str
    final_url: str
    decision: Decision
    status: int | None = None
    image: Image.Image | None = None
    data: bytes | None = None
    content_type: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.decision == "ok"


class FetchLog:
    """JSON-lines record of every fetch (robots.txt included): the audit trail of what was taken and why.

    With a ``path`` each line is appended and flushed at once, so a crash loses nothing already fetched. Without
    one, records are kept in ``records`` (also kept with a path when ``keep_records`` is true).
    """

    def __init__(self, path: Path | str | None = None, *, keep_records: bool | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        self._keep = self.path is None if keep_records is None else keep_records
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def write(
        self, *, url: str, final_url: str, status: int | None, nbytes: int, decision: Decision, detail: str
    ) -> dict[str, Any]:
        """Append one record and return it."""
        record = {
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "url": url,
            "final_url": final_url,
            "status": status,
            "bytes": nbytes,
            "decision": decision,
            "detail": detail,
        }
        with self._lock:
            if self._keep:
                self.records.append(record)
            if self._file is not None:
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
                self._file.flush()
        return record

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> FetchLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------- address guard


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches, for the forms that tunnel or translate to IPv4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def address_refusal(address: str, *, allow_loopback: bool = False, allow_private: bool = False) -> str | None:
    """Why ``address`` (an IP literal) must not be contacted, or ``None`` when it may be.

    Link-local, multicast, reserved, unspecified and metadata addresses are refused whatever the flags say: no
    training image lives there, and link-local is where cloud metadata services listen.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index ("fe80::1%eth0")
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = address_refusal(str(inner), allow_loopback=allow_loopback, allow_private=allow_private)
            return None if reason is None else f"{ip} embeds {inner}: {reason}"
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if ip.is_unspecified:
        return f"{ip} is unspecified"
    if ip.is_loopback:
        return None if allow_loopback else f"{ip} is loopback"
    if ip.is_link_local:
        return f"{ip} is link-local"
    if ip.is_multicast:
        return f"{ip} is multicast"
    if ip.is_reserved or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return f"{ip} is reserved"
    if not ip.is_global:  # RFC 1918, ULA, CGNAT, documentation and benchmark ranges, ...
        return None if allow_private else f"{ip} is private or not globally routable"
    return None


def resolve_checked(host: str, port: int, config: CrawlConfig) -> list[tuple[int, str]]:
    """Resolve ``host`` and return ``(family, address)`` pairs, all of them safe to contact.

    One bad address refuses the whole host: a name that also resolves inside the network is not trusted with
    the others. Raises :class:`CrawlRefusal` (``blocked_address``, or ``network_error`` when the name does not
    resolve).
    """
    name = normalise_host(host)
    exempt = name in config.allowed_hosts
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise CrawlRefusal("network_error", f"cannot resolve {name!r}: {exc}") from exc
    addresses: list[tuple[int, str]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(sockaddr[0])
        reason = address_refusal(
            address,
            allow_loopback=config.allow_loopback or exempt,
            allow_private=config.allow_private or exempt,
        )
        if reason is not None:
            raise CrawlRefusal("blocked_address", f"{name} resolves to {reason}")
        if (family, address) not in addresses:
            addresses.append((family, address))
    if not addresses:
        raise CrawlRefusal("network_error", f"{name!r} has no IPv4 or IPv6 address")
    return addresses


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str
    port: int
    netloc: str

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def check_url(url: str, config: CrawlConfig) -> tuple[str, str, int]:
    """Check a URL's form and its host's addresses; return ``(scheme, host, port)`` or raise :class:`CrawlRefusal`."""
    target = _vet(url, config)
    return target.scheme, target.host, target.port


def _vet(url: str, config: CrawlConfig) -> _Target:
    # Whitespace, control characters and backslashes are where URL parsers disagree with each other; refusing
    # them keeps the host we check and the host requests connects to the same.
    if not url or any(c.isspace() or ord(c) < 0x20 or c in "\\\x7f" for c in url):
        raise CrawlRefusal("bad_scheme", "URL is empty or contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CrawlRefusal("bad_scheme", f"malformed URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise CrawlRefusal("bad_scheme", f"scheme {scheme or '(none)'!r} is not http or https")
    if "@" in parts.netloc:
        raise CrawlRefusal("bad_scheme", "URL carries userinfo (user:password@host)")
    host = normalise_host(parts.hostname or "")
    if not host:
        raise CrawlRefusal("bad_scheme", "URL has no host")
    port = port or _DEFAULT_PORTS[scheme]
    resolve_checked(host, port, config)
    return _Target(url=url, scheme=scheme, host=host, port=port, netloc=parts.netloc)


def _open_vetted_socket(conn: HTTPConnection, config: CrawlConfig) -> socket.socket:
    """Connect only to addresses that pass the guard at connect time (closes the DNS-rebinding window).

    Dials the checked IP literal itself, so no second, unchecked lookup happens; ``conn.host`` stays the name,
    which keeps the Host header, SNI and certificate checks right.
    """
    try:
        addresses = resolve_checked(conn.host, conn.port or 80, config)
    except CrawlRefusal as refusal:
        raise NewConnectionError(conn, f"address guard: {refusal.detail}") from refusal
    last: OSError | None = None
    for _family, address in addresses:
        try:
            return urllib3_connection.create_connection(
                (address, conn.port), conn.timeout, source_address=conn.source_address,
                socket_options=conn.socket_options,
            )
        except OSError as exc:  # TimeoutError included; try the next vetted address
            last = exc
    if isinstance(last, TimeoutError):
        raise ConnectTimeoutError(conn, f"connection to {conn.host} timed out ({conn.timeout})") from last
    raise NewConnectionError(conn, f"failed to connect to {conn.host}: {last}") from last


def _guarded_pool_classes(config: CrawlConfig) -> dict[str, type[HTTPConnectionPool]]:
    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _open_vetted_socket(self, config)

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return _open_vetted_socket(self, config)

    class GuardedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    return {"http": GuardedHTTPConnectionPool, "https": GuardedHTTPSConnectionPool}


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose sockets only ever reach addresses the guard accepts at connect time."""

    def __init__(self, config: CrawlConfig, **kwargs: Any) -> None:
        self._guard_config = config  # before super().__init__, which builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _guarded_pool_classes(self._guard_config)


def _guard_refusal_in(exc: BaseException) -> CrawlRefusal | None:
    """The guard's refusal buried in a requests/urllib3 exception chain, if that is what stopped the request."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, CrawlRefusal):
            return item
        stack.extend([item.__cause__, item.__context__, getattr(item, "reason", None), *item.args])
    return None


# ------------------------------------------------------------------------------------------------ opt-out headers

_AGENT_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_.\-]*)\s*:\s*(.*)$")
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


def robots_tag_opt_out(values: Iterable[str], robots_token: str) -> str | None:
    """The opt-out directive in ``X-Robots-Tag`` header values that applies to ``robots_token``, or ``None``.

    Each header value is a comma-separated list; an ``agent:`` prefix addresses it and the directives after it
    (until the next prefix) to that agent only, so ``otherbot: noindex`` does not bind us.
    """
    token = robots_token.lower()
    for value in values:
        agent: str | None = None
        for raw in value.split(","):
            item = raw.strip()
            match = _AGENT_PREFIX.match(item)
            if match and match.group(1).lower() not in _VALUED_DIRECTIVES:
                agent, item = match.group(1).lower(), match.group(2).strip()
            directive = item.lower()
            if directive in OPT_OUT_DIRECTIVES and agent in (None, "*", token):
                return directive if agent is None else f"{agent}: {directive}"
    return None


def _header_values(response: requests.Response, name: str) -> list[str]:
    # urllib3 keeps repeated headers apart; requests joins them with ", ", which would let an "otherbot:" prefix
    # in one header swallow a plain directive from the next.
    raw_headers = getattr(response.raw, "headers", None)
    if raw_headers is not None and hasattr(raw_headers, "getlist"):
        return list(raw_headers.getlist(name))
    value = response.headers.get(name)
    return [value] if value else []


def _retry_after_s(response: requests.Response) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) as seconds, capped so one server cannot stall the crawl."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


# ------------------------------------------------------------------------------------------------------- crawler


@dataclass
class _RobotsEntry:
    expires: float
    parser: Protego | None  # None: the whole origin is allowed (allow_all) or disallowed
    allow_all: bool
    crawl_delay: float
    detail: str


class Crawler:
    """Fetches image URLs one at a time under the guard, robots.txt, politeness and size rules.

    The crawler mounts :class:`GuardedAdapter` on the session and turns off ``trust_env``: an environment proxy
    would resolve and connect on our behalf, out of reach of the guard (and .netrc credentials must not leak to
    crawled sites). ``clock`` and ``sleep`` drive politeness, backoff and the robots cache; tests pass fakes.
    One crawler serves one thread: its robots cache and per-host timers are not locked.
    """

    def __init__(
        self,
        config: CrawlConfig,
        log: FetchLog,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.log = log
        self._own_session = session is None
        self.session = session if session is not None else requests.Session()
        self.session.trust_env = False
        adapter = GuardedAdapter(config)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._clock = clock
        self._sleep = sleep
        self._robots: dict[tuple[str, str, int], _RobotsEntry] = {}
        self._last_request: dict[str, float] = {}
        self._headers = {
            "User-Agent": config.user_agent,
            "Accept": ", ".join(config.allowed_content_types),
            # Images are already compressed; asking for identity keeps Content-Length equal to what we read.
            "Accept-Encoding": "identity",
        }

    # -- public ---------------------------------------------------------------------------------------------

    def fetch(self, url: str) -> FetchResult:
        """Fetch one URL. Never raises for bad input or network trouble: failures are decisions, each logged."""
        try:
            result = self._fetch(url)
            nbytes = len(result.data or b"")
        except CrawlRefusal as refusal:
            result = FetchResult(
                url=url, final_url=refusal.final_url or url, decision=refusal.decision, status=refusal.status,
                detail=refusal.detail,
            )
            nbytes = refusal.nbytes
        except Exception as exc:  # a bug or library surprise on one URL must not end the manifest
            result = FetchResult(url=url, final_url=url, decision="network_error",
                                 detail=f"unexpected {type(exc).__name__}: {exc}")
            nbytes = 0
        self.log.write(url=result.url, final_url=result.final_url, status=result.status, nbytes=nbytes,
                       decision=result.decision, detail=result.detail)
        return result

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> Crawler:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- fetch pipeline -------------------------------------------------------------------------------------

    def _fetch(self, url: str) -> FetchResult:
        current = url
        for _hop in range(self.config.max_redirects + 1):
            try:
                target = _vet(current, self.config)
                entry = self._robots_entry(target)
                if not self._robots_allows(entry, current):
                    raise CrawlRefusal("disallowed_by_robots", entry.detail)
                response = self._request(target, self._interval(target))
            except CrawlRefusal as refusal:
                refusal.final_url = refusal.final_url or current
                raise
            with response:
                if response.status_code in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise CrawlRefusal("http_error", "redirect without Location", status=response.status_code,
                                           final_url=current)
                    current = urldefrag(urljoin(current, location)).url
                    continue
                return self._accept(url, current, response)
        raise CrawlRefusal("too_many_redirects", f"more than {self.config.max_redirects} redirects",
                           final_url=current)

    def _accept(self, url: str, final_url: str, response: requests.Response) -> FetchResult:
        status = response.status_code

        def refuse(decision: Decision, detail: str, nbytes: int = 0) -> CrawlRefusal:
            return CrawlRefusal(decision, detail, status=status, final_url=final_url, nbytes=nbytes)

        if not 200 <= status < 300:
            raise refuse("http_error", f"HTTP {status}")
        opt_out = robots_tag_opt_out(_header_values(response, "X-Robots-Tag"), self.config.robots_token)
        if opt_out is not None:
            raise refuse("opted_out", f"X-Robots-Tag {opt_out}")
        content_type = (response.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type not in self.config.allowed_content_types:
            raise refuse("bad_content_type", f"Content-Type {content_type or '(missing)'!r} is not allowed")
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > self.config.max_bytes:
            raise refuse("too_large", f"Content-Length {declared} > max_bytes {self.config.max_bytes}")
        data = self._read_capped(response, self.config.max_bytes, truncate=False)
        try:
            image = _decode(data, self.config.max_pixels)
        except Exception as exc:  # ImageDecodeError, and anything else a hostile file provokes in PIL
            raise refuse("decode_error", str(exc), nbytes=len(data)) from exc
        return FetchResult(url=url, final_url=final_url, decision="ok", status=status, image=image, data=data,
                           content_type=content_type, detail=f"{image.width}x{image.height}")

    def _read_capped(self, response: requests.Response, limit: int, *, truncate: bool) -> bytes:
        deadline = time.monotonic() + max(BODY_DEADLINE_MIN_S, 3 * self.config.timeout_s)  # real time, not clock
        buffer = bytearray()
        try:
            for chunk in response.iter_content(chunk_size=65_536):
                buffer += chunk
                if len(buffer) > limit:
                    if truncate:
                        return bytes(buffer[:limit])
                    raise CrawlRefusal("too_large", f"body exceeds max_bytes {limit}", status=response.status_code,
                                       nbytes=len(buffer))
                if time.monotonic() > deadline:
                    raise CrawlRefusal("network_error", "body read exceeded its deadline",
                                       status=response.status_code, nbytes=len(buffer))
        except (requests.RequestException, OSError) as exc:
            raise CrawlRefusal("network_error", f"reading body: {type(exc).__name__}: {exc}",
                               status=response.status_code, nbytes=len(buffer)) from exc
        return bytes(buffer)

    def _request(self, target: _Target, interval: float) -> requests.Response:
        """GET with politeness and retries; returns the last response whatever its status."""
        retries = self.config.retries
        for attempt in range(retries + 1):
            self._wait_turn(target.host, interval)
            try:
                response = self.session.get(
                    target.url, headers=self._headers, timeout=self.config.timeout_s, allow_redirects=False,
                    stream=True,
                )
            except requests.RequestException as exc:
                refusal = _guard_refusal_in(exc)
                if refusal is not None:
                    raise CrawlRefusal(refusal.decision, refusal.detail) from exc
                if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                                    requests.exceptions.MissingSchema)):
                    raise CrawlRefusal("bad_scheme", f"{type(exc).__name__}: {exc}") from exc
                retryable = isinstance(exc, (requests.ConnectionError, requests.Timeout,
                                             requests.exceptions.ChunkedEncodingError))
                if not retryable or attempt == retries:
                    raise CrawlRefusal("network_error", f"{type(exc).__name__}: {exc}") from exc
                self._sleep(self._backoff(attempt))
                continue
            status = response.status_code
            if (status == 429 or status >= 500) and attempt < retries:
                delay = self._backoff(attempt)
                retry_after = _retry_after_s(response)
                if retry_after is not None:
                    delay = max(delay, retry_after)
                response.close()
                self._sleep(delay)
                continue
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, attempt: int) -> float:
        return self.config.backoff_s * (2**attempt)

    def _interval(self, target: _Target) -> float:
        entry = self._robots.get(target.origin)
        delay = entry.crawl_delay if entry is not None else 0.0
        return max(self.config.min_host_interval_s, delay)

    def _wait_turn(self, host: str, interval: float) -> None:
        # Keyed by host name, not origin: ports and schemes of one name usually share one machine.
        last = self._last_request.get(host)
        if last is not None:
            wait = last + interval - self._clock()
            if wait > 0:
                self._sleep(wait)
        self._last_request[host] = self._clock()

    # -- robots.txt -----------------------------------------------------------------------------------------

    def _robots_allows(self, entry: _RobotsEntry, url: str) -> bool:
        if entry.parser is None:
            return entry.allow_all
        return entry.parser.can_fetch(url, self.config.user_agent)

    def _robots_entry(self, target: _Target) -> _RobotsEntry:
        now = self._clock()
        entry = self._robots.get(target.origin)
        if entry is None or entry.expires <= now:
            if len(self._robots) > 10_000:  # long manifests touch many hosts; drop what has expired anyway
                self._robots = {k: v for k, v in self._robots.items() if v.expires > now}
            entry = self._fetch_robots(target)
            self._robots[target.origin] = entry
        return entry

    def _fetch_robots(self, target: _Target) -> _RobotsEntry:
        robots_url = urlunsplit((target.scheme, target.netloc, "/robots.txt", "", ""))
        current, status, nbytes = robots_url, None, 0
        parser: Protego | None = None
        allow_all = False
        crawl_delay = 0.0
        try:
            for _hop in range(ROBOTS_MAX_REDIRECTS + 1):
                hop = _vet(current, self.config)
                with self._request(hop, self.config.min_host_interval_s) as response:
                    status = response.status_code
                    if status in REDIRECT_STATUSES and response.headers.get("Location"):
                        current = urldefrag(urljoin(current, response.headers["Location"])).url
                        continue
                    if 200 <= status < 300:
                        body = self._read_capped(response, ROBOTS_MAX_BYTES, truncate=True)
                        nbytes = len(body)
                        parser = Protego.parse(body.decode("utf-8", errors="replace"))
                        crawl_delay = parser.crawl_delay(self.config.user_agent) or 0.0
                        detail = f"HTTP {status}: parsed, crawl-delay {crawl_delay:g}"
                    elif 400 <= status < 500 and status != 429:
                        allow_all = True
                        detail = f"HTTP {status}: unavailable, allow all"
                    else:  # 5xx, a persistent 429 (overload), or a status robots.txt should never have
                        detail = f"HTTP {status}: unreachable, disallow all"
                    break
            else:
                detail = f"more than {ROBOTS_MAX_REDIRECTS} redirects: disallow all"
        except CrawlRefusal as refusal:
            detail = f"{refusal.decision}: {refusal.detail}: disallow all"
            status = refusal.status if refusal.status is not None else status
            nbytes = refusal.nbytes
        except Exception as exc:  # a parser surprise; failing closed is the safe reading
            parser = None
            detail = f"unexpected {type(exc).__name__}: {exc}: disallow all"
        if crawl_delay > MAX_CRAWL_DELAY_S:
            detail = f"crawl-delay {crawl_delay:g} s exceeds {MAX_CRAWL_DELAY_S:g} s: disallow all"
            parser, crawl_delay, allow_all = None, 0.0, False
        self.log.write(url=robots_url, final_url=current, status=status, nbytes=nbytes, decision="robots_fetch",
                       detail=detail)
        return _RobotsEntry(expires=self._clock() + self.config.robots_cache_s, parser=parser, allow_all=allow_all,
                            crawl_delay=crawl_delay, detail=f"robots.txt {robots_url}: {detail}")


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    # Imported here: ogclip.transforms pulls in torch, which a crawl otherwise never needs.
    from ogclip.decode import decode_image

    return decode_image(data, max_pixels)


def crawl_manifest(urls: Iterable[str], config: CrawlConfig, log_path: Path) -> Iterator[FetchResult]:
    """Fetch every URL of a manifest in order, one result per URL, logging to ``log_path`` (JSON lines, appended)."""
    with FetchLog(log_path) as log, Crawler(config, log) as crawler:
        for url in urls:
            yield crawler.fetch(url)
