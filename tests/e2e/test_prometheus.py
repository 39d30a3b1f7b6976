"""Prometheus scrapes the manager's /metrics (with a reader token) while iperf3 runs
inside a session; the rate Prometheus computes matches the profile."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import Client, Server, admin_token, free_port, prometheus_binary
from vnic.drivers.netns import NetnsDriver
from vnic.lab import measure

RATE = 20_000_000  # bit/s, both ways


def start_prometheus(
    work: Path, target: str, token_file: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = work / "prometheus.yml"
    config.write_text(
        f"""
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: vnic
    metrics_path: /metrics
    authorization:
      credentials_file: {token_file}
    static_configs:
      - targets: ["{target}"]
"""
    )
    proc = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "prometheus.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError((work / "prometheus.log").read_text())


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    result: list[dict[str, Any]] = r.json()["data"]["result"]
    return result


def test_prometheus_sees_the_profile_rate_under_real_traffic(home: Path, session_name: str) -> None:
    server = Server(home, "serve", "--latency-interval", "2", "--drift-interval", "2")
    token = admin_token(home)
    server.start()
    admin = Client(server.url, token)
    prom = None
    try:
        reader = admin("POST", "/v1/tokens", 201, json={"name": "prom", "role": "reader"})
        token_file = home / "reader.token"
        token_file.write_text(reader["secret"])
        profile = {"name": "p20", "egress": {"rate": "20Mbit"}, "ingress": {"rate": "20Mbit"}}
        admin("POST", "/v1/profiles", 201, json=profile)
        admin("POST", "/v1/sessions", 201, json={"name": session_name, "default_profile": "p20"})
        vms = {}
        for vm in ("a", "b"):
            e = admin(
                "POST", f"/v1/sessions/{session_name}/vms", 201, json={"name": vm, "launch": True}
            )
            vms[vm] = e["vm"]["ipv4"]
        prom, prom_url = start_prometheus(home, f"127.0.0.1:{server.port}", token_file)

        result: dict[str, Any] = {}
        flow = threading.Thread(
            target=lambda: result.update(
                t=measure.iperf3(session_name, "a", "b", vms["b"], seconds=14, omit=1)
            )
        )
        flow.start()
        time.sleep(10)  # slow start is over and Prometheus has several scrapes of the flow
        window = 'vm="a",direction="egress"'
        by_prom = query(prom_url, f"rate(vnic_bytes_total{{{window}}}[5s]) * 8")
        by_agent = query(prom_url, f"vnic_rate_bits_per_second{{{window}}}")
        configured = query(prom_url, f"vnic_profile_rate_bits_per_second{{{window}}}")
        revision = query(prom_url, 'vnic_profile_revision{vm="a",profile="p20"}')
        flow.join(timeout=30)

        assert len(by_prom) == 1, by_prom
        prom_rate = float(by_prom[0]["value"][1])
        assert abs(prom_rate - RATE) / RATE < 0.05, prom_rate
        assert abs(float(by_agent[0]["value"][1]) - RATE) / RATE < 0.05, by_agent
        assert float(configured[0]["value"][1]) == RATE
        assert float(revision[0]["value"][1]) == 1
        assert abs(result["t"].bits_per_second - RATE) / RATE < 0.05, result["t"]
        latency = query(prom_url, "vnic_latency_seconds")
        assert {s["metric"]["vm"] for s in latency} == {"a", "b"}
        assert {s["metric"]["nic"] for s in latency} == {"eth0"}  # VMs of one vNIC
        assert all(0 < float(s["value"][1]) < 0.1 for s in latency), latency
    finally:
        if prom is not None:
            prom.kill()
            prom.wait(timeout=30)
        try:
            admin("DELETE", f"/v1/sessions/{session_name}", 204, params={"force": True})
        finally:
            server.kill()
            NetnsDriver().teardown_session(session_name)
