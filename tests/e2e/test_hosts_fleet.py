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

from tests.e2e.fleet import SESSION, Fleet, until, write_profiles


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

    # The manager's stats (vnic top, the live view, the controller) cover every host.
    ask = (
        "import httpx, json, sys; print(json.dumps(httpx.get(sys.argv[1], verify=sys.argv[2],"
        " headers={'Authorization': 'Bearer ' + sys.argv[3]}, timeout=30).json()))"
    )
    url = f"{fleet.url()}/v1/sessions/{SESSION}/stats"
    got = bed.run("hm", [sys.executable, "-c", ask, url, str(fleet.ca), fleet.admin])
    assert {e["vm"] for e in json.loads(got.stdout)} == {"a1", "a2", "b", "c"}, got.stderr

    # Shaped on its host: both VMs at 20 Mbit/s each way.
    assert 0.85 * 20e6 < fleet.rate(h1, "a1", "a2") < 1.05 * 20e6

    # A live change reaches the VMs on every host, with the kernel changes reported back.
    before = {vm: fleet.svc.vm_status(SESSION, vm) for vm in ("b", "c")}
    write_profiles(fleet, "40mbit")
    assert 0.85 * 40e6 < fleet.rate(h1, "a1", "a2") < 1.05 * 40e6
    for vm, old in before.items():
        now = fleet.svc.vm_status(SESSION, vm)
        assert old is not None and now is not None and now.revision > old.revision
        assert now.error is None and now.changes, now  # the kernel lines of the change

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
