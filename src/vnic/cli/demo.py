"""``vnic demo``: the README's first command (root); the demo itself is :mod:`vnic.lab.demo`."""

from pathlib import Path
from typing import Annotated

import typer

from vnic.cli.common import database_url, out, run


def demo(
    profiles_dir: Annotated[
        Path, typer.Option("--profiles", help="Directory of sample profiles.")
    ] = Path("examples/demo"),
    hosts: Annotated[
        int,
        typer.Option(
            "--hosts",
            help="Then a session stretched over this many emulated hosts "
            "(2 to 8; PostgreSQL, a manager, an agent per host); 0: not.",
        ),
    ] = 0,
) -> None:
    """Launch a shaped demo session (default, rule, override), measure each VM both ways, tear it down. Root."""
    from vnic.lab.demo import run_demo
    from vnic.manager.service import Service
    from vnic.store.db import Database

    def body() -> None:
        if hosts:
            from vnic.lab.demo_hosts import check_hosts

            check_hosts(hosts)  # before anything runs
        run_demo(Service(Database(database_url())), profiles_dir, out.console)
        if hosts:
            from vnic.lab.demo_hosts import run_demo_hosts

            out.console.print()
            run_demo_hosts(hosts, out.console)

    run(body)
