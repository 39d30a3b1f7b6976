"""The ``vnic`` command: a thin client of :class:`vnic.manager.service.Service`.

Every command that shows data takes ``--json``. Errors go to stderr, name the
field, the value and what was expected, and exit with status 2; a failed
command changes nothing.

This module is the root: its global options, the table of commands and :func:`main`
(the console script). The commands live one module per group (:mod:`vnic.cli.profile`,
``session``, ``vm``, ``tokens``, ``db``, ``bench``, ``servers``, ``doctor``, ``demo``,
``top``, ``live``).

Starting is cheap, because nothing is imported before it is needed:

* a command's module is imported only when that command runs (or its ``--help`` is
  asked for): ``vnic --help`` lists the commands from :data:`COMMANDS` alone;
* what a command needs (SQLAlchemy, FastAPI, pyroute2, httpx, the service) is imported
  inside it, when it runs;
* help is click's plain text, not Typer's rich panels: Typer's rich help imports
  Markdown, syntax highlighting and tracebacks (about 17 times the interpreter's own
  start here, more than the whole of ``vnic --help`` may take; ``vnic bench startup``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any, cast

import typer
from typer import _click as click
from typer.core import TyperCommand, TyperGroup

from vnic.cli.common import state


@dataclass(frozen=True)
class Entry:
    """One command of the root: where it is, and its line in ``vnic --help``."""

    #: Imports the command's module and returns its Typer app (a group) or its function.
    load: Callable[[], typer.Typer | Callable[..., Any]]
    #: The one line ``vnic --help`` shows (also the command's ``short_help``).
    summary: str


def _doctor() -> Callable[..., Any]:
    from vnic.cli import doctor

    return doctor.doctor


def _demo() -> Callable[..., Any]:
    from vnic.cli import demo

    return demo.demo


def _serve() -> Callable[..., Any]:
    from vnic.cli import servers

    return servers.serve


def _agent() -> Callable[..., Any]:
    from vnic.cli import servers

    return servers.agent_command


def _top() -> Callable[..., Any]:
    from vnic.cli import top

    return top.top


def _audit() -> Callable[..., Any]:
    from vnic.cli import live

    return live.audit


def _profile() -> typer.Typer:
    from vnic.cli import profile

    return profile.app


def _session() -> typer.Typer:
    from vnic.cli import live, session

    # ``session controller`` is a runtime operation; its code lives with the others.
    session.app.command("controller")(live.session_controller)
    return session.app


def _vm() -> typer.Typer:
    from vnic.cli import live, vm

    # ``vm adjust`` likewise (see _session).
    vm.app.command("adjust")(live.vm_adjust)
    return vm.app


def _db() -> typer.Typer:
    from vnic.cli import db

    return db.app


def _bench() -> typer.Typer:
    from vnic.cli import bench

    return bench.app


def _token() -> typer.Typer:
    from vnic.cli import tokens

    return tokens.app


def _host() -> typer.Typer:
    from vnic.cli import host

    return host.app


def _scenario() -> typer.Typer:
    from vnic.cli import live

    return live.scenario_app


#: The root's commands, in the order ``vnic --help`` lists them: commands of their own,
#: then the groups.
COMMANDS: dict[str, Entry] = {
    "doctor": Entry(_doctor, "What this kernel can do, and which fields each driver honours."),
    "demo": Entry(_demo, "Launch a shaped demo session, measure each VM, tear it down."),
    "serve": Entry(_serve, "Run the session manager: REST API, UI, metrics, controller."),
    "agent": Entry(_agent, "Run this host's agent (for --agent URL, or --manager URL)."),
    "top": Entry(_top, "Live per-vNIC table of a session: rates, drops, latency."),
    "audit": Entry(_audit, "The audit log of runtime changes."),
    "profile": Entry(_profile, "Define and inspect profiles."),
    "session": Entry(_session, "Sessions: isolated networks with a profile policy."),
    "vm": Entry(_vm, "VMs in a session and their effective profiles."),
    "db": Entry(_db, "The central database."),
    "bench": Entry(_bench, "Benchmarks (root): JSON out plus a short table."),
    "token": Entry(_token, "API tokens (admin, owner, reader)."),
    "host": Entry(_host, "Hypervisor hosts: add, list, show, cordon, drain, remove."),
    "scenario": Entry(_scenario, "Scenarios: profile changes on a timeline, or a bandwidth trace."),
}


@functools.cache
def load_command(name: str) -> click.Command:
    """The click command ``name`` of :data:`COMMANDS`, its module imported (once per
    process)."""
    entry = COMMANDS[name]
    target = entry.load()
    command: click.Command
    if isinstance(target, typer.Typer):
        command = typer.main.get_group(target)
    else:
        single = typer.Typer(add_completion=False)
        single.command(name)(target)
        command = typer.main.get_command(single)
    command.name = name
    command.short_help = entry.summary
    _plain_help(command)
    return command


def _plain_help(command: click.Command) -> None:
    """Click's plain help for ``command`` and everything under it (see the module doc)."""
    if isinstance(command, TyperGroup | TyperCommand):
        command.rich_markup_mode = None
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            _plain_help(sub)


class _LazyCommands(Mapping[str, click.Command]):
    """:data:`COMMANDS` as click's name -> command mapping, loading a command when it is
    looked up."""

    def __getitem__(self, name: str) -> click.Command:
        if name not in COMMANDS:
            raise KeyError(name)
        return load_command(name)

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


class LazyGroup(TyperGroup):
    """The root group: knows its commands by name (:data:`COMMANDS`) and imports one only
    when it is used (Typer's own lookup, listing and "did you mean" read the mapping)."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = cast(MutableMapping[str, click.Command], _LazyCommands())

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The summaries, not the commands: listing them must import none.
        with formatter.section("Commands"):
            formatter.write_dl([(name, entry.summary) for name, entry in COMMANDS.items()])


app = typer.Typer(
    cls=LazyGroup,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
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


def main() -> None:
    """The console script ``vnic``."""
    app()


if __name__ == "__main__":
    main()
