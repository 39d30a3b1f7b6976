"""`vnic top`'s table from plain samples: idle, unlimited and unmeasured vNICs included."""

from __future__ import annotations

import dataclasses

from rich.console import Console

from vnic.agent.metrics import DirectionSample, VnicSample
from vnic.cli.render import top_table as table


def test_table_shows_rates_drops_latency_and_gaps() -> None:
    busy = DirectionSample(
        bytes=5000,
        packets=5,
        drops={"rate_limit": 3, "queue_overflow": 0, "emulated_loss": 1, "anti_spoofing": 0},
        rate_bps=19_600_000.0,
        profile_rate_bps=20_000_000,
    )
    idle = DirectionSample(rate_bps=0.0)
    stats = [
        dataclasses.asdict(VnicSample("lab", "a", {"campus": 2}, busy, idle, 0.00123, 1)),
        dataclasses.asdict(VnicSample("lab", "b", {}, DirectionSample(), DirectionSample())),
    ]
    console = Console(width=200, record=True)
    console.print(table("lab", stats))
    text = console.export_text()
    assert "19.6Mbit" in text and "20Mbit" in text and "unlimited" in text
    assert "rate limit 3, emulated loss 1" in text
    assert "1.23 ms" in text and "campus r2" in text
    assert "0bit" in text  # idle: measured zero, not missing
