"""Real QEMU guests (TCG here) next to a netns VM in one session, through `vnic serve`:
the MAC reaches the guest's virtio NIC, the profile shapes the guest both ways, another
session cannot reach it, a live rate change applies, QMP drives its link, metrics count
it, and teardown leaves no process, tap, run directory or namespace."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Client, Server, admin_token
from tests.netns.conftest import guest_leftovers
from vnic.dataplane import namespaces as nsops
from vnic.dataplane import vmexec
from vnic.drivers.qemu import QemuDriver
from vnic.lab import measure
from vnic.lab.measure import TCP_GOODPUT
from vnic.plan import names

EGRESS = 10_000_000  # bit/s the guests send at
INGRESS = 20_000_000  # bit/s the guests receive at
FAST = "1Gbit"  # the netns peer, so the guests' profile is what limits
#: Shaping is exact to a percent or two here; the other guest and CI's neighbours
#: share two cores with the emulated CPUs, hence a little more room.
TOLERANCE = 0.06


def frame_rate(t: measure.Throughput) -> float:
    return t.bits_per_second / TCP_GOODPUT


def within(measured: float, configured: float) -> bool:
    return abs(measured - configured) / configured < TOLERANCE


def launch(admin: Client, session: str, vm: str, driver: str, **extra: Any) -> dict[str, Any]:
    body = {"name": vm, "launch": True, "driver": driver, **extra}
    return dict(admin("POST", f"/v1/sessions/{session}/vms", 201, json=body)["vm"])


def test_guests_and_a_netns_vm_share_a_session(home: Path, session_name: str) -> None:
    s, other = session_name, session_name + "x"
    server = Server(home, "serve", "--latency-interval", "1", "--drift-interval", "2")
    token = admin_token(home)
    server.start()
    admin = Client(server.url, token)
    driver = QemuDriver()
    try:
        guest_profile = {
            "name": "guest",
            "egress": {"rate": "10Mbit"},
            "ingress": {"rate": "20Mbit"},
        }
        admin("POST", "/v1/profiles", 201, json=guest_profile)
        admin(
            "POST",
            "/v1/profiles",
            201,
            json={"name": "fast", "egress": {"rate": FAST}, "ingress": {"rate": FAST}},
        )
        admin("POST", "/v1/sessions", 201, json={"name": s, "default_profile": "guest"})
        admin("POST", "/v1/sessions", 201, json={"name": other, "default_profile": "fast"})

        g1 = launch(admin, s, "g1", "qemu")  # how fast guests launch: vnic bench launch
        g2 = launch(admin, s, "g2", "qemu")
        peer = launch(admin, s, "peer", "netns", profile="fast")
        stranger = launch(admin, other, "x", "netns")

        # The allocated MAC is the guest NIC's: seen by the guest kernel and by QMP.
        for vm, info in (("g1", g1), ("g2", g2)):
            mac = vmexec.run(s, vm, ["cat", "/sys/class/net/eth0/address"], timeout=30)
            assert mac.stdout.strip() == info["mac"]
            assert driver.status(s, vm)["mac"] == info["mac"]
            assert driver.status(s, vm)["status"] == "running"
            kernel = vmexec.run(s, vm, ["uname", "-r"], timeout=30).stdout
            assert "cloud-amd64" in kernel  # a real guest kernel, not the host's
        # The guest's tap is the VM's port in the session namespace, on the bridge.
        links = nsops.run(
            names.session_netns(s),
            ["ip", "-d", "-j", "link", "show"],
            capture_output=True,
            timeout=30,
        )
        assert re.search(
            rf'"ifname":"{names.VmLinks.of("g1").port}".*?"info_kind":"tun"', links.stdout
        )

        # Shaped both ways: guest egress 10 Mbit, ingress 20 Mbit (the peer is not the limit).
        down = measure.iperf3(s, "peer", "g1", g1["ipv4"], seconds=3)
        up = measure.iperf3(s, "peer", "g1", g1["ipv4"], seconds=3, reverse=True)
        assert within(frame_rate(down), INGRESS), frame_rate(down)
        assert within(frame_rate(up), EGRESS), frame_rate(up)
        # Guest to guest: the sender's egress limits.
        g2g = measure.iperf3(s, "g1", "g2", g2["ipv4"], seconds=3)
        assert within(frame_rate(g2g), EGRESS), frame_rate(g2g)

        # Isolation: the other session reaches neither guest, and the guest not it.
        assert measure.ping(other, "x", g1["ipv4"], count=2, timeout=0.5) == []
        assert measure.ping(s, "g1", stranger["ipv4"], count=2, timeout=0.5) == []
        assert measure.ping(s, "g1", peer["ipv4"], count=2, timeout=1.0) != []

        # QMP takes the guest's link down and up again.
        driver.set_link(s, "g2", False)
        assert measure.ping(s, "peer", g2["ipv4"], count=2, timeout=0.5) == []
        driver.set_link(s, "g2", True)
        assert measure.ping(s, "peer", g2["ipv4"], count=3, timeout=1.0) != []

        # A live change of the profile reaches the running guests.
        changed = admin("PATCH", "/v1/profiles/guest", 200, json={"egress": {"rate": "30Mbit"}})
        touched = {c["vm"] for c in changed["changes"] if c["fields"]}
        assert touched == {"g1", "g2"}, changed["changes"]
        up = measure.iperf3(s, "peer", "g1", g1["ipv4"], seconds=3, reverse=True)
        assert within(frame_rate(up), 30_000_000), frame_rate(up)

        # Metrics: the guests' counters and configured rates, next to the netns VM's.
        time.sleep(2.5)  # a latency round (1 s interval) has probed every VM
        text = admin.http.get("/metrics").text
        for vm in ("g1", "g2", "peer"):
            assert (
                f'vnic_bytes_total{{session="{s}",vm="{vm}",nic="eth0",direction="egress"}}' in text
            )
        sent = re.search(
            rf'vnic_bytes_total{{session="{s}",vm="g1",nic="eth0",direction="egress"}} (\d+)', text
        )
        assert sent and int(sent.group(1)) > 3 * 30_000_000 / 8 * 0.5, "g1's sent bytes"
        assert (
            f'vnic_profile_rate_bits_per_second{{session="{s}",vm="g1",nic="eth0",'
            'direction="egress"} 30000000' in text
        )
        latency = re.search(
            rf'vnic_latency_seconds{{session="{s}",vm="g1",nic="eth0"}} ([0-9.e-]+)', text
        )
        assert latency and 0 < float(latency.group(1)) < 0.5, "g1's measured latency"
        # The guest kernel's own count of what eth0 sent agrees with the host's (which
        # counts segmentation-offloaded frames with a header each: a few percent more).
        nic = driver.status(s, "g1")["nic"]
        assert nic["mac"] == g1["mac"] and f"{g1['ipv4']}/24" in nic["addresses"]
        ratio = int(sent.group(1)) / nic["tx_bytes"]
        print(f"host-counted / guest-counted egress bytes: {ratio:.4f}")
        assert 0.95 < ratio < 1.08, ratio
    finally:
        try:
            for name in (s, other):
                admin("DELETE", f"/v1/sessions/{name}", 204, params={"force": True})
        finally:
            server.kill()
    assert guest_leftovers(s) == []
    assert not nsops.exists(names.session_netns(s))
