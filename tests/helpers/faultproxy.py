"""A fault-injecting HTTP proxy for tests: put it in front of the real S3 server (SeaweedFS) and it
forwards every request unchanged (the Host header too, so SigV4 signatures still verify), but can
cut response bodies: the status line and headers (with the full Content-Length) go out, then half
the body, then the connection closes - what a dropped connection mid-download looks like to a
client. Loopback only; one thread per connection; stopped by the context manager.

    with FaultProxy(upstream) as proxy:
        proxy.cut_bodies(lambda method, path: method == "GET" and "/aliases/" in path, times=2)
        ... S3Settings(endpoint_url=proxy.url, ...) ...
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self._lock = threading.Lock()
        self._rule: Callable[[str, str], bool] | None = None
        self._times = 0
        self.cut: list[str] = []  # "METHOD path" of every response this proxy cut

    def cut_bodies(self, rule: Callable[[str, str], bool], times: int) -> None:
        """Cut the bodies of the next `times` responses whose (method, path) match `rule` (-1: all)."""
        with self._lock:
            self._rule, self._times = rule, times

    def _should_cut(self, method: str, path: str) -> bool:
        with self._lock:
            if self._rule is None or self._times == 0 or not self._rule(method, path):
                return False
            self._times -= 1
            self.cut.append(f"{method} {path}")
            return True

    def __enter__(self) -> "FaultProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = upstream.getresponse()
                    data = resp.read()
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
                finally:
                    upstream.close()
                cut = self.command != "HEAD" and len(data) > 1 and proxy._should_cut(self.command, self.path)
                self.send_response(resp.status, resp.reason)
                for k, v in out:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                if cut:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    return
                if cut:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
