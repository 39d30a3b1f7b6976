"""The ``vnic`` command: a thin client of :class:`vnic.manager.service.Service`.

Every command that shows data takes ``--json``. Errors go to stderr, name the
field, the value and what was expected, and exit with status 2; a failed
command changes nothing.

This module is the root: its global options and :func:`main` (the console script).
The commands live one module per group (:mod:`vnic.cli.profile`, ``session``, ``vm``,
``tokens``, ``db``, ``bench``, ``servers``, ``doctor``, ``demo``, ``top``, ``live``) and are
registered here, in the order ``vnic --help`` lists them. Starting is cheap: those
modules import only typer, rich and the standard library; what a command needs
(SQLAlchemy, FastAPI, pyroute2, httpx, the service) is imported when it runs.
"""

from typing import Annotated

import typer

from vnic.cli import bench, db, demo, doctor, live, profile, servers, session, tokens, top, vm
from vnic.cli.common import state

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Virtual NICs with named network profiles.",
)


@app.callback()
def _root(
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            envvar="VNIC_DATABASE_URL",
            help="Database URL (default: SQLite file under VNIC_HOME).",
        ),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            envvar="VNIC_SERVER",
            help="URL of a running manager (vnic serve); default: work embedded, on the database.",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="VNIC_TOKEN", help="API token for --server."),
    ] = None,
) -> None:
    state.database_url = database
    state.server = server
    state.token = token
    state.backend = None


# Commands of their own, then the groups (typer lists them in this order).
app.command("doctor")(doctor.doctor)
app.command("demo")(demo.demo)
app.command("serve")(servers.serve)
app.command("agent")(servers.agent_command)
app.command("top")(top.top)
app.command("audit")(live.audit)
vm.app.command("adjust")(live.vm_adjust)
session.app.command("controller")(live.session_controller)
app.add_typer(profile.app, name="profile")
app.add_typer(session.app, name="session")
app.add_typer(vm.app, name="vm")
app.add_typer(db.app, name="db")
app.add_typer(bench.app, name="bench")
app.add_typer(tokens.app, name="token")
app.add_typer(live.scenario_app, name="scenario")


def main() -> None:
    """The console script ``vnic``."""
    app()


if __name__ == "__main__":
    main()
