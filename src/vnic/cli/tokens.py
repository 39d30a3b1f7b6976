"""``vnic token``: API tokens (admin, owner, reader), embedded or through ``--server``."""

from typing import Annotated

import typer

from vnic.cli import render
from vnic.cli.common import JsonFlag, backend, emit_json, out, run

app = typer.Typer(no_args_is_help=True, help="API tokens (admin, owner, reader).")


@app.command("create")
def token_create(
    name: str,
    role: Annotated[str, typer.Option("--role", help="admin, owner or reader.")],
    as_json: JsonFlag = False,
) -> None:
    """Create a token and print its secret (shown once). Embedded, this is how the
    first admin token is made."""

    def body() -> None:
        info, secret = backend().create_token(name, role)
        if as_json:
            from vnic.manager import views

            emit_json({**views.token_json(info), "secret": secret})
        else:
            out.print(f"token {info.name} ({info.role}): {secret}", markup=False)

    run(body)


@app.command("list")
def token_list(as_json: JsonFlag = False) -> None:
    """List tokens (names and roles; secrets are never stored)."""

    def body() -> None:
        infos = backend().list_tokens()
        if as_json:
            from vnic.manager import views

            emit_json([views.token_json(t) for t in infos])
            return
        out.print(render.tokens_table(infos))

    run(body)


@app.command("revoke")
def token_revoke(name: str) -> None:
    """Revoke a token: calls with it are refused from now on."""

    def body() -> None:
        backend().revoke_token(name)
        out.print(f"token {name}: revoked", markup=False)

    run(body)
