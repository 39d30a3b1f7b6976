"""``vnic top SESSION``: the live per-vNIC table (a row per vNIC of every VM, with its
network), refreshed in place."""

import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from vnic.cli.common import backend, out, run
from vnic.cli.render import top_table


def top(
    session: str,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between updates.")] = 1.0,
    count: Annotated[
        int, typer.Option("--count", help="Updates to show, then exit (0: until Ctrl-C).")
    ] = 0,
) -> None:
    """Live table of a session, a row per vNIC: rates against the profile, drops by cause,
    latency."""

    def body() -> None:
        run_top(
            session, backend().stats_source(session), out.console, interval=interval, count=count
        )

    run(body)


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
    from rich.live import Live

    source(session)
    shown = 0
    with Live(console=console, auto_refresh=False) as live:
        while count == 0 or shown < count:
            time.sleep(interval)
            live.update(top_table(session, source(session)), refresh=True)
            shown += 1
