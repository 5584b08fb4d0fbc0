"""A small HTTP server for tests: serves a directory on 127.0.0.1 with Range, HEAD and byte counting.

    with RangeServer(root) as server:
        server.url            # http://127.0.0.1:PORT
        server.bytes_served   # body bytes sent so far
        server.fail["x.safetensors"] = 500   # answer this path with an error status
        server.stall.add("x.safetensors")    # accept requests for this path and never answer them

Bounded: it answers at most `max_requests` requests and stops by itself after `lifetime` seconds.
"""

from __future__ import annotations

import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else keep-alive responses stall on delayed ACKs (~40 ms each)
    server: "RangeServer"

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        srv = self.server
        with srv.lock:
            srv.requests.append((self.command, self.path, self.headers.get("Range")))
            over = len(srv.requests) > srv.max_requests
        name = unquote(urlsplit(self.path).path).lstrip("/")
        path = os.path.realpath(os.path.join(srv.root, name))
        if over:
            return self._status(503)
        if name in srv.fail:
            return self._status(srv.fail[name])
        if name in srv.stall:  # a server that hangs: hold the connection until the server stops
            srv.stopping.wait(srv.lifetime)
            return
        if not path.startswith(srv.root + os.sep) or not os.path.isfile(path):
            return self._status(404)
        size = os.path.getsize(path)
        start, end, code = 0, size, 200  # [start, end)
        spec = self.headers.get("Range")
        if spec:
            m = RANGE_RE.match(spec.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._status(416, size)
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:  # suffix: the last n bytes
                start = max(0, size - int(m.group(2)))
            if start >= size or start >= end:
                return self._status(416, size)
            code = 206
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not body:
            return
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        with srv.lock:  # counted before sending: a client that has the bytes sees them counted
            srv.bytes_served += len(data)
            srv.bytes_by_path[name] = srv.bytes_by_path.get(name, 0) + len(data)
        self.wfile.write(data)

    def _status(self, code: int, size: int | None = None):
        self.send_response(code)
        if size is not None:
            self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", "0")
        self.end_headers()


class RangeServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, root, max_requests: int = 20_000, lifetime: float = 120.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = os.path.realpath(os.fspath(root))
        self.max_requests, self.lifetime = max_requests, lifetime
        self.lock = threading.Lock()
        self.fail: dict[str, int] = {}
        self.stall: set[str] = set()
        self.stopping = threading.Event()
        self.reset_counts()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.shutdown)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset_counts(self):
        with self.lock:
            self.requests: list[tuple[str, str, str | None]] = []
            self.bytes_served = 0
            self.bytes_by_path: dict[str, int] = {}

    def __enter__(self):
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self._timer.cancel()
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 (the kernel completes the handshake) and never answers.

        with SilentServer() as url: ...   # http://127.0.0.1:PORT
    """

    def __enter__(self) -> str:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self._sock.close()
