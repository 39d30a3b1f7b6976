"""Port guards with nftables (bridge family) in a session namespace.

One table ``bridge vnic`` per session namespace; its ``prerouting`` chain
jumps to one chain per VM port (``vm_<port>``), and that jump carries the VM's
owner tag as its comment so it is found and removed by ownership.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vnic.dataplane import namespaces as nsops
from vnic.errors import DataplaneError
from vnic.model.units import Dscp, UnitError
from vnic.plan.model import PortGuard

TABLE = "vnic"
DROP_REASONS = (
    "spoof-mac",
    "spoof-vlan",
    "spoof-arp",
    "spoof-ipv4",
    "spoof-ipv6",
    "spoof-router",
    "spoof-nd",
)

#: EtherTypes of 802.1Q (0x8100), 802.1ad (0x88a8) and the pre-standard QinQ tag (0x9100).
#: The outer tag of a stacked (QinQ) frame is one of them, so one match drops both.
VLAN_TYPES = "8021q, 8021ad, 0x9100"
#: ICMPv6 types that may come from ``::`` (RFC 4862 section 5.4.2: duplicate address
#: detection; RFC 3590 section 4: listener reports sent before a link-local exists).
FROM_UNSPECIFIED = ("mld-listener-report", "mld2-listener-report", "nd-neighbor-solicit")
#: ND option types: source (1) and target (2) link-layer address (RFC 4861 section 4.6.1).
SLLAO, TLLAO = 1, 2


@dataclass(frozen=True)
class GuardRule:
    """One drop rule of a port guard: why it drops (its comment and counter's cause), its
    nft match, and how :func:`guard_in` reads that match back (for drift)."""

    reason: str
    match: str
    readback: str


def guard_rules(guard: PortGuard) -> tuple[GuardRule, ...]:
    """The drop rules of ``guard``, in the order they are checked.

    The IPv6 rules are an RA guard and ND guard in the manner of Neutron's port
    security and libvirt's ``no-ip-spoofing``: sources only the VM's address, its
    EUI-64 link-local or ``::`` (DAD and listener reports only); no router
    advertisements or redirects; neighbour advertisements only for its own
    addresses; the link-layer option of NS, NA and RS only its MAC. The options
    are matched by offset (nft here has no ``icmpv6 taddr``), so ND messages are
    held to the layout every sender uses: no extension headers and no option or
    exactly one 8-byte option (``ip6 length`` is then the ICMPv6 length).
    """
    ident = guard.identity
    own6 = (ident.link_local, ident.ipv6)
    mac = int(ident.mac.replace(":", ""), 16)
    targets = "{ " + ", ".join(f"0x{int(ipaddress.IPv6Address(a)):032x}" for a in own6) + " }"
    targets_back = "!= " + _sorted(own6)

    def lladdr(option: int) -> str:
        """The 8-byte link-layer option with the VM's MAC (read back as written)."""
        return f"0x{(option << 56) | (1 << 48) | mac:016x}"  # type, length (1 = 8 bytes), MAC

    sll, tll = lladdr(SLLAO), lladdr(TLLAO)
    nd = "nd-neighbor-solicit, nd-neighbor-advert"
    return (
        GuardRule("spoof-mac", f"ether saddr != {ident.mac}", f"!= {ident.mac}"),
        GuardRule(
            "spoof-vlan",
            f"ether type {{ {VLAN_TYPES} }}",
            _sorted(["8021q", "8021ad", str(0x9100)]),
        ),
        GuardRule("spoof-arp", f"ether type arp arp saddr ether != {ident.mac}", f"!= {ident.mac}"),
        GuardRule("spoof-arp", f"ether type arp arp saddr ip != {ident.ipv4}", f"!= {ident.ipv4}"),
        GuardRule("spoof-ipv4", f"ether type ip ip saddr != {ident.ipv4}", f"!= {ident.ipv4}"),
        GuardRule(
            "spoof-ipv6",
            f"ether type ip6 ip6 saddr != {{ ::, {ident.link_local}, {ident.ipv6} }}",
            "!= " + _sorted(["::", *own6]),
        ),
        GuardRule("spoof-ipv6", "ip6 saddr :: meta l4proto != ipv6-icmp", ":: != ipv6-icmp"),
        GuardRule(
            "spoof-ipv6",
            f"ip6 saddr :: icmpv6 type != {{ {', '.join(FROM_UNSPECIFIED)} }}",
            ":: != " + _sorted(FROM_UNSPECIFIED),
        ),
        GuardRule(
            "spoof-router",
            "icmpv6 type { nd-router-advert, nd-redirect }",
            _sorted(["nd-router-advert", "nd-redirect"]),
        ),
        GuardRule(
            "spoof-nd",
            f"icmpv6 type {{ nd-router-solicit, {nd} }} ip6 nexthdr != ipv6-icmp",
            _sorted(["nd-router-solicit", *nd.split(", ")]) + " != ipv6-icmp",
        ),
        GuardRule(
            "spoof-nd",
            f"icmpv6 type {{ {nd} }} ip6 length != {{ 24, 32 }}",
            _sorted(nd.split(", ")) + " != 24,32",
        ),
        GuardRule(
            "spoof-nd",
            "icmpv6 type nd-router-solicit ip6 length != { 8, 16 }",
            "nd-router-solicit != 16,8",
        ),
        GuardRule(
            "spoof-nd",
            f"icmpv6 type nd-neighbor-advert @th,64,128 != {targets}",
            f"nd-neighbor-advert {targets_back}",
        ),
        GuardRule(
            "spoof-nd",
            f"ip6 saddr :: icmpv6 type nd-neighbor-solicit @th,64,128 != {targets}",
            f":: nd-neighbor-solicit {targets_back}",
        ),
        GuardRule(
            "spoof-nd",
            f"icmpv6 type nd-neighbor-advert ip6 length 32 @th,192,64 != {tll}",
            f"nd-neighbor-advert 32 != {tll}",
        ),
        GuardRule(
            "spoof-nd",
            f"ip6 saddr != :: icmpv6 type nd-neighbor-solicit ip6 length 32 @th,192,64 != {sll}",
            f"!= :: nd-neighbor-solicit 32 != {sll}",
        ),
        GuardRule(
            "spoof-nd",
            f"icmpv6 type nd-router-solicit ip6 length 16 @th,64,64 != {sll}",
            f"nd-router-solicit 16 != {sll}",
        ),
    )


def _sorted(values: Iterable[str]) -> str:
    """A set as :func:`guard_in` reads it back: its members sorted, comma-separated."""
    return ",".join(sorted(values))


def render(guard: PortGuard, *, jump: bool = True) -> str:
    """The nft script that installs ``guard`` (idempotent for the table and base chain).

    Without ``jump``, only the guard's own chain is (re)filled: how a running
    guard's rules change, in one transaction, while the jump into it stays.
    """
    ident = guard.identity
    c = guard.chain
    lines = [
        f"add table bridge {TABLE}",
        f"add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority -200; policy accept; }}",
        f"add chain bridge {TABLE} {c}",
        f"flush chain bridge {TABLE} {c}",
    ]
    lines += [
        f'add rule bridge {TABLE} {c} {r.match} counter drop comment "{r.reason}"'
        for r in guard_rules(guard)
    ]
    if guard.dscp_mark is not None:
        lines += [
            f'add rule bridge {TABLE} {c} ether type ip ip dscp set {guard.dscp_mark} comment "dscp-mark"',
            f'add rule bridge {TABLE} {c} ether type ip6 ip6 dscp set {guard.dscp_mark} comment "dscp-mark"',
        ]
    if jump:
        lines.append(
            f'add rule bridge {TABLE} prerouting iifname "{guard.port}" jump {c} comment "{ident.tag}"'
        )
    return "\n".join(lines) + "\n"


def rewrite_guard(session_ns: str, guard: PortGuard) -> None:
    """Refill a running guard's chain with ``guard``'s rules (one nft transaction: frames see
    the old rules or the new ones, never none); its jump is left as it is."""
    proc = nsops.run_inside(
        session_ns,
        ["nft", "-f", "-"],
        input=render(guard, jump=False),
        capture_output=True,
        timeout=10,
    )
    if proc.returncode != 0:
        raise DataplaneError(
            f"nftables refused the port guard for {guard.port}: {proc.stderr.strip()}"
        )


class PendingGuard:
    """An ``nft`` run started in the background; :meth:`wait` raises if it failed.

    Starting the guard before the traffic-control work and waiting after it
    overlaps nft's process start-up with the netlink calls of a launch.
    """

    def __init__(self, proc: subprocess.Popen[str], port: str, script: str) -> None:
        self.proc = proc
        self.port = port
        self.script = script

    def wait(self, timeout: float = 10.0) -> None:
        _out, err = self.proc.communicate(self.script, timeout=timeout)
        if self.proc.returncode != 0:
            raise DataplaneError(f"nftables refused the port guard for {self.port}: {err.strip()}")


def start_guard(session_ns: str, guard: PortGuard) -> PendingGuard:
    with nsops.inside(session_ns):
        proc = subprocess.Popen(
            ["nft", "-f", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    return PendingGuard(proc, guard.port, render(guard))


def _rules(session_ns: str, chain: str) -> list[dict[str, Any]]:
    proc = nsops.run_inside(
        session_ns,
        ["nft", "-j", "-a", "list", "chain", "bridge", TABLE, chain],
        capture_output=True,
        timeout=10,
    )
    if proc.returncode != 0:
        return []
    return [item["rule"] for item in json.loads(proc.stdout)["nftables"] if "rule" in item]


def jump_tags(session_ns: str) -> list[str]:
    """Owner tags on the ``prerouting`` jumps of ``session_ns``: one per guarded VM port."""
    return [str(r["comment"]) for r in _rules(session_ns, "prerouting") if r.get("comment")]


@dataclass(frozen=True)
class GuardState:
    """A port guard as nftables reports it.

    ``jumps``: the ports whose ``prerouting`` jump into the chain carries the
    owner tag; ``rules``: the chain's rules as (comment, value matched
    against), in order; None when the chain does not exist.
    """

    jumps: tuple[str, ...]
    rules: tuple[tuple[str, str], ...] | None


#: The chains of the ``bridge vnic`` table, each with its rules in order (nft's JSON objects).
Table = dict[str, list[dict[str, Any]]]


def read_table(session_ns: str) -> Table:
    """Every chain of the session's table with its rules, from one ``nft -j list table``;
    empty when the table does not exist."""
    proc = nsops.run_inside(
        session_ns,
        ["nft", "-j", "list", "table", "bridge", TABLE],
        capture_output=True,
        timeout=10,
    )
    if proc.returncode != 0:
        return {}
    table: Table = {}
    for item in json.loads(proc.stdout)["nftables"]:
        if "chain" in item:
            table.setdefault(str(item["chain"]["name"]), [])
        elif "rule" in item:
            table.setdefault(str(item["rule"]["chain"]), []).append(item["rule"])
    return table


def read_guard(session_ns: str, chain: str, tag: str) -> GuardState:
    """The guard chain ``chain`` and the jumps into it carrying ``tag``, read back."""
    return guard_in(read_table(session_ns), chain, tag)


def guard_in(table: Table, chain: str, tag: str) -> GuardState:
    """:func:`read_guard` from a table already read (one listing for every VM of a session)."""
    jumps = tuple(
        str(_match_value(rule))
        for rule in table.get("prerouting", [])
        if rule.get("comment") == tag and _jump_target(rule) == chain
    )
    rules = None
    if chain in table:
        rules = tuple((str(r.get("comment", "")), _match_value(r)) for r in table[chain])
    return GuardState(jumps, rules)


def expected_rules(guard: PortGuard) -> tuple[tuple[str, str], ...]:
    """The (comment, matches) of each rule :func:`render` puts in the chain, in the form
    :func:`read_guard` reads them back."""
    rules = [(r.reason, r.readback) for r in guard_rules(guard)]
    if guard.dscp_mark is not None:
        rules += [
            ("dscp-mark", f"ip dscp {guard.dscp_mark}"),
            ("dscp-mark", f"ip6 dscp {guard.dscp_mark}"),
        ]
    return tuple(rules)


def _jump_target(rule: dict[str, Any]) -> str | None:
    for expr in rule.get("expr", []):
        if isinstance(expr, dict) and "jump" in expr:
            return str(expr["jump"]["target"])
    return None


def _match_value(rule: dict[str, Any]) -> str:
    """What the rule's matches compare with, as text: each match's value (a set as its
    sorted members), after ``!=`` when it must differ, space-separated; for a DSCP mark,
    ``<protocol> dscp <number>`` (nft prints known code points by name). nft hides the
    matches a later one implies (``ether type ip`` before ``ip saddr``)."""
    parts = []
    for expr in rule.get("expr", []):
        if isinstance(expr, dict) and "match" in expr:
            op = expr["match"].get("op", "==")
            raw = expr["match"].get("left", {}).get("payload", {})
            value = _element(expr["match"]["right"], int(raw.get("len", 0)) if "base" in raw else 0)
            parts.append(value if op == "==" else f"{op} {value}")
        if isinstance(expr, dict) and "mangle" in expr:
            payload = expr["mangle"]["key"].get("payload", {})
            try:
                mark: object = Dscp.parse(expr["mangle"]["value"]).value
            except UnitError:
                mark = expr["mangle"]["value"]
            parts.append(f"{payload.get('protocol')} {payload.get('field')} {mark}")
    return " ".join(parts)


def _element(value: object, raw_bits: int = 0) -> str:
    """A match's value as text; a raw payload's (``raw_bits`` wide: ``@th,64,128``) in hex
    with every digit, or as an IPv6 address when 128 bits wide."""
    if isinstance(value, dict) and "set" in value:
        return ",".join(sorted(_element(e, raw_bits) for e in value["set"]))
    if isinstance(value, dict) and "prefix" in value:
        return f"{value['prefix']['addr']}/{value['prefix']['len']}"
    if raw_bits and isinstance(value, (int, str)):
        number = value if isinstance(value, int) else int(value, 0)  # nft: hex past 64 bits
        if raw_bits == 128:
            return str(ipaddress.IPv6Address(number))
        return f"0x{number:0{raw_bits // 4}x}"
    return str(value)


def drop_counters(session_ns: str, chain: str) -> dict[str, int]:
    """Packets dropped by each guard rule of ``chain``, by reason."""
    out = dict.fromkeys(DROP_REASONS, 0)
    for rule in _rules(session_ns, chain):
        reason = rule.get("comment")
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and "counter" in expr and reason in out:
                out[str(reason)] += int(expr["counter"]["packets"])
    return out


def remove_guard(session_ns: str, chain: str, tag: str) -> None:
    """Delete the jumps carrying ``tag`` and the VM's chain, in one nft transaction;
    absent parts are fine."""
    if not nsops.exists(session_ns):
        return
    lines = [
        f"delete rule bridge {TABLE} prerouting handle {rule['handle']}"
        for rule in _rules(session_ns, "prerouting")
        if rule.get("comment") == tag
    ]
    if _chain_exists(session_ns, chain):
        lines += [f"flush chain bridge {TABLE} {chain}", f"delete chain bridge {TABLE} {chain}"]
    if not lines:
        return
    proc = nsops.run_inside(
        session_ns,
        ["nft", "-f", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        timeout=10,
    )
    if proc.returncode != 0:
        raise DataplaneError(f"nftables refused to remove the guard {chain}: {proc.stderr.strip()}")


def _chain_exists(session_ns: str, chain: str) -> bool:
    proc = nsops.run_inside(
        session_ns,
        ["nft", "list", "chain", "bridge", TABLE, chain],
        capture_output=True,
        timeout=10,
    )
    return proc.returncode == 0
