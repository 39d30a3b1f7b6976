"""Several networks and vNICs end to end: ``vnic serve`` with its agent, driven by the CLI
with ``--server``, real traffic. A VM with two vNICs on two networks of its session
carries a TCP flow on each at once, each at its own profile's rate; ``vm set a/eth1``
changes eth1 live under a running flow (one connection, the rate follows; eth0 keeps
its rate); the agent's ``/metrics`` report each vNIC under its ``nic`` label; a VM on
the second network only cannot reach one on ``default`` only; removing a network in
use is refused, naming the vNICs; and ``session down`` leaves nothing."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Client, Server, admin_token
from tests.e2e.test_cli_remote import cli
from tests.netns.conftest import leftovers
from vnic.dataplane.tc import read_class_counters
from vnic.drivers.netns import NetnsDriver
from vnic.lab.measure import TCP_GOODPUT, Throughput, iperf3, ping
from vnic.plan import names


def ratio(t: Throughput, rate: float) -> float:
    return t.bits_per_second / TCP_GOODPUT / rate


def test_two_vnics_through_the_server(home: Path, session_name: str) -> None:
    s = session_name
    server = Server(home, "serve", "--latency-interval", "600", "--drift-interval", "600")
    token = admin_token(home)
    server.start()
    admin = Client(server.url, token)

    def remote(*args: str) -> subprocess.CompletedProcess[str]:
        r = cli(home, *args, server=server, token=token)
        assert r.returncode == 0, (args, r.stderr)
        return r

    try:
        for name, rate in (("p20", "20Mbit"), ("p40", "40Mbit"), ("wide", "1Gbit")):
            admin("POST", "/v1/profiles", 201, json={
                "name": name, "egress": {"rate": rate}, "ingress": {"rate": rate},
            })  # fmt: skip
        remote("session", "create", s, "-p", "p20")
        remote("session", "network", "add", s, "data", "--profile", "p40")
        nets = json.loads(remote("session", "network", "list", s, "--json").stdout)
        assert [n["name"] for n in nets] == ["default", "data"]
        remote("vm", "launch", s, "a", "--nic", "net=default", "--nic", "net=data")
        wide = "--nic", "net=default,profile=wide", "--nic", "net=data,profile=wide"
        remote("vm", "launch", s, "peer", *wide)
        remote("vm", "launch", s, "only-data", "--nic", "net=data")
        remote("vm", "launch", s, "only-default")
        vms = {v["name"]: v for v in admin("GET", f"/v1/sessions/{s}/vms")}
        a = {n["name"]: n for n in vms["a"]["nics"]}
        peer = {n["network"]: n["ipv4"] for n in vms["peer"]["nics"]}
        assert (a["eth0"]["network"], a["eth1"]["network"]) == ("default", "data")
        assert a["eth0"]["mac"] != a["eth1"]["mac"]

        # Both vNICs loaded at once, each both ways at its own profile's rate.
        for reverse in (False, True):
            with ThreadPoolExecutor(2) as pool:
                flows = {
                    nic: pool.submit(
                        iperf3, s, "a", "peer", peer[a[nic]["network"]],
                        seconds=3, reverse=reverse, port=5201 + i,
                    )
                    for i, nic in enumerate(("eth0", "eth1"))
                }  # fmt: skip
                got = {nic: f.result() for nic, f in flows.items()}
            assert 0.93 <= ratio(got["eth0"], 20e6) <= 1.03, (reverse, got)
            assert 0.93 <= ratio(got["eth1"], 40e6) <= 1.03, (reverse, got)

        # eth1 changed live under a flow on eth1: one connection, the rate follows.
        result: dict[str, Any] = {}
        flow = threading.Thread(
            target=lambda: result.update(
                t=iperf3(s, "a", "peer", peer["data"], seconds=6, omit=0, interval=1)
            )
        )
        flow.start()
        try:
            # Change once eth1 has carried about two seconds of the flow at 40 Mbit/s.
            assert sent_on(s, "a.eth1", at_least=10_000_000, seconds=30)
            changed = remote("vm", "set", s, "a/eth1", "egress.rate=10Mbit", "--json")
        finally:
            flow.join(timeout=40)
        assert "t" in result, "the flow did not finish"
        steps = result["t"].intervals
        assert len(steps) == 6, steps
        assert 30e6 < sum(steps[:2]) / 2 and sum(steps[-2:]) / 2 < 12e6, steps
        assert "eth1" in changed.stdout
        eth0 = iperf3(s, "a", "peer", peer["default"], seconds=2)
        assert 0.93 <= ratio(eth0, 20e6) <= 1.03, eth0

        # The agent's metrics, a series per vNIC.
        text = admin.http.get("/metrics").text
        for nic in ("eth0", "eth1"):
            assert (
                f'vnic_bytes_total{{session="{s}",vm="a",nic="{nic}",direction="egress"}}' in text
            )

        # Networks are apart: the data-only VM cannot reach the default-only one.
        only_default = vms["only-default"]["ipv4"]
        assert ping(s, "only-data", only_default, count=2, timeout=0.5) == []
        assert ping(s, "a", only_default, count=2, timeout=1)

        r = cli(home, "session", "network", "remove", s, "data", server=server, token=token)
        assert r.returncode != 0 and f"{s}/a/eth1" in r.stderr, r.stderr
    finally:
        try:
            admin.http.post(f"/v1/sessions/{s}/down")
        finally:
            server.kill()
            NetnsDriver().teardown_session(s)
    assert leftovers(s) == []


def sent_on(session: str, unit: str, *, at_least: int, seconds: float) -> bool:
    """Whether the vNIC ``unit``'s egress (its IFB's classes) passes ``at_least`` more bytes
    within ``seconds``, read from the kernel every 0.1 s."""
    ifb = names.VmLinks.of(unit).ifb

    def sent() -> int:
        counters = read_class_counters(names.session_netns(session))
        return sum(c.bytes for (dev, _minor), c in counters.items() if dev == ifb)

    start, deadline = sent(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sent() - start >= at_least:
            return True
        time.sleep(0.1)
    return False
