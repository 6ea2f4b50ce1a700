"""A small threaded HTTP/1.1 server on loopback for the sandbox apps, with fault injection.

Hand-written on the standard library's ThreadingHTTPServer rather than Starlette: fault scenarios need to
close a connection without answering (a dropped connection), hold an answer past the client's timeout and
know nobody read it, and send bytes that are not valid UTF-8; an ASGI server answers 500 where the app
fails instead of dropping the connection, so it cannot play those faults.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit


@dataclass
class Request:
    method: str
    target: str  # path and query as sent
    path: str
    query: dict[str, str]
    headers: list[tuple[str, str]]
    body: bytes
    late: bool = False  # held back by a delay fault, meant to outlast the client's timeout: no one reads the answer

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    mangle: list[tuple[bytes, bytes]] = field(default_factory=list)  # byte replacements in the encoded body


class Drop(Exception):
    """Close the connection without answering (a dropped connection)."""


@dataclass
class Fault:
    """Applied to the next `count` matching requests: an HTTP status, a delay, or a dropped connection."""

    status: int = 0
    delay: float = 0.0
    drop: bool = False
    retry_after: str | None = None
    headers: dict | None = None
    body: Any = None
    mangle: list | None = None  # [[find, replace], ...] in the answer's bytes (latin-1 text): e.g. bytes that are not UTF-8
    path: str = ""  # only requests whose path starts with this
    count: int = 1
    every: int = 1  # apply to every n-th matching request only
    after: int = 0  # let this many matching requests through first
    seen: int = 0


class Faults:
    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.injected = 0

    def add(self, spec: dict) -> None:
        with self._lock:
            self._faults.append(Fault(**{k: v for k, v in spec.items() if k in Fault.__dataclass_fields__}))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if not path.startswith(fault.path or "/") or path.startswith("/_sandbox"):
                    continue
                fault.seen += 1
                if fault.seen <= fault.after or (fault.seen - fault.after) % fault.every:
                    continue
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                self.injected += 1
                return fault
        return None

    def apply(self, request: Request, handle) -> Response:
        fault = self.take(request.path)
        if fault is None:
            return handle(request)
        if fault.delay:
            time.sleep(fault.delay)
            request.late = True
        if fault.drop:
            raise Drop()
        if fault.status:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            headers.update(fault.headers or {})
            return Response(fault.status, fault.body if fault.body is not None else {"error": "injected fault"}, headers)
        response = handle(request)
        response.mangle = [(a.encode("latin-1"), b.encode("latin-1")) for a, b in fault.mangle or []]
        return response


class App:
    """Subclasses answer requests; `/_sandbox/faults` is shared control for fault injection."""

    def __init__(self) -> None:
        self.faults = Faults()
        self.lock = threading.RLock()
        self.in_flight = 0  # requests being answered (a delayed one may outlive the client that sent it)
        self.latency = 0.0  # seconds an API request (not a `/_sandbox/` control) waits before it is answered

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until no request is being answered, so that counts include the late ones."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)

    def dispatch(self, request: Request) -> Response:
        with self.lock:
            self.in_flight += 1
        try:
            if self.latency and not request.path.startswith("/_sandbox/"):
                time.sleep(self.latency)  # outside the lock: requests in flight overlap, as over a network
            return self._dispatch(request)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _dispatch(self, request: Request) -> Response:
        if request.path == "/_sandbox/faults":
            if request.method == "POST":
                body = request.json()
                for spec in body if isinstance(body, list) else [body]:
                    self.faults.add(spec)
            elif request.method == "DELETE":
                self.faults.clear()
            return Response(200, {"injected": self.faults.injected})
        return self.faults.apply(request, self.handle)

    def handle(self, request: Request) -> Response:  # pragma: no cover - overridden
        return Response(404, {"error": "not found"})


def _handler_for(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            request = Request(
                method=self.command,
                target=self.path,
                path=parts.path,
                query=dict(parse_qsl(parts.query, keep_blank_values=True)),
                headers=list(self.headers.items()),
                body=body,
            )
            try:
                response = app.dispatch(request)
            except Drop:
                self.close_connection = True
                self.connection.close()
                return
            payload = b"" if response.body is None else json.dumps(response.body).encode()
            for find, replace in response.mangle:
                payload = payload.replace(find, replace)
            self.send_response(response.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that hung up (a timeout or a dropped connection, often on purpose here) is not an error."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RunningServer:
    """An app served on 127.0.0.1 from a background thread; use as a context manager."""

    def __init__(self, app: App, port: int = 0):
        self.app = app
        self.httpd = _Server(("127.0.0.1", port), _handler_for(app))
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RunningServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
