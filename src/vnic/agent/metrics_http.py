"""A read-only HTTP server of ``GET /metrics`` and ``GET /stats?session=S``: how Prometheus
scrapes an agent that follows a manager (``vnic agent --manager ... --metrics-listen
HOST:PORT``), which serves no control API, and how its manager reads a session's
per-vNIC stats on this host (``vnic top``, the live view, the controller).

Nothing else is answered (404 for another path, 501 for another method), and nothing is
authenticated: the stats are the exposition's numbers as JSON (docs/metrics.md). Every
connection is a thread, dropped after :data:`TIMEOUT` seconds of silence, so a client
that holds a socket open holds no more than that.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Seconds a connection may stay silent before it is dropped.
TIMEOUT = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SESSION = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


class MetricsServer(ThreadingHTTPServer):
    """Serves ``text()`` at ``GET /metrics`` on ``(host, port)`` (port 0: any free one,
    see :attr:`port`) from :meth:`start` until :meth:`close`."""

    daemon_threads = True

    def __init__(
        self,
        text: Callable[[], str],
        host: str,
        port: int,
        stats: Callable[[str], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.text = text
        self.stats = stats
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
        path, _, query = self.path.partition("?")
        if path == "/stats" and self.server.stats is not None:
            session = urllib.parse.parse_qs(query).get("session", [""])[0]
            if not SESSION.fullmatch(session):
                self._send(400, "stats needs ?session=NAME\n", "text/plain; charset=utf-8")
                return
            try:
                body = json.dumps(self.server.stats(session))
            except Exception as exc:  # this read's failure, not the server's
                self._send(500, f"reading the stats failed: {exc}\n", "text/plain; charset=utf-8")
                return
            self._send(200, body, "application/json")
            return
        if path != "/metrics":
            self._send(
                404, "only /metrics and /stats are served here\n", "text/plain; charset=utf-8"
            )
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
