"""What every ``vnic`` command module shares: the global options' state, the backend
(embedded or a manager over HTTP), the consoles, ``--json`` output and :func:`run`.

Import cost matters here: this module is imported when the CLI starts, so it imports
only the standard library and typer. Rich's console is made on the first print (see
:class:`LazyConsole`); the service, the database, the manager's client and the error
types are imported the first time a command needs them (see :func:`backend` and
:func:`run`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from vnic.agent.port import AgentPort
    from vnic.cli.backend import Backend
    from vnic.client.manager import ManagerClient
    from vnic.manager.service import Service


class LazyConsole:
    """A rich :class:`~rich.console.Console` made on its first use: importing rich costs
    about twice the interpreter's own start, and ``vnic --help`` prints nothing with it."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        """:meth:`rich.console.Console.print`."""
        self.console.print(*objects, **options)


# Off a terminal (pipes, CI logs) rich would wrap at 80 columns; tables are wider.
out = LazyConsole(highlight=False, width=None if sys.stdout.isatty() else 160)
err = LazyConsole(stderr=True, highlight=False, soft_wrap=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


class State:
    """The root command's options (``--database``, ``--server``, ``--token``) and the
    backend made from them, once per command."""

    database_url: str | None = None
    server: str | None = None
    token: str | None = None
    backend: Backend | None = None


state = State()


def backend() -> Backend:
    """The backend: a running manager's API with --server, else embedded on the database."""
    if state.backend is None:
        from vnic.cli.backend import Embedded, Remote

        if state.server:
            state.backend = Remote.connect(state.server, state.token)
        else:
            state.backend = Embedded.open(database_url())
    return state.backend


def service() -> Service | ManagerClient:
    """The service: a running manager's API with --server, else embedded on the database."""
    return backend().service


def database_url() -> str:
    """``--database``, else ``VNIC_DATABASE_URL``, else the SQLite file under VNIC_HOME."""
    if state.database_url:
        return state.database_url
    from vnic.settings import Settings

    return Settings.from_env().database_url


def dispatcher(kind: str) -> AgentPort:
    """Where launches go: this host's agent (embedded), or nowhere here with --server
    (the manager dispatches to its agents)."""
    from vnic.agent.core import local_agent

    if state.server:
        from vnic.agent.client import AgentClient

        # Unused: the manager client ignores the agent argument (this connects nowhere
        # until called, and is never called).
        return AgentClient(state.server, "")
    return local_agent(kind)


def emit_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (dates and service records as the API shows them)."""
    from vnic.manager import views

    sys.stdout.write(json.dumps(data, indent=2, default=views.encode) + "\n")


def run(action: Callable[[], None]) -> None:
    """Run a command body, turning vnic errors into stderr + exit code."""
    try:
        action()
    except Exception as exc:
        # The error types are imported only when something failed: they pull in YAML.
        from vnic.errors import InvalidInput, VnicError, storage_error
        from vnic.model.documents import DocumentErrors

        if isinstance(exc, DocumentErrors):
            err.print(
                "[bold red]error:[/] invalid profile documents; nothing was changed", markup=True
            )
            for origin, sub in exc.per_document:
                for e in sub.errors:
                    err.print(f"  {origin}: {e}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        if isinstance(exc, InvalidInput):
            err.print("[bold red]error:[/] invalid input; nothing was changed", markup=True)
            for e in exc.errors:
                err.print(f"  {e}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        if isinstance(exc, VnicError):
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        # A full disk (file or database) or another refusal of the system: what and
        # where, not a traceback; exit 2 like every error the user can act on.
        full = storage_error(exc, _database_name())
        if full is None and not isinstance(exc, OSError):
            raise  # a bug (or typer.Exit): its traceback is the report
        text = str(full) if full is not None else _os_error(cast(OSError, exc))
        err.print(f"[bold red]error:[/] {text}", markup=True, highlight=False)
        raise typer.Exit(2) from None


def _database_name() -> str:
    try:
        url = database_url()
    except Exception:  # the settings themselves are broken: say less, not fail here
        return "the database"
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///")
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename is not None else ""
    return f"{(exc.strerror or str(exc)).lower()}{where}"


def pairs(items: Sequence[str], option: str) -> dict[str, str]:
    """``KEY=VALUE`` items of ``option`` as a mapping; InvalidInput names a malformed one."""
    found: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            from vnic.errors import InvalidInput

            raise InvalidInput.one(option, item, "KEY=VALUE")
        found[key.strip()] = value.strip()
    return found


def vm_and_nic(name: str) -> tuple[str, str]:
    """``VM`` or ``VM/NIC`` as the commands take it: ``(vm, nic)``, eth0 when no vNIC is
    named; an InvalidInput naming ``name`` for a vNIC name that is not eth0..eth7."""
    from vnic.model.launch import NIC_NAME, PRIMARY_NIC

    vm, slash, nic = name.partition("/")
    if slash and not NIC_NAME.fullmatch(nic):
        from vnic.errors import InvalidInput

        raise InvalidInput.one("name", name, "VM or VM/NIC with a vNIC eth0 .. eth7")
    return vm, nic or PRIMARY_NIC
