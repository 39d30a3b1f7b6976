"""``vnic db``: the central database."""

import typer

from vnic.cli.common import database_url, out, run

app = typer.Typer(no_args_is_help=True, help="The central database.")


@app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the newest revision."""

    def body() -> None:
        from vnic.manager.service import Service
        from vnic.store.db import Database

        svc = Service(Database(database_url()))
        out.print(
            f"database {svc.db.engine.url.render_as_string(hide_password=True)}: up to date",
            markup=False,
        )

    run(body)
