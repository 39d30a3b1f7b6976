"""``vnic profile``: define and inspect profiles."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from vnic.cli import render
from vnic.cli.common import JsonFlag, dispatcher, emit_json, out, run, service

app = typer.Typer(no_args_is_help=True, help="Define and inspect profiles.")


@app.command("apply")
def profile_apply(
    files: Annotated[
        list[str],
        typer.Option("-f", "--file", help="YAML/JSON file, directory, or - for stdin. Repeatable."),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Create or update profiles from files (idempotent: unchanged profiles keep their revision)."""

    def body() -> None:
        from vnic.manager import views
        from vnic.model.documents import parse_documents, read_documents

        specs = parse_documents(read_documents(files))
        results, changes = service().apply_profiles_live(specs, dispatcher("netns"))
        if as_json:
            emit_json(
                {
                    "profiles": [r.__dict__ for r in results],
                    "changes": [views.change_json(c) for c in changes],
                }
            )
            return
        for r in results:
            out.print(f"profile {r.name}: {r.action} (revision {r.revision})", markup=False)
        for line in render.change_lines(changes):
            out.print(line, markup=False)

    run(body)


@app.command("list")
def profile_list(as_json: JsonFlag = False) -> None:
    """List profiles with their current revision and users."""

    def body() -> None:
        infos = service().list_profiles()
        if as_json:
            from vnic.manager import views

            emit_json([views.profile_json(p) for p in infos])
            return
        out.print(render.profiles_table(infos))

    run(body)


@app.command("show")
def profile_show(
    name: str,
    revision: Annotated[
        int | None, typer.Option("--revision", "-r", help="Show an older revision.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show a profile document (current revision unless --revision)."""

    def body() -> None:
        p = service().get_profile(name, revision)
        if as_json:
            from vnic.manager import views

            emit_json(views.profile_json(p))
            return
        from vnic.model.documents import dump_yaml

        out.print(f"# profile {p.name}, revision {p.revision}", markup=False)
        out.print(dump_yaml([p.document]).rstrip(), markup=False)
        if p.users:
            out.print("# used by: " + "; ".join(p.users), markup=False)

    run(body)


@app.command("history")
def profile_history(name: str, as_json: JsonFlag = False) -> None:
    """List every revision of a profile."""

    def body() -> None:
        revs = service().history(name)
        if as_json:
            emit_json(
                [
                    {"revision": r.revision, "created_at": r.created_at, "document": r.document}
                    for r in revs
                ]
            )
            return
        out.print(render.history_table(revs))

    run(body)


@app.command("delete")
def profile_delete(name: str) -> None:
    """Delete a profile and its revisions (refused while a session or VM uses it)."""

    def body() -> None:
        service().delete_profile(name)
        out.print(f"profile {name}: deleted", markup=False)

    run(body)


@app.command("export")
def profile_export(
    names: Annotated[
        list[str] | None, typer.Argument(help="Profiles to export (default: all).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write to this file instead of stdout.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Export current profile documents, ready for ``profile apply -f``."""

    def body() -> None:
        from vnic.model.documents import dump_yaml

        docs = service().export_profiles(names or [])
        text = json.dumps(docs, indent=2) + "\n" if as_json else dump_yaml(docs) if docs else "[]\n"
        if output:
            output.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)

    run(body)


@app.command("fields")
def profile_fields(as_json: JsonFlag = False) -> None:
    """List every profile field, its unit and what it does."""
    if as_json:
        from vnic.model.fields import FIELDS

        emit_json(
            [
                {"field": f.path, "unit": f.unit, "expected": f.expected, "doc": f.doc}
                for f in FIELDS.values()
            ]
        )
        return
    out.print(render.fields_table())
