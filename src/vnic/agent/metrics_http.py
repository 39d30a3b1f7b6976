"""A read-only HTTP server of ``GET /metrics`` alone: how Prometheus scrapes an agent that
follows a manager (``vnic agent --manager ... --metrics-listen HOST:PORT``), which serves
no control API.

Nothing else is answered (404 for another path, 501 for another method), so there is
nothing to authenticate: the exposition (docs/metrics.md) is all it gives. Every
connection is a thread, dropped after :data:`TIMEOUT` seconds of silence, so a client
that holds a socket open holds no more than that.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: Seconds a connection may stay silent before it is dropped.
TIMEOUT = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsServer(ThreadingHTTPServer):
    """Serves ``text()`` at ``GET /metrics`` on ``(host, port)`` (port 0: any free one,
    see :attr:`port`) from :meth:`start` until :meth:`close`."""

    daemon_threads = True

    def __init__(self, text: Callable[[], str], host: str, port: int) -> None:
        self.text = text
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> MetricsServer:
        threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="vnic-metrics",
            daemon=True,
        ).start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    timeout = TIMEOUT
    server_version = "vnic-agent"

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every few seconds is not worth a log line

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, "only /metrics is served here\n", "text/plain; charset=utf-8")
            return
        try:
            body = self.server.text()
        except Exception as exc:  # a failed read of the counters is this scrape's, not the server's
            self._send(500, f"reading the metrics failed: {exc}\n", "text/plain; charset=utf-8")
            return
        self._send(200, body, CONTENT_TYPE)

    def _send(self, status: int, text: str, kind: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
