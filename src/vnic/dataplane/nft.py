"""Port guards with nftables (bridge family) in a session namespace.

One table ``bridge vnic`` per session namespace; its ``prerouting`` chain
jumps to one chain per VM port (``vm_<port>``), and that jump carries the VM's
owner tag as its comment so it is found and removed by ownership.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

from vnic.dataplane import namespaces as nsops
from vnic.errors import DataplaneError
from vnic.model.units import Dscp, UnitError
from vnic.plan.model import PortGuard

TABLE = "vnic"
DROP_REASONS = ("spoof-mac", "spoof-arp", "spoof-ipv4", "spoof-ipv6")


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
        f'add rule bridge {TABLE} {c} ether saddr != {ident.mac} counter drop comment "spoof-mac"',
        f'add rule bridge {TABLE} {c} ether type arp arp saddr ether != {ident.mac} counter drop comment "spoof-arp"',
        f'add rule bridge {TABLE} {c} ether type arp arp saddr ip != {ident.ipv4} counter drop comment "spoof-arp"',
        f'add rule bridge {TABLE} {c} ether type ip ip saddr != {ident.ipv4} counter drop comment "spoof-ipv4"',
        f'add rule bridge {TABLE} {c} ether type ip6 ip6 saddr != {{ ::, fe80::/10, {ident.ipv6} }} counter drop comment "spoof-ipv6"',
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
    """The (comment, value matched against) of each rule :func:`render` puts in the chain,
    in the form :func:`read_guard` reads them back."""
    ident = guard.identity
    rules = [
        ("spoof-mac", ident.mac),
        ("spoof-arp", ident.mac),
        ("spoof-arp", ident.ipv4),
        ("spoof-ipv4", ident.ipv4),
        ("spoof-ipv6", ",".join(sorted(["::", "fe80::/10", ident.ipv6]))),
    ]
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
    """What the rule's first match compares with, as text (a set as its sorted members);
    for a DSCP mark, ``<protocol> dscp <number>`` (nft prints known code points by name)."""
    for expr in rule.get("expr", []):
        if isinstance(expr, dict) and "match" in expr:
            return _element(expr["match"]["right"])
        if isinstance(expr, dict) and "mangle" in expr:
            payload = expr["mangle"]["key"].get("payload", {})
            try:
                value: object = Dscp.parse(expr["mangle"]["value"]).value
            except UnitError:
                value = expr["mangle"]["value"]
            return f"{payload.get('protocol')} {payload.get('field')} {value}"
    return ""


def _element(value: object) -> str:
    if isinstance(value, dict) and "set" in value:
        return ",".join(sorted(_element(e) for e in value["set"]))
    if isinstance(value, dict) and "prefix" in value:
        return f"{value['prefix']['addr']}/{value['prefix']['len']}"
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
