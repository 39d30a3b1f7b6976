"""The read-only metrics server of a following agent: ``GET /metrics`` and nothing else."""

from __future__ import annotations

import httpx

from vnic.agent.metrics_http import CONTENT_TYPE, MetricsServer


def test_only_get_metrics_is_served() -> None:
    calls: list[int] = []

    def text() -> str:
        calls.append(1)
        if len(calls) > 1:
            raise OSError("netlink socket closed")
        return "vnic_up 1\n"

    server = MetricsServer(text, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        got = httpx.get(f"{url}/metrics", timeout=10)
        assert (got.status_code, got.text, got.headers["content-type"]) == (
            200,
            "vnic_up 1\n",
            CONTENT_TYPE,
        )
        assert httpx.get(f"{url}/v1/vms", timeout=10).status_code == 404
        assert httpx.post(f"{url}/metrics", timeout=10).status_code == 501
        assert len(calls) == 1  # neither of those read the counters
        failed = httpx.get(f"{url}/metrics", timeout=10)
        assert failed.status_code == 500 and "netlink socket closed" in failed.text
    finally:
        server.close()
