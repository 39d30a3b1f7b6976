"""Traffic control (HTB, FIFOs, u32 filters, netem) of a plan: written, read back, changed live.

* :mod:`.encode` — the one netlink encoder of an HTB class (and of a FIFO leaf),
  shared by launch and live change; handles and netlink constants;
* :mod:`.launch` — a plan's qdiscs, classes, filters and redirect on fresh devices;
* :mod:`.read` — classes and qdiscs read back and compared with a plan (``verify``);
* :mod:`.counters` — the counters of every shaped class of a namespace;
* :mod:`.batch` — requests sent many at a time on a raw netlink socket;
* :mod:`.live` — the traffic-control operations of a live change.

The names callers use are re-exported here.
"""

from vnic.dataplane.tc.counters import ClassCounters, read_class_counters
from vnic.dataplane.tc.launch import apply_netem, apply_plan
from vnic.dataplane.tc.live import LiveTc, netem_change_argv
from vnic.dataplane.tc.read import (
    ClassReader,
    ClassState,
    QdiscReader,
    class_differences,
    compare_classes,
    compare_qdiscs,
    qdisc_differences,
    read_classes,
    read_classes_at,
    read_qdiscs,
    verify,
)

__all__ = [
    "ClassCounters",
    "ClassReader",
    "ClassState",
    "LiveTc",
    "QdiscReader",
    "apply_netem",
    "apply_plan",
    "class_differences",
    "compare_classes",
    "compare_qdiscs",
    "netem_change_argv",
    "qdisc_differences",
    "read_class_counters",
    "read_classes",
    "read_classes_at",
    "read_qdiscs",
    "verify",
]
