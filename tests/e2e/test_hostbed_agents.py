"""A `vnic agent` process on each emulated host, reached from the manager host over the
underlay: each with its own state directory and key, each reporting its own VMs (the same
session and VM names on two hosts), and a host that keeps its VMs while its agent is
killed and restarted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

from tests.netns.hostbeds import VNIC
from vnic.lab.hostbed import Host, HostBed

PORT = 8471

#: Run in the manager host: wait for each agent (health, no key), then ask each for the
#: session's running VMs with its own key. argv: session, then host=address:port=keyfile...
ASK = """
import json, sys, time, httpx
session, out = sys.argv[1], {}
for arg in sys.argv[2:]:
    name, address, key_file = arg.split("=")
    url = f"http://{address}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"agent of {name} at {url} did not answer")
        time.sleep(0.2)
    key = open(key_file).read().strip()
    r = httpx.get(url + f"/v1/sessions/{session}/running", timeout=30,
                  headers={"Authorization": f"Bearer {key}"})
    r.raise_for_status()
    out[name] = r.json()
print(json.dumps(out))
"""


def start_agent(bed: HostBed, host: Host) -> subprocess.Popen[bytes]:
    log = open(host.home / "agent.log", "ab")  # noqa: SIM115 (the agent writes it while it runs)
    argv = [*VNIC, "agent", "--host", host.address4, "--port", str(PORT)]
    proc = bed.spawn(host, [*argv, "--drift-interval", "600"], stdout=log, stderr=log)
    log.close()
    return proc


def ask(bed: HostBed, session: str, hosts: list[Host]) -> dict[str, Any]:
    targets = [f"{h.short}={h.address4}:{PORT}={h.home / 'agent.key'}" for h in hosts]
    done = bed.run("hm", [sys.executable, "-c", ASK, session, *targets], timeout=120)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_an_agent_per_host_over_the_underlay(hostbed: HostBed) -> None:
    bed = hostbed
    h1, h2, _ = bed.hosts
    session = "stretch"
    script = f"{' '.join(VNIC)} session create {session} && {' '.join(VNIC)} vm launch {session} a"
    launches = [bed.spawn(h, ["sh", "-c", script], stdout=subprocess.DEVNULL) for h in (h1, h2)]
    assert [p.wait(timeout=180) for p in launches] == [0, 0]
    inits = {h.short: (h.runtime_dir / "netns" / session / "a" / "init.pid") for h in (h1, h2)}
    before = {h: f.read_text() for h, f in inits.items()}

    agents = {h.short: start_agent(bed, h) for h in bed.hosts}
    assert ask(bed, session, bed.hosts) == {"h1": ["a"], "h2": ["a"], "h3": []}
    keys = {(h.home / "agent.key").read_text() for h in bed.hosts}
    assert len(keys) == 3  # a key of its own on every host

    # Host 1's agent dies: the host and its VM go on; a new agent finds the VM and keeps it.
    agents["h1"].send_signal(signal.SIGKILL)
    agents["h1"].wait(timeout=30)
    assert (session, "a") in bed.inventory(h1).vms()
    agents["h1"] = start_agent(bed, h1)
    assert ask(bed, session, [h1, h2]) == {"h1": ["a"], "h2": ["a"]}
    assert bed.inventory(h1).vms() == bed.inventory(h2).vms() == {(session, "a")}
    # The same VMs, not rebuilt ones: their inits are the ones launched first.
    assert {h: f.read_text() for h, f in inits.items()} == before
