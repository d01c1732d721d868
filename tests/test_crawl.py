"""The image crawler against real local HTTP servers: guard, robots.txt, politeness, retries, limits and the log.

Nothing here may reach past 127.0.0.1: an autouse fixture swaps in a socket class that refuses any other peer and
a resolver that answers only IP literals and a few fake names, so a guard bug fails a test instead of sending
traffic. A fake clock drives politeness and backoff, so the delays are checked without being waited out.
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image
from pydantic import ValidationError

from ogclip_jobs.crawl import (
    DECISIONS,
    CrawlConfig,
    Crawler,
    CrawlRefusal,
    FetchLog,
    GuardedAdapter,
    _guard_refusal_in,
    address_refusal,
    check_url,
    crawl_manifest,
    robots_tag_opt_out,
)

CRAWL_DELAY = 2.0
MIN_INTERVAL = 0.5
RETRIES = 3
BACKOFF = 0.5

# --------------------------------------------------------------------------------------------- network lockdown

_REAL_GETADDRINFO = socket.getaddrinfo
_REAL_SOCKET = socket.socket
FAKE_DNS: dict[str, Callable[[], str]] = {}
NON_LOOPBACK_CONNECTS: list[Any] = []


class _LoopbackOnlySocket(_REAL_SOCKET):
    """A socket that refuses (and records) any connect to a peer other than 127.0.0.1 or ::1."""

    def _check(self, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            NON_LOOPBACK_CONNECTS.append(address)
            raise OSError(f"test lockdown: connect to {address!r} refused")

    def connect(self, address: Any) -> None:
        self._check(address)
        super().connect(address)

    def connect_ex(self, address: Any) -> int:
        self._check(address)
        return super().connect_ex(address)


def _lockdown_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
    name = host.decode() if isinstance(host, bytes) else host
    if name in FAKE_DNS:
        address = FAKE_DNS[name]()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr = (address, int(port or 0), 0, 0) if family == socket.AF_INET6 else (address, int(port or 0))
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]
    try:
        ipaddress.ip_address(str(name).split("%", 1)[0])
    except ValueError as exc:
        raise socket.gaierror(socket.EAI_NONAME, f"test lockdown: no DNS for {name!r}") from exc
    return _REAL_GETADDRINFO(host, port, *args, **kwargs)


@pytest.fixture(autouse=True)
def network_lockdown(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    FAKE_DNS.clear()
    NON_LOOPBACK_CONNECTS.clear()
    monkeypatch.setattr(socket, "socket", _LoopbackOnlySocket)
    monkeypatch.setattr(socket, "getaddrinfo", _lockdown_getaddrinfo)
    yield
    FAKE_DNS.clear()


# ---------------------------------------------------------------------------------------------------- test data


def _png(size: tuple[int, int] = (8, 8), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=1 if mode == "1" else (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 120, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


PNG = _png()
JPEG = _jpeg()
TRUNCATED = PNG[: len(PNG) // 2]


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """400 megapixels of a 1-bit image: about 50 kB on the wire, gigabytes once decoded to RGB."""
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, "PNG")
    return buffer.getvalue()


class FakeClock:
    """Monotonic time that only moves when the crawler sleeps; servers stamp requests with it."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


# ------------------------------------------------------------------------------------------------- local server


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, robots: str, clock: FakeClock, bomb: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.robots = robots
        self.clock = clock
        self.bomb = bomb
        self.hits: list[tuple[str, float, str | None, str | None]] = []
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def paths(self) -> list[str]:
        return [hit[0] for hit in self.hits]

    def times(self) -> list[float]:
        return [hit[1] for hit in self.hits]


ROBOTS_RULES = f"User-agent: *\nDisallow: /private/\nCrawl-delay: {CRAWL_DELAY:g}\n"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output quiet
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str | None = None,
              headers: list[tuple[str, str]] | None = None, length: int | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in headers or []:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        server = self.server
        path = self.path
        with server.lock:
            server.hits.append((path, server.clock.now, self.headers.get("Host"), self.headers.get("User-Agent")))
            server.counts[path] = count = server.counts.get(path, 0) + 1
        base = server.base
        try:
            if path == "/robots.txt":
                if server.robots == "rules":
                    self._send(200, ROBOTS_RULES.encode(), "text/plain")
                elif server.robots == "500":
                    self._send(500, b"oops", "text/plain")
                elif server.robots == "404":
                    self._send(404, b"no robots here", "text/plain")
                elif server.robots == "slow":
                    self._send(200, b"User-agent: *\nCrawl-delay: 100000\n", "text/plain")
                elif server.robots == "redirect_private":
                    self._send(302, headers=[("Location", "http://10.0.0.1/robots.txt")])
            elif path in ("/img.png", "/private/secret.png"):
                self._send(200, PNG, "image/png")
            elif path == "/img.jpg":
                self._send(200, JPEG, "image/jpeg; charset=binary")
            elif path == "/bomb.png":
                self._send(200, server.bomb, "image/png")
            elif path == "/truncated.png":
                self._send(200, TRUNCATED, "image/png")
            elif path == "/page.html":
                self._send(200, b"<html><body>not an image</body></html>", "text/html; charset=utf-8")
            elif path == "/stream.png":  # no Content-Length: the body ends when the connection closes
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"\0" * 16_384)
            elif path == "/declared-huge.png":
                self._send(200, PNG, "image/png", length=10**9)
            elif path == "/flaky.png":
                self._send(503, b"busy", "text/plain") if count <= 2 else self._send(200, PNG, "image/png")
            elif path == "/always503.png":
                self._send(503, b"busy", "text/plain")
            elif path == "/ratelimited.png":
                if count == 1:
                    self._send(429, b"slow down", "text/plain", headers=[("Retry-After", "7")])
                else:
                    self._send(200, PNG, "image/png")
            elif path == "/missing.png":
                self._send(404, b"missing", "text/plain")
            elif path == "/drop.png":
                self.close_connection = True  # no status line at all: the client sees the connection drop
            elif path.startswith("/redirect-"):
                location = {
                    "/redirect-local": "/img.png",
                    "/redirect-absolute": f"{base}/img.jpg",
                    "/redirect-private": "http://10.0.0.1/x.png",
                    "/redirect-metadata": "http://169.254.169.254/latest/meta-data/",
                    "/redirect-mapped": "http://[::ffff:10.0.0.1]/x.png",
                    "/redirect-loop": "/redirect-loop",
                    "/redirect-file": "file:///etc/passwd",
                    "/redirect-robots": "/private/secret.png",
                }[path]
                self._send(302, headers=[("Location", location)])
            elif path == "/noai.png":
                self._send(200, PNG, "image/png", headers=[("X-Robots-Tag", "noai")])
            elif path == "/otherbot.png":
                self._send(200, PNG, "image/png", headers=[("X-Robots-Tag", "otherbot: noindex")])
            elif path == "/ours.png":
                self._send(200, PNG, "image/png", headers=[("X-Robots-Tag", "OGCLIP-Crawler: noimageindex")])
            elif path == "/repeated.png":
                self._send(200, PNG, "image/png",
                           headers=[("X-Robots-Tag", "otherbot: noindex"), ("X-Robots-Tag", "NoImageAI")])
            else:
                self._send(404, b"unknown", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the crawler hung up on purpose (a size limit): not an error


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def serve(clock: FakeClock, bomb_png: bytes) -> Iterator[Callable[[str], _Server]]:
    servers: list[_Server] = []

    def start(robots: str) -> _Server:
        server = _Server(robots, clock, bomb_png)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class RecordingSession(requests.Session):
    """Records every request that reaches the transport, to prove refused URLs were never sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent.append(str(request.url))
        return super().send(request, **kwargs)


def make_config(**overrides: Any) -> CrawlConfig:
    settings: dict[str, Any] = dict(allowed_hosts=["127.0.0.1"], min_host_interval_s=MIN_INTERVAL, timeout_s=5,
                                    max_bytes=200_000, retries=RETRIES, backoff_s=BACKOFF)
    settings.update(overrides)
    return CrawlConfig(**settings)


def make_crawler(clock: FakeClock, **overrides: Any) -> tuple[Crawler, FetchLog, RecordingSession]:
    log = FetchLog()
    session = RecordingSession()
    return Crawler(make_config(**overrides), log, session=session, clock=clock, sleep=clock.sleep), log, session


def fetch_lines(log: FetchLog) -> list[dict[str, Any]]:
    return [r for r in log.records if r["decision"] != "robots_fetch"]


def robots_lines(log: FetchLog) -> list[dict[str, Any]]:
    return [r for r in log.records if r["decision"] == "robots_fetch"]


# ------------------------------------------------------------------------------------------------ manifest run

MANIFEST: list[tuple[str, str]] = [
    ("/img.png", "ok"),
    ("/img.jpg", "ok"),
    ("/private/secret.png", "disallowed_by_robots"),
    ("/bomb.png", "decode_error"),
    ("/truncated.png", "decode_error"),
    ("/page.html", "bad_content_type"),
    ("/stream.png", "too_large"),
    ("/declared-huge.png", "too_large"),
    ("/flaky.png", "ok"),
    ("/always503.png", "http_error"),
    ("/ratelimited.png", "ok"),
    ("/missing.png", "http_error"),
    ("/drop.png", "network_error"),
    ("/redirect-local", "ok"),
    ("/redirect-absolute", "ok"),
    ("/redirect-private", "blocked_address"),
    ("/redirect-metadata", "blocked_address"),
    ("/redirect-mapped", "blocked_address"),
    ("/redirect-loop", "too_many_redirects"),
    ("/redirect-file", "bad_scheme"),
    ("/redirect-robots", "disallowed_by_robots"),
    ("/noai.png", "opted_out"),
    ("/otherbot.png", "ok"),
    ("/ours.png", "opted_out"),
    ("/repeated.png", "opted_out"),
]


def test_manifest_decisions_log_and_politeness(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    server = serve("rules")
    crawler, log, session = make_crawler(clock)
    urls = [server.base + path for path, _ in MANIFEST]

    results = [crawler.fetch(url) for url in urls]

    assert len(results) == len(urls)  # nothing lost
    assert [(r.url, r.decision) for r in results] == [(u, d) for u, (_, d) in zip(urls, MANIFEST, strict=True)]
    lines = fetch_lines(log)
    assert [(line["url"], line["decision"]) for line in lines] == [(r.url, r.decision) for r in results]
    for line, result in zip(lines, results, strict=True):
        assert set(line) == {"timestamp", "url", "final_url", "status", "bytes", "decision", "detail"}
        assert line["decision"] in DECISIONS and line["final_url"] == result.final_url
        assert line["status"] == result.status and isinstance(line["detail"], str)
        assert datetime.fromisoformat(line["timestamp"]).utcoffset() == timedelta(0)
    # robots.txt fetched once for the origin and logged like any fetch
    assert server.counts["/robots.txt"] == 1
    (robots_line,) = robots_lines(log)
    assert robots_line["status"] == 200 and robots_line["bytes"] == len(ROBOTS_RULES)

    by_path = {path: r for (path, _), r in zip(MANIFEST, results, strict=True)}
    ok = by_path["/img.png"]
    assert ok.status == 200 and ok.content_type == "image/png" and ok.data == PNG
    assert ok.image is not None and ok.image.mode == "RGB" and ok.image.size == (8, 8)
    assert by_path["/img.jpg"].content_type == "image/jpeg" and by_path["/img.jpg"].data == JPEG
    for result in results:
        assert (result.image is not None) == (result.data is not None) == (result.decision == "ok")
    assert "pixels" in by_path["/bomb.png"].detail
    assert by_path["/redirect-local"].final_url == server.base + "/img.png"
    assert by_path["/redirect-absolute"].final_url == server.base + "/img.jpg"
    assert by_path["/redirect-private"].final_url == "http://10.0.0.1/x.png"
    assert by_path["/redirect-metadata"].final_url == "http://169.254.169.254/latest/meta-data/"
    assert by_path["/redirect-robots"].final_url == server.base + "/private/secret.png"
    assert by_path["/always503.png"].status == 503 and by_path["/missing.png"].status == 404
    assert by_path["/declared-huge.png"].status == 200
    assert by_path["/stream.png"].detail.startswith("body exceeds")

    # retries: 5xx and 429 retried, other 4xx not, connection drops retried
    assert server.counts["/flaky.png"] == 3
    assert server.counts["/always503.png"] == RETRIES + 1
    assert server.counts["/missing.png"] == 1
    assert server.counts["/drop.png"] == RETRIES + 1
    assert server.counts["/ratelimited.png"] == 2
    retry_times = [t for p, t, *_ in server.hits if p == "/ratelimited.png"]
    assert retry_times[1] - retry_times[0] >= 7.0  # Retry-After honoured

    # robots: the disallowed path never requested, redirect loop stopped at max_redirects
    assert "/private/secret.png" not in server.paths()
    assert server.counts["/redirect-loop"] == crawler.config.max_redirects + 1

    # politeness: every gap between requests to the host is at least the robots Crawl-delay
    times = server.times()
    assert all(b - a >= CRAWL_DELAY - 1e-9 for a, b in zip(times, times[1:], strict=False))
    assert all(hit[3] == crawler.config.user_agent for hit in server.hits)

    # the guard refused private redirect targets before any connection
    assert NON_LOOPBACK_CONNECTS == []
    assert all(urlsplit(url).hostname == "127.0.0.1" for url in session.sent)


def test_backoff_is_exponential(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    server = serve("404")  # no Crawl-delay, so the backoff alone sets the gaps
    crawler, _, _ = make_crawler(clock, min_host_interval_s=0.01)
    assert crawler.fetch(server.base + "/flaky.png").decision == "ok"
    times = [t for p, t, *_ in server.hits if p == "/flaky.png"]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= BACKOFF and gaps[1] >= 2 * BACKOFF
    assert BACKOFF in clock.sleeps and 2 * BACKOFF in clock.sleeps


def test_min_interval_applies_without_crawl_delay(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    server = serve("404")
    crawler, _, _ = make_crawler(clock, min_host_interval_s=1.5)
    for _ in range(3):
        assert crawler.fetch(server.base + "/img.png").decision == "ok"
    times = server.times()  # robots.txt + 3 images
    assert len(times) == 4
    assert all(b - a >= 1.5 - 1e-9 for a, b in zip(times, times[1:], strict=False))


# ---------------------------------------------------------------------------------------------------- robots.txt


def test_robots_500_disallows_the_whole_host(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    server = serve("500")
    crawler, log, _ = make_crawler(clock)
    urls = [server.base + "/img.png", server.base + "/img.jpg"]
    assert [crawler.fetch(u).decision for u in urls] == ["disallowed_by_robots"] * 2
    assert set(server.paths()) == {"/robots.txt"}  # retried, then nothing else on that host
    assert server.counts["/robots.txt"] == RETRIES + 1
    (line,) = robots_lines(log)
    assert line["status"] == 500 and "disallow all" in line["detail"]
    assert len(fetch_lines(log)) == 2


def test_robots_404_allows_everything(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    rules, missing = serve("rules"), serve("404")  # same address, different ports: separate robots origins
    crawler, log, _ = make_crawler(clock)
    assert crawler.fetch(missing.base + "/private/secret.png").decision == "ok"
    assert crawler.fetch(rules.base + "/private/secret.png").decision == "disallowed_by_robots"
    assert crawler.fetch(missing.base + "/img.png").decision == "ok"
    assert missing.counts["/robots.txt"] == 1 and rules.counts["/robots.txt"] == 1
    assert [line["status"] for line in robots_lines(log)] == [404, 200]


def test_unreachable_robots_disallows(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    probe = _REAL_SOCKET(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connection refused
    crawler, log, _ = make_crawler(clock)
    result = crawler.fetch(f"http://127.0.0.1:{port}/img.png")
    assert result.decision == "disallowed_by_robots"
    (line,) = robots_lines(log)
    assert line["status"] is None and "network_error" in line["detail"]


def test_robots_redirect_to_private_address_is_refused(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    server = serve("redirect_private")
    crawler, log, session = make_crawler(clock)
    assert crawler.fetch(server.base + "/img.png").decision == "disallowed_by_robots"
    (line,) = robots_lines(log)
    assert "blocked_address" in line["detail"] and line["final_url"] == "http://10.0.0.1/robots.txt"
    assert server.paths() == ["/robots.txt"]
    assert NON_LOOPBACK_CONNECTS == [] and all("10.0.0.1" not in url for url in session.sent)


def test_excessive_crawl_delay_disallows(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    server = serve("slow")
    crawler, _, _ = make_crawler(clock)
    assert crawler.fetch(server.base + "/img.png").decision == "disallowed_by_robots"
    assert server.paths() == ["/robots.txt"]


def test_robots_cache_expires(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    server = serve("404")
    crawler, _, _ = make_crawler(clock, robots_cache_s=100, min_host_interval_s=0)
    crawler.fetch(server.base + "/img.png")
    crawler.fetch(server.base + "/img.jpg")
    assert server.counts["/robots.txt"] == 1
    clock.now += 101
    crawler.fetch(server.base + "/img.png")
    assert server.counts["/robots.txt"] == 2


# ---------------------------------------------------------------------------------------------- address guard

REFUSED_LITERALS = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "[::1]",
                    "[::ffff:10.0.0.1]", "[fc00::1]", "0.0.0.0", "224.0.0.1", "100.64.0.1", "[fe80::1]",
                    "[fd00:ec2::254]", "[64:ff9b::a00:1]", "[2002:a00:1::]", "255.255.255.255"]


@pytest.mark.parametrize("host", REFUSED_LITERALS)
def test_guard_refuses_internal_literals(host: str) -> None:
    with pytest.raises(CrawlRefusal) as info:
        check_url(f"http://{host}/x.png", CrawlConfig())
    assert info.value.decision == "blocked_address"
    assert NON_LOOPBACK_CONNECTS == []


@pytest.mark.parametrize("host", ["93.184.216.34", "[2606:4700:4700::1111]", "8.8.8.8"])
def test_guard_accepts_public_literals_without_connecting(host: str) -> None:
    scheme, name, port = check_url(f"https://{host}/x.png", CrawlConfig())
    assert (scheme, name.strip("[]"), port) == ("https", host.strip("[]"), 443)
    assert NON_LOOPBACK_CONNECTS == []


def test_guard_flags() -> None:
    assert address_refusal("127.0.0.1") is not None
    assert address_refusal("127.0.0.1", allow_loopback=True) is None
    assert address_refusal("::ffff:127.0.0.1", allow_loopback=True) is None
    assert address_refusal("10.0.0.1", allow_private=True) is None
    assert address_refusal("10.0.0.1", allow_loopback=True) is not None
    # metadata, link-local and friends stay refused whatever the flags say
    for address in ("169.254.169.254", "fd00:ec2::254", "169.254.1.1", "::ffff:169.254.169.254", "0.0.0.0"):
        assert address_refusal(address, allow_loopback=True, allow_private=True) is not None, address
    assert address_refusal("not-an-ip") is not None


def test_allowed_hosts_bypass_only_loopback_and_private(clock: FakeClock) -> None:
    config = CrawlConfig(allowed_hosts=["mirror.internal", "meta.internal"])
    FAKE_DNS["mirror.internal"] = lambda: "10.0.0.7"
    FAKE_DNS["meta.internal"] = lambda: "169.254.169.254"
    FAKE_DNS["other.internal"] = lambda: "10.0.0.8"
    assert check_url("http://Mirror.Internal./x.png", config)[1] == "mirror.internal"
    for host in ("meta.internal", "other.internal"):
        with pytest.raises(CrawlRefusal) as info:
            check_url(f"http://{host}/x.png", config)
        assert info.value.decision == "blocked_address"


BAD_URLS = ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://127.0.0.1:70/_GET", "javascript:alert(1)",
            "http://user:pass@127.0.0.1/x.png", "http://127.0.0.1:80@10.0.0.1/x.png", "", "http:///x.png",
            "http://exa mple.com/x.png", "http://127.0.0.1\\@10.0.0.1/x.png", "http://127.0.0.1:99999/x.png",
            "/relative/x.png"]


def test_bad_urls_are_refused_and_logged(clock: FakeClock) -> None:
    crawler, log, session = make_crawler(clock, allowed_hosts=[], allow_loopback=True)
    results = [crawler.fetch(url) for url in BAD_URLS]
    assert [r.decision for r in results] == ["bad_scheme"] * len(BAD_URLS)
    assert [line["url"] for line in log.records] == BAD_URLS
    assert session.sent == [] and NON_LOOPBACK_CONNECTS == []


def test_unresolvable_name_is_a_network_error(clock: FakeClock) -> None:
    crawler, log, session = make_crawler(clock)
    result = crawler.fetch("http://no-such-host.invalid/x.png")
    assert result.decision == "network_error" and "cannot resolve" in result.detail
    assert len(log.records) == 1 and session.sent == []


def test_private_literal_url_is_blocked_before_robots(clock: FakeClock) -> None:
    crawler, log, session = make_crawler(clock)
    for url in ("http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/", "http://[::ffff:10.0.0.1]/"):
        assert crawler.fetch(url).decision == "blocked_address"
    assert [line["decision"] for line in log.records] == ["blocked_address"] * 3  # no robots.txt attempt either
    assert session.sent == [] and NON_LOOPBACK_CONNECTS == []


def test_connect_time_guard_catches_rebinding(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    """A name that resolves public at check time and to loopback at connect time never gets a connection."""
    server = serve("404")
    port = server.server_address[1]
    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1"])
    FAKE_DNS["rebind.test"] = lambda: next(answers)
    config = CrawlConfig()  # loopback not allowed
    assert check_url(f"http://rebind.test:{port}/img.png", config)[1] == "rebind.test"  # first answer: public
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", GuardedAdapter(config))
    with pytest.raises(requests.ConnectionError) as info:
        session.get(f"http://rebind.test:{port}/img.png", timeout=5)
    refusal = _guard_refusal_in(info.value)
    assert refusal is not None and refusal.decision == "blocked_address"
    assert server.hits == [] and NON_LOOPBACK_CONNECTS == []


def test_connect_time_guard_pins_the_checked_address(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    """Named hosts are dialled at the vetted address while Host still carries the name."""
    server = serve("404")
    port = server.server_address[1]
    FAKE_DNS["mirror.test"] = lambda: "127.0.0.1"
    crawler, _, _ = make_crawler(clock, allowed_hosts=["mirror.test"])
    result = crawler.fetch(f"http://mirror.test:{port}/img.png")
    assert result.decision == "ok"
    assert {hit[2] for hit in server.hits} == {f"mirror.test:{port}"}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_guarded_adapter_covers_both_schemes(scheme: str) -> None:
    session = requests.Session()
    session.trust_env = False
    adapter = GuardedAdapter(CrawlConfig())
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    with pytest.raises(requests.ConnectionError) as info:
        session.get(f"{scheme}://127.0.0.1:9/x.png", timeout=5)
    refusal = _guard_refusal_in(info.value)
    assert refusal is not None and refusal.decision == "blocked_address"


def test_loopback_refused_by_default(serve: Callable[[str], _Server], clock: FakeClock) -> None:
    server = serve("404")
    crawler, log, session = make_crawler(clock, allowed_hosts=[])
    assert crawler.fetch(server.base + "/img.png").decision == "blocked_address"
    assert server.hits == [] and session.sent == []


# --------------------------------------------------------------------------------------------------- opt-outs


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["noai"], "noai"),
        (["NoIndex"], "noindex"),
        (["none"], "none"),
        (["nofollow, noimageindex"], "noimageindex"),
        (["otherbot: noindex"], None),
        (["otherbot: noindex, noai"], None),  # directives after a prefix belong to that agent
        (["otherbot: noindex", "noimageai"], "noimageai"),
        (["ogclip-crawler: noai"], "ogclip-crawler: noai"),
        (["OGCLIP-CRAWLER:noindex"], "ogclip-crawler: noindex"),
        (["otherbot: noindex, ogclip-crawler: none"], "ogclip-crawler: none"),
        (["unavailable_after: Wednesday, 03-Nov-2027 15:00:00 PST, noai"], "noai"),
        (["max-image-preview: large, nosnippet"], None),
        (["all"], None),
        ([], None),
    ],
)
def test_robots_tag_parsing(values: list[str], expected: str | None) -> None:
    assert robots_tag_opt_out(values, CrawlConfig().robots_token) == expected


# ----------------------------------------------------------------------------------------------- config and log


def test_config_validation() -> None:
    assert CrawlConfig().robots_cache_s == 86_400
    assert CrawlConfig().robots_token == "ogclip-crawler"
    with pytest.raises(ValidationError):
        CrawlConfig(robots_cache_s=86_401)
    with pytest.raises(ValidationError):
        CrawlConfig(user_agnet="typo")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        CrawlConfig(max_bytes=0)
    config = CrawlConfig(allowed_content_types=[" Image/PNG "], allowed_hosts=["Mirror.Example."])
    assert config.allowed_content_types == ["image/png"] and config.allowed_hosts == ["mirror.example"]


def test_crawl_manifest_writes_json_lines(serve: Callable[[str], _Server], tmp_path: Path) -> None:
    server = serve("404")  # no Crawl-delay: this run uses the real clock and must not wait
    config = make_config(min_host_interval_s=0.0, robots_cache_s=60)
    urls = [server.base + "/img.png", server.base + "/private/secret.png", "file:///etc/passwd",
            server.base + "/page.html"]
    log_path = tmp_path / "logs" / "fetch.jsonl"
    results = list(crawl_manifest(urls, config, log_path))
    assert [r.decision for r in results] == ["ok", "ok", "bad_scheme", "bad_content_type"]
    lines = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()]
    assert [line["decision"] for line in lines] == ["robots_fetch", "ok", "ok", "bad_scheme", "bad_content_type"]
    assert lines[1]["bytes"] == len(PNG) and lines[1]["status"] == 200
    # appending: a second run adds lines instead of replacing them
    list(crawl_manifest(urls[:1], config, log_path))
    assert len(log_path.read_text(encoding="utf-8").splitlines()) == len(lines) + 2


def test_fetch_never_raises_on_library_surprises(clock: FakeClock, serve: Callable[[str], _Server],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve("404")
    crawler, log, _ = make_crawler(clock)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("surprise")

    monkeypatch.setattr(crawler, "_accept", boom)
    result = crawler.fetch(server.base + "/img.png")
    assert result.decision == "network_error" and "surprise" in result.detail
    assert fetch_lines(log)[-1]["detail"] == result.detail
