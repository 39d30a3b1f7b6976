"""Many hosts, for real: a manager (two replicas) on a throwaway PostgreSQL in the manager
host, and a `vnic agent --manager` on each of 3 emulated hosts dialling out to it over
HTTPS (a CA made for the test). VMs are placed, shaped on their hosts (measured), changed
live, stopped; an agent restarted with an empty state directory rebuilds from the manager;
an agent paused past its lease comes back with a new epoch and relists before acting;
Prometheus finds every agent. Afterwards the database's running set, each agent's desired
set and each host's kernel agree."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from typing import Any

from tests.e2e.fleet import SESSION, Fleet, until
from vnic.lab.hostbed import Host, HostBed


def write_profiles(fleet: Fleet, rate: str) -> dict[str, dict[str, Any]]:
    """Profile ``edge``: ``rate`` each way, and an MTU that fits VXLAN over the bed's 1500-byte
    underlay (docs/overlay.md). Returns the live changes the answer reports, by VM."""
    doc = f"name: edge\nmtu: 1450B\negress: {{rate: {rate}}}\ningress: {{rate: {rate}}}\n"
    path = fleet.bed.manager.home / "edge.yaml"
    path.write_text(doc)
    answer = fleet.cli_json("profile", "apply", "-f", str(path))
    return {c["vm"]: c for c in answer["changes"]}


def ping(bed: HostBed, host: Host, vm: str, address: str) -> bool:
    """Whether ``vm`` on ``host`` reaches ``address`` (3 pings, 2 s each at most)."""
    argv = ["ip", "netns", "exec", f"vnic.{SESSION}.{vm}", "ping", "-c", "3", "-W", "2", address]
    return bed.run(host, argv).returncode == 0


def test_a_fleet_of_hosts_places_shapes_changes_and_survives(fleet: Fleet) -> None:
    bed = fleet.bed
    h1, h2, _ = bed.hosts
    for h in bed.hosts:
        fleet.start_agent(h)
    until("3 hosts ready", lambda: [h.state for h in fleet.hosts().values()] == ["ready"] * 3)
    epochs = {name: h.epoch for name, h in fleet.hosts().items()}

    write_profiles(fleet, "20mbit")
    fleet.cli("session", "create", SESSION, "--default-profile", "edge")
    # Two VMs on host 1 by name; the rest placed: spread puts one on each of the others.
    for vm in ("a1", "a2"):
        assert "on host h1" in fleet.cli("vm", "launch", SESSION, vm, "--host", "h1").stdout
    for vm in ("b", "c"):
        fleet.cli("vm", "launch", SESSION, vm)
    assert fleet.placement() == {"a1": "h1", "a2": "h1", "b": "h2", "c": "h3"}
    listed = {v["name"]: v["host"] for v in fleet.cli_json("vm", "list", SESSION)}
    assert listed == fleet.placement()
    until("database, agents and kernels agree", fleet.agree)

    # Commands reach only the manager's own VMs: one on a host is refused, saying where it runs.
    refused = fleet.cli("vm", "exec", SESSION, "b", "--", "true", check=False)
    assert refused.returncode != 0 and "runs on host h2" in refused.stderr, refused

    # The manager's stats (vnic top, the live view, the controller) cover every host.
    ask = (
        "import httpx, json, sys; print(json.dumps(httpx.get(sys.argv[1], verify=sys.argv[2],"
        " headers={'Authorization': 'Bearer ' + sys.argv[3]}, timeout=30).json()))"
    )
    url = f"{fleet.url()}/v1/sessions/{SESSION}/stats"
    got = bed.run("hm", [sys.executable, "-c", ask, url, str(fleet.ca), fleet.admin])
    assert {e["vm"] for e in json.loads(got.stdout)} == {"a1", "a2", "b", "c"}, got.stderr

    # One L2 segment across hosts (VXLAN): a1 on host 1 reaches b on host 2 and c on host 3,
    # over IPv4 and IPv6, neighbours found by ARP and NDP.
    for vm, host in (("b", "h2"), ("c", "h3")):
        info = fleet.svc.get_vm(SESSION, vm)
        assert info.ipv4 and info.ipv6
        for address in (info.ipv4.split("/")[0], info.ipv6.split("/")[0]):
            assert until(
                f"a1 reaches {vm} on {host} at {address}", lambda a=address: ping(bed, h1, "a1", a)
            )

    # Shaped on its host: both VMs at 20 Mbit/s each way.
    assert 0.85 * 20e6 < fleet.rate(h1, "a1", "a2") < 1.05 * 20e6

    # A live change reaches the VMs on every host, with the kernel changes reported back.
    changed = write_profiles(fleet, "40mbit")
    assert 0.85 * 40e6 < fleet.rate(h1, "a1", "a2") < 1.05 * 40e6
    for vm in ("b", "c"):  # the kernel lines their agents reported, in the API's answer
        assert changed[vm]["error"] is None and changed[vm]["kernel"], changed[vm]

    # A launch through the second replica reaches host 1's agent, which follows the first.
    fleet.serve(1)
    fleet.cli("vm", "launch", SESSION, "a3", "--host", "h1", replica=1)
    until("a3 runs on host 1", lambda: "a3" in fleet.kernel()["h1"])

    # Host 2's agent restarts with an empty state directory: it rebuilds b from the manager.
    agent = fleet.agents["h2"]
    agent.terminate()
    assert agent.wait(timeout=30) == 0
    shutil.rmtree(h2.home / "agent", ignore_errors=True)
    fleet.start_agent(h2)
    until("host 2 registered again", lambda: fleet.hosts()["h2"].epoch > epochs["h2"])
    until("b is in host 2's desired state again", lambda: fleet.desired(h2) == {"b"})
    assert fleet.kernel()["h2"] == {"b"}

    # Host 3's agent is paused past its lease: the host turns unknown, its VM keeps running,
    # and a stop made meanwhile is applied only after the agent registered again.
    paused = fleet.agents["h3"]
    os.kill(paused.pid, signal.SIGSTOP)
    until("host 3 unknown", lambda: fleet.hosts()["h3"].state == "unknown", timeout=40)
    assert fleet.kernel()["h3"] == {"c"}
    fleet.cli("vm", "destroy", SESSION, "c")  # answers after --host-wait: nobody reports
    assert fleet.kernel()["h3"] == {"c"}  # nothing acted while paused
    os.kill(paused.pid, signal.SIGCONT)
    until("host 3 ready again", lambda: fleet.hosts()["h3"].state == "ready")
    assert fleet.hosts()["h3"].epoch > epochs["h3"]
    until("c is gone from host 3", lambda: fleet.kernel()["h3"] == set())
    until("database, agents and kernels agree after all that", fleet.agree)

    # Draining host 2 relaunches b on another host with the same MAC and addresses.
    b = fleet.svc.get_vm(SESSION, "b")
    assert "moved to h3" in fleet.cli("host", "drain", "h2").stdout
    moved = fleet.svc.get_vm(SESSION, "b")
    assert (moved.host, moved.mac, moved.ipv4, moved.ipv6) == ("h3", b.mac, b.ipv4, b.ipv6)
    assert fleet.hosts()["h2"].cordoned
    until(
        "b left host 2 for host 3",
        lambda: fleet.kernel() == {"h1": {"a1", "a2", "a3"}, "h2": set(), "h3": {"b"}},
    )
    until("database, agents and kernels agree after the drain", fleet.agree)
    fleet.cli("host", "uncordon", "h2")

    # Prometheus finds every agent, each with its host label, and each serves its VMs.
    targets = fleet.svc.prometheus_targets()
    assert sorted(t["labels"]["host"] for t in targets) == ["h1", "h2", "h3"]
    first = next(t for t in targets if t["labels"]["host"] == "h1")
    fetch = f"import httpx; print(httpx.get('http://{first['targets'][0]}/metrics').text)"
    metrics = bed.run("hm", [sys.executable, "-c", fetch]).stdout
    assert f'session="{SESSION}"' in metrics and 'vm="a1"' in metrics

    # Down: every host's kernel is empty of the session, and they still agree.
    fleet.cli("session", "down", SESSION)
    until("every host empty", lambda: fleet.kernel() == {"h1": set(), "h2": set(), "h3": set()})
    assert fleet.agree()
