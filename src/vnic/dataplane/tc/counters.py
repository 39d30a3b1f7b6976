"""Counters of the shaped classes of a namespace (``vnic top``, the metrics)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from vnic.dataplane.namespaces import run_inside
from vnic.errors import DataplaneError


@dataclass(frozen=True)
class ClassCounters:
    """Counters of one HTB class: bytes and packets sent, packets dropped, overlimits."""

    bytes: int
    packets: int
    drops: int
    overlimits: int


def read_class_counters(session_ns: str) -> dict[tuple[str, int], ClassCounters]:
    """Counters of every shaped class in a namespace: (device, class minor) -> counters.

    Read from the FIFO leaf under each HTB class, with one ``tc -s -j qdisc
    show`` (a fixed, read-only command): the kernel dumps the qdiscs of all
    devices at once, and tc's C decoder is about ten times faster here than
    decoding the same dump in Python. Drops are queue overflows of the class.
    """
    proc = run_inside(
        session_ns, ["tc", "-s", "-j", "qdisc", "show"], capture_output=True, timeout=30
    )
    if proc.returncode != 0:
        raise DataplaneError(f"cannot read qdisc counters in {session_ns}: {proc.stderr.strip()}")
    out: dict[tuple[str, int], ClassCounters] = {}
    for q in json.loads(proc.stdout or "[]"):
        parent = str(q.get("parent", ""))
        if q.get("kind") not in ("bfifo", "pfifo", "netem") or not parent.startswith("1:"):
            continue
        out[(str(q["dev"]), int(parent[2:], 16))] = ClassCounters(
            bytes=int(q.get("bytes", 0)),
            packets=int(q.get("packets", 0)),
            drops=int(q.get("drops", 0)),
            overlimits=int(q.get("overlimits", 0)),
        )
    return out
