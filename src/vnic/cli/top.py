"""``vnic top SESSION``: the live per-vNIC table, refreshed in place."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _rate(bps: float | None) -> str:
    """A rate for people: 3 significant digits, decimal units (0 and tiny rates included)."""
    if bps is None:
        return "-"
    for unit, scale in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g}{unit}"
    return f"{bps:.0f}bit"


def _drops(d: Mapping[str, Any]) -> str:
    parts = [f"{cause.replace('_', ' ')} {n}" for cause, n in d["drops"].items() if n]
    return ", ".join(parts) or "0"


def table(session: str, stats: list[dict[str, Any]]) -> Table:
    t = Table(
        "vm",
        "dir",
        "rate now",
        "profile rate",
        "bytes",
        "packets",
        "drops",
        "rtt",
        "rev",
        "drift",
        title=f"session {session} — {time.strftime('%H:%M:%S')}",
        title_justify="left",
    )
    for s in sorted(stats, key=lambda s: str(s["vm"])):
        for i, direction in enumerate(("egress", "ingress")):
            d = s[direction]
            rtt = s["latency_seconds"]
            t.add_row(
                s["vm"] if i == 0 else "",
                direction,
                _rate(d["rate_bps"]),
                _rate(d["profile_rate_bps"]) if d["profile_rate_bps"] else "unlimited",
                str(d["bytes"]),
                str(d["packets"]),
                _drops(d),
                (f"{rtt * 1000:.2f} ms" if rtt is not None else "-") if i == 0 else "",
                ",".join(f"{p} r{r}" for p, r in sorted(s["revisions"].items())) if i == 0 else "",
                str(s["drift"]) if i == 0 else "",
            )
    return t


def run_top(
    session: str,
    source: Callable[[str], list[dict[str, Any]]],
    console: Console,
    *,
    interval: float = 1.0,
    count: int = 0,
) -> None:
    """Show ``source(session)`` every ``interval`` seconds, ``count`` times (0: forever).

    The first reading only primes the rates; the table starts from the second.
    """
    source(session)
    shown = 0
    with Live(console=console, auto_refresh=False) as live:
        while count == 0 or shown < count:
            time.sleep(interval)
            live.update(table(session, source(session)), refresh=True)
            shown += 1
