"""What this kernel can really do, found by trying in a throwaway namespace.

Nothing is read from kernel config files: every qdisc, classifier, action,
nftables expression, link kind and sysctl is tried for real inside a
namespace ``vnic.probe-<pid>`` that is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vnic.dataplane import namespaces as nsops

QDISCS = (
    "htb",
    "tbf",
    "netem",
    "fq",
    "fq_codel",
    "sfq",
    "prio",
    "bfifo",
    "pfifo",
    "ingress",
    "clsact",
)
CLASSIFIERS = ("u32", "bpf", "flower", "matchall", "basic", "fw")
ACTIONS = ("mirred", "police", "gact", "skbedit", "pedit")
LINKS = ("veth", "bridge", "ifb", "vxlan", "tuntap", "dummy")
NFT_EXPRESSIONS = {
    "numgen": "meta mark set numgen random mod 100",
    "limit": "limit rate 10/second",
    "quota": "quota 1000 bytes",
    "counter": "counter",
    "bridge_dscp": None,  # tried in a bridge table below
}
SYSCTLS = (
    "net.ipv4.tcp_congestion_control",
    "net.ipv4.tcp_window_scaling",
    "net.ipv4.tcp_sack",
    "net.ipv4.tcp_timestamps",
    "net.ipv4.tcp_ecn",
)


@dataclass
class Probe:
    """Results: feature name -> available."""

    qdiscs: dict[str, bool] = field(default_factory=dict)
    classifiers: dict[str, bool] = field(default_factory=dict)
    actions: dict[str, bool] = field(default_factory=dict)
    links: dict[str, bool] = field(default_factory=dict)
    nftables: dict[str, bool] = field(default_factory=dict)
    sysctls: dict[str, bool] = field(default_factory=dict)
    congestion_control: dict[str, str] = field(default_factory=dict)
    engines: dict[str, bool] = field(default_factory=dict)

    def has(self, feature: str) -> bool:
        """``"qdisc:netem"``, ``"action:mirred"``, ``"link:ifb"``, ``"nft:numgen"`` ..."""
        group, _, name = feature.partition(":")
        table = {
            "qdisc": self.qdiscs,
            "classifier": self.classifiers,
            "action": self.actions,
            "link": self.links,
            "nft": self.nftables,
            "sysctl": self.sysctls,
            "engine": self.engines,
        }[group]
        return table.get(name, False)

    def to_dict(self) -> dict[str, object]:
        return {
            "qdiscs": self.qdiscs,
            "classifiers": self.classifiers,
            "actions": self.actions,
            "links": self.links,
            "nftables": self.nftables,
            "sysctls": self.sysctls,
            "congestion_control": self.congestion_control,
            "engines": self.engines,
        }


def _ok(ns: str, argv: Sequence[str], stdin: str | None = None) -> bool:
    proc = nsops.run(ns, list(argv), input=stdin, capture_output=True, timeout=10)
    return proc.returncode == 0


def run_probe() -> Probe:
    """Probe the running kernel (needs root). Takes about a second."""
    ns = f"vnic.probe-{os.getpid()}"
    nsops.remove(ns)
    nsops.create(ns)
    try:
        return _probe_in(ns)
    finally:
        nsops.remove(ns)


def _probe_in(ns: str) -> Probe:
    p = Probe()
    p.links["veth"] = _ok(ns, ["ip", "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
    for kind in LINKS[1:]:
        argv = (
            ["ip", "tuntap", "add", "pt0", "mode", "tap"] if kind == "tuntap" else _link_add(kind)
        )
        p.links[kind] = _ok(ns, argv)
    _ok(ns, ["ip", "link", "set", "p0", "up"])
    for q in QDISCS:
        if q in ("ingress", "clsact"):
            p.qdiscs[q] = _ok(ns, ["tc", "qdisc", "add", "dev", "p1", q]) and _ok(
                ns, ["tc", "qdisc", "del", "dev", "p1", q]
            )
        else:
            extra = {
                "tbf": ["rate", "1mbit", "burst", "5k", "latency", "50ms"],
                "netem": ["delay", "1ms"],
            }.get(q, [])
            p.qdiscs[q] = _ok(ns, ["tc", "qdisc", "replace", "dev", "p0", "root", q, *extra])
    _ok(ns, ["tc", "qdisc", "add", "dev", "p1", "ingress"])
    filters = {
        "u32": ["u32", "match", "u32", "0", "0"],
        "bpf": ["bpf", "bytecode", "1,6 0 0 0", "classid", "1:1"],
        "flower": ["flower"],
        "matchall": ["matchall"],
        "basic": ["basic"],
        "fw": ["fw"],
    }
    for i, (cls, args) in enumerate(filters.items()):
        p.classifiers[cls] = _ingress_filter_ok(ns, 10 + i, args)
    actions = {
        "mirred": ["mirred", "egress", "redirect", "dev", "p0"],
        "police": ["police", "rate", "1mbit", "burst", "10k"],
        "gact": ["gact", "pass"],
        "skbedit": ["skbedit", "priority", "1"],
        "pedit": ["pedit", "ex", "munge", "ip", "ttl", "set", "1"],
    }
    for i, (act, args) in enumerate(actions.items()):
        p.actions[act] = _ingress_filter_ok(
            ns, 30 + i, ["u32", "match", "u32", "0", "0", "action", *args]
        )
    for expr, rule in NFT_EXPRESSIONS.items():
        family, body = ("bridge", "ip dscp set 46") if rule is None else ("inet", rule)
        script = f"table {family} vnicprobe {{\n chain f {{\n  type filter hook forward priority 0;\n  {body}\n }}\n}}\n"
        p.nftables[expr] = _ok(ns, ["nft", "-f", "-"], stdin=script)
        _ok(ns, ["nft", "flush", "ruleset"])
    for key in SYSCTLS:
        try:
            current = nsops.read_sysctl(ns, key)
            nsops.sysctl(ns, key, current)
            p.sysctls[key] = True
        except Exception:
            p.sysctls[key] = False
    p.engines["netem"] = p.qdiscs.get("netem", False)
    p.engines["delayd"] = _delayd_ok(ns)
    available = nsops.read_sysctl(ns, "net.ipv4.tcp_available_congestion_control").split()
    allowed = nsops.read_sysctl(ns, "net.ipv4.tcp_allowed_congestion_control").split()
    for algo in available:
        p.congestion_control[algo] = "sysctl" if algo in allowed else "route"
    return p


def _ingress_filter_ok(ns: str, prio: int, args: list[str]) -> bool:
    """Whether a filter (classifier plus optional action) can be added on p1's ingress."""
    argv = [
        "tc",
        "filter",
        "add",
        "dev",
        "p1",
        "parent",
        "ffff:",
        "prio",
        str(prio),
        "protocol",
        "all",
    ]
    return _ok(ns, [*argv, *args])


def _link_add(kind: str) -> list[str]:
    name = f"p{kind[:6]}"
    extra = ["id", "42", "dstport", "4789", "local", "127.0.0.1"] if kind == "vxlan" else []
    return ["ip", "link", "add", name, "type", kind, *extra]


def tools_missing() -> list[str]:
    """Programs the data plane and measurements call that are not installed."""
    missing = []
    for tool in ("ip", "tc", "nft", "iperf3", "irtt", "ping", "ss", "ethtool", "cc"):
        if shutil.which(tool) is None:
            missing.append(tool)
    return missing


_NETEM: dict[str, bool] = {}


def netem_available() -> bool:
    """Whether ``sch_netem`` works here: tried once per process in a throwaway namespace."""
    if "netem" not in _NETEM:
        ns = f"vnic.probe-netem-{os.getpid()}"
        nsops.remove(ns)
        nsops.create(ns)
        try:
            _NETEM["netem"] = _ok(ns, ["tc", "qdisc", "add", "dev", "lo", "root", "netem"])
        finally:
            nsops.remove(ns)
    return _NETEM["netem"]


def _delayd_ok(ns: str) -> bool:
    """Whether the vnic delay engine builds and relays between two veths here."""
    from vnic.dataplane import delayd
    from vnic.plan.model import DelayEngine

    if shutil.which("ethtool") is None:
        return False
    if not (
        _ok(ns, ["ip", "link", "add", "e0", "type", "veth", "peer", "name", "e1"])
        and _ok(ns, ["ip", "link", "set", "e0", "up"])
        and _ok(ns, ["ip", "link", "set", "e1", "up"])
    ):
        return False
    try:
        exe = delayd.binary()
    except Exception:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        engine = DelayEngine("e0", "e1", None, None)
        argv = delayd.argv(engine, "vnic:probe", Path(tmp) / "stats", exe)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            return delayd.became_ready(proc)
        finally:
            proc.kill()
            proc.wait()
