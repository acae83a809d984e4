"""Loopback fault injection for S3 tests: a tiny threaded HTTP proxy in front of the moto server.

``FaultProxy(upstream)`` listens on 127.0.0.1 (a free port) and forwards every request to ``upstream`` (the
moto server of the ``moto_s3`` fixture), except the requests that match a configured :class:`Fault`:

- ``status``: answer with an S3 XML error (default ``503 SlowDown``; ``500 InternalError``, ``429``, ...);
- ``delay``: wait ``delay_s`` seconds, then forward (slow responses);
- ``drop``: read the request, then close the connection without answering (a dropped connection);
- ``truncate``: forward, then send the headers and only half of the body before closing (a cut-off read).

A fault matches on the HTTP method and a regex over the request path + query, lets the first ``skip``
matching requests through, then fires ``times`` times (``None``: forever). ``proxy.requests`` records
every request as ``(method, path, action)`` so a test can assert what was retried.

Usage::

    with FaultProxy(moto_s3["endpoint_url"]) as proxy:
        proxy.add("status", method="GET", times=2)      # two 503 SlowDown on reads, then normal
        opts = s3_options(proxy.endpoint_url)
        read_bytes("s3://bucket/key", opts)

Only loopback addresses are used; nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Fault", "FaultProxy", "s3_options"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}

_S3_ERROR_CODES = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "Bad gateway."),
    503: ("SlowDown", "Please reduce your request rate."),
    504: ("GatewayTimeout", "Gateway timeout."),
    429: ("TooManyRequests", "Too many requests."),
    403: ("AccessDenied", "Access Denied"),
}


@dataclasses.dataclass
class Fault:
    """One fault rule (see the module docstring)."""

    kind: str  # "status" | "delay" | "drop" | "truncate"
    method: str | None = None
    path_regex: str | None = None
    times: int | None = 1
    skip: int = 0
    status: int = 503
    code: str | None = None
    delay_s: float = 0.0
    seen: int = 0  # matching requests so far
    fired: int = 0  # faults injected so far

    def __post_init__(self) -> None:
        if self.kind not in ("status", "delay", "drop", "truncate"):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        self._re = re.compile(self.path_regex) if self.path_regex else None

    def matches(self, method: str, path: str) -> bool:
        if self.method and method.upper() != self.method.upper():
            return False
        return not (self._re is not None and not self._re.search(urllib.parse.unquote(path)))

    def take(self) -> bool:
        """Count a matching request; True when this one gets the fault."""
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


def s3_options(endpoint_url: str, *, read_timeout: float | None = None, **config_kwargs) -> dict:
    """fsspec storage options for the proxy, built by the project's own :func:`storage_options_for`."""
    from types import SimpleNamespace

    from constellation_assets.io.uri import storage_options_for

    opts = storage_options_for(
        "s3://x", SimpleNamespace(endpoint_url=endpoint_url, region="us-east-1", anon=False)
    )
    if read_timeout is not None:
        opts["config_kwargs"]["read_timeout"] = read_timeout
    opts["config_kwargs"].update(config_kwargs)
    return opts


class FaultProxy:
    """Threaded HTTP proxy on 127.0.0.1 that injects faults in front of an S3 endpoint."""

    def __init__(self, upstream: str):
        u = urllib.parse.urlsplit(upstream)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"FaultProxy only proxies loopback endpoints, got {upstream}")
        self.upstream_host = u.hostname
        self.upstream_port = u.port or 80
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- configuration ---------------------------------------------------------------------------
    def add(self, kind: str, **kw) -> Fault:
        fault = Fault(kind, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def count(
        self, method: str | None = None, action: str | None = None, path_regex: str | None = None
    ) -> int:
        rx = re.compile(path_regex) if path_regex else None
        with self._lock:
            return sum(
                1
                for m, p, a in self.requests
                if (method is None or m == method)
                and (action is None or a == action)
                and (rx is None or rx.search(urllib.parse.unquote(p)))
            )

    def _decide(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, path) and f.take():
                    self.requests.append((method, path, f.kind))
                    return f
            self.requests.append((method, path, "forward"))
        return None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "proxy not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _error(self, status: int, code: str | None) -> None:
        default_code, message = _S3_ERROR_CODES.get(status, ("InternalError", "Injected fault."))
        code = code or default_code
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{self.path}</Resource><RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", "fault-proxy")
        if self.command == "HEAD":
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, body: bytes, truncate: bool = False) -> None:
        owner = self.owner
        conn = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            self._drop()
            return
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() in _HOP_BY_HOP or k.lower() in ("content-length", "date", "server"):
                continue
            self.send_header(k, v)
        if self.command == "HEAD":
            self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if truncate and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._drop()
            return
        self.wfile.write(data)

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.owner._decide(self.command, self.path)
        if fault is None:
            self._forward(body)
        elif fault.kind == "status":
            self._error(fault.status, fault.code)
        elif fault.kind == "delay":
            time.sleep(fault.delay_s)
            self._forward(body)
        elif fault.kind == "drop":
            self._drop()
        elif fault.kind == "truncate":
            self._forward(body, truncate=True)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
