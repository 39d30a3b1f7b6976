"""What the overlay tests run inside an emulated host (``python -m tests.netns.overlay_host``).

- ``launch SESSION VM VNI ADDRNET HOST [SET...]``: the host's agent (``$VNIC_HOME/agent``)
  launches netns VM ``VM`` with one vNIC on ``default``: network id ``VNI``, addresses
  and MAC of host index ``HOST`` in the subnets of network id ``ADDRNET``; prints
  ``MAC IPV4 IPV6``;
- ``overlays SESSION UNDERLAY JSON``: ``Agent.ensure_overlays`` with the manager's list
  form; prints the changes (JSON), or the error's JSON on stderr and exits 2;
- ``reconcile``: the host agent's full reconcile (prints what it removed or failed);
- ``teardown SESSION``: the session's teardown on this host;
- ``arps NETNS IFACE SECONDS``: prints ``ready``, then for ``SECONDS`` counts the ARP
  requests seen on ``IFACE`` in namespace ``NETNS`` by sender address, printed as JSON.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

from vnic.agent.core import local_agent
from vnic.errors import VnicError
from vnic.model.launch import NicRequest
from vnic.model.profile import build_profile, parse_assignments
from vnic.model.resolve import Layer, complete
from vnic.model.units import MacAddress
from vnic.plan import names
from vnic.plan.overlay import overlays_from_wire

ETH_P_ARP = 0x0806


def launch(session: str, vm: str, vni: int, addrnet: int, host: int, sets: list[str]) -> None:
    from vnic.model.launch import LaunchRequest

    ipv4, ipv6 = names.vm_addresses(addrnet, host)
    eff = complete([Layer("vm-patch", "", parse_assignments(sets))])
    mac = MacAddress.parse(f"02:00:{vni >> 8:02x}:{vni & 0xFF:02x}:{host:02x}:01")
    nic = NicRequest(
        "eth0", "default", vni, mac, ipv4, ipv6, build_profile(eff.values), dict(eff.values)
    )
    local_agent("netns").launch(LaunchRequest(session, vm, (nic,)))
    print(mac, ipv4.ip, ipv6.ip)


def overlays(session: str, underlay: str, doc: str) -> int:
    try:
        wanted = overlays_from_wire(session, json.loads(doc))
        print(json.dumps(local_agent("netns").ensure_overlays(session, wanted, underlay)))
    except VnicError as exc:
        print(json.dumps(exc.to_dict()), file=sys.stderr)
        return 2
    return 0


def arps(netns: str, iface: str, seconds: float) -> None:
    from vnic.dataplane import namespaces as nsops

    with nsops.inside(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    sock.bind((iface, ETH_P_ARP))
    sock.settimeout(0.2)
    print("ready", flush=True)
    seen: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            frame = sock.recv(2048)
        except TimeoutError:
            continue
        op = struct.unpack("!H", frame[20:22])[0]
        if op == 1:  # a request: its sender's address at offset 14 + 14
            sender = socket.inet_ntoa(frame[28:32])
            seen[sender] = seen.get(sender, 0) + 1
    print(json.dumps(seen), flush=True)


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "launch":
        session, vm, vni, addrnet, host, *sets = args
        launch(session, vm, int(vni), int(addrnet), int(host), sets)
    elif command == "overlays":
        return overlays(*args)
    elif command == "reconcile":
        report = local_agent("netns").reconcile()
        print(json.dumps({"removed": report.removed, "failed": report.failed}))
    elif command == "teardown":
        local_agent("netns").teardown_session(args[0])
    elif command == "arps":
        arps(args[0], args[1], float(args[2]))
    else:
        print(f"unknown command {command}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
