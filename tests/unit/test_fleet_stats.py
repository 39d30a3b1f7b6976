"""The manager's agent with the other hosts' stats: the own agent's entries, then each
host's from its agent's read-only ``/stats`` (a real HTTP server per host); a host that
answers badly, too much or not at all adds nothing and holds nobody up."""

from __future__ import annotations

import http.server
import threading
from typing import Any

import httpx

from vnic.agent.fleet import MAX_BYTES, FleetAgent
from vnic.agent.metrics_http import MetricsServer


class Local:
    """What FleetAgent asks of the own agent here: stats, and one delegated call."""

    kind = "netns"

    def stats(self, session: str) -> list[dict[str, Any]]:
        return [{"vm": "local", "session": session}]

    def running(self, session: str) -> list[str]:
        return ["local"]


def _host(vms: list[str]) -> MetricsServer:
    def stats(session: str) -> list[dict[str, Any]]:
        return [{"vm": v, "session": session} for v in vms]

    return MetricsServer(lambda: "", "127.0.0.1", 0, stats=stats).start()


class _Huge(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"[" + b'{"vm": "x"},' * (MAX_BYTES // 10) + b"{}]")


def test_stats_come_from_every_host_of_the_session() -> None:
    h1, h2 = _host(["a"]), _host(["b", "c"])
    huge = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Huge)
    threading.Thread(target=huge.serve_forever, daemon=True).start()
    try:
        urls = [f"http://127.0.0.1:{h.port}/stats" for h in (h1, h2)]
        bad = [f"http://127.0.0.1:{huge.server_address[1]}/stats", "http://127.0.0.1:9/stats"]
        fleet = FleetAgent(Local(), lambda s: urls + bad)  # type: ignore[arg-type]
        got = fleet.stats("lab")
        assert sorted(e["vm"] for e in got) == ["a", "b", "c", "local"]
        assert {e["session"] for e in got} == {"lab"}
        assert fleet.running("lab") == ["local"]  # the rest is the own agent's
        # The stats endpoint refuses a session that is not a name, and other paths.
        base = f"http://127.0.0.1:{h1.port}"
        assert httpx.get(f"{base}/stats?session=../x", timeout=5).status_code == 400
        assert httpx.get(f"{base}/stats", timeout=5).status_code == 400
        assert httpx.get(f"{base}/other", timeout=5).status_code == 404
    finally:
        for h in (h1, h2):
            h.close()
        huge.shutdown()
        huge.server_close()


def test_metrics_only_server_has_no_stats() -> None:
    server = MetricsServer(lambda: "", "127.0.0.1", 0).start()
    try:
        got = httpx.get(f"http://127.0.0.1:{server.port}/stats?session=lab", timeout=5)
        assert got.status_code == 404
    finally:
        server.close()
