"""``vnic demo``: the README's first command (root); the demo itself is :mod:`vnic.lab.demo`."""

from pathlib import Path
from typing import Annotated

import typer

from vnic.cli.common import database_url, out, run


def demo(
    profiles_dir: Annotated[
        Path, typer.Option("--profiles", help="Directory of sample profiles.")
    ] = Path("examples/demo"),
) -> None:
    """Launch a shaped demo session (default, rule, override), measure each VM both ways, tear it down. Root."""
    from vnic.lab.demo import run_demo
    from vnic.manager.service import Service
    from vnic.store.db import Database

    run(lambda: run_demo(Service(Database(database_url())), profiles_dir, out.console))
