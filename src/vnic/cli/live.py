"""``vnic`` commands of dynamic adjustment: runtime adjustments, the audit log, a session's
controller, and scenarios. Registered on the main app by :mod:`vnic.cli.app`
(``vm adjust``, ``session controller``, ``audit``, ``scenario``).

Embedded (no ``--server``) they work on the database and this host's agent
directly; with ``--server`` they call the manager's API. Either way the same
operations (:class:`~vnic.api.live.LiveOps`, :meth:`vnic.cli.backend.Backend.live`) run,
so the output is the same. A scenario needs a process that lives as long as it plays: with
``--server`` that is the manager; embedded, ``vnic scenario start`` plays it
in the foreground until it ends (Ctrl-C stops it and removes its adjustments).
"""

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from vnic.cli import common as cli
from vnic.cli import render

if TYPE_CHECKING:
    from vnic.api.live import LiveOps
    from vnic.client.manager import RemoteLive

scenario_app = typer.Typer(
    no_args_is_help=True, help="Scenarios: profile changes on a timeline, or a bandwidth trace."
)


def live() -> "LiveOps | RemoteLive":
    """The operations: over HTTP with --server, else embedded on this host's agent."""
    return cli.backend().live()


def _read_one(file: str, what: str) -> Any:
    from vnic.errors import InvalidInput
    from vnic.model.loading import DocumentError, load_yaml

    try:
        text = (
            Path(file).read_text(encoding="utf-8")
            if file != "-"
            else typer.get_text_stream("stdin").read()
        )
    except OSError as exc:
        raise InvalidInput.one("--file", file, f"a readable file ({exc.strerror})") from None
    try:
        return load_yaml(text)  # strict: duplicate keys, aliases, deep nesting refused
    except DocumentError as exc:
        raise InvalidInput.one("--file", file, f"{what} in YAML or JSON ({exc})") from None


def vm_adjust(
    session: str,
    name: Annotated[str, typer.Argument(help="VM, or VM/NIC for one vNIC (VM alone: eth0).")],
    assignments: Annotated[
        list[str] | None, typer.Argument(help="FIELD=VALUE: fields the adjustment sets.")
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="Switch to this profile's values.")
    ] = None,
    for_: Annotated[
        str | None, typer.Option("--for", help="Lifetime, e.g. 60s (default: until cleared).")
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit log).")] = (
        "set by hand"
    ),
    clear: Annotated[
        bool, typer.Option("--clear", help="Remove the adjustment instead of setting it.")
    ] = False,
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="Whose adjustment: user, or (with --clear) rule:N, scenario:N, feedback.",
        ),
    ] = "user",
    as_json: cli.JsonFlag = False,
) -> None:
    """Adjust a vNIC at runtime (eth0 unless VM/NIC): the top resolution layer, with an
    expiry, audited and live."""

    def body() -> None:
        from vnic.api.live import AdjustmentSet
        from vnic.model.profile import parse_assignments, values_to_document

        ops = live()
        vm, nic = cli.vm_and_nic(name)
        if clear:
            result = ops.clear(session, vm, source, nic)
        else:
            values = parse_assignments(assignments) if assignments else {}
            request = AdjustmentSet.model_validate(
                {
                    "set": values_to_document(values) or None,
                    "profile": profile,
                    "for": for_,
                    "reason": reason,
                    "nic": nic,
                }
            )
            result = ops.adjust(session, vm, source, request)
        if as_json:
            cli.emit_json(result)
            return
        fields = result.get("fields") or {}
        if not fields:
            cli.out.print(f"vm {session}/{name}: no effective change", markup=False)
        for path, change in fields.items():
            cli.out.print(
                f"vm {session}/{name}: {path} {render.shown(change['old'])} -> "
                f"{render.shown(change['new'])}",
                markup=False,
            )
        for change in result.get("changes") or []:
            for line in change.get("kernel") or []:
                cli.out.print(f"  kernel: {line}", markup=False)

    cli.run(body)


def audit(
    session: Annotated[str | None, typer.Option("--session", help="Only this session.")] = None,
    vm: Annotated[str | None, typer.Option("--vm", help="Only this VM.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Newest N entries.")] = 50,
    as_json: cli.JsonFlag = False,
) -> None:
    """The audit log of runtime changes: when, who or what, why, old and new values."""

    def body() -> None:
        entries = live().audit(session, vm, limit)
        if as_json:
            cli.emit_json(entries)
            return
        cli.out.print(render.audit_table(entries))

    cli.run(body)


def session_controller(
    session: str,
    file: Annotated[
        str | None,
        typer.Option(
            "-f", "--file", help="Set rules and feedback limits from YAML/JSON (- stdin)."
        ),
    ] = None,
    show_state: Annotated[
        bool, typer.Option("--state", help="Show what the controller is doing (with --server).")
    ] = False,
    as_json: cli.JsonFlag = False,
) -> None:
    """Show or set a session's controller: threshold rules and feedback limits."""

    def body() -> None:
        ops = live()
        if file is not None:
            result = ops.set_controller(session, _read_one(file, "a controller document"))
        elif show_state:
            result = ops.controller_state(session)
        else:
            result = ops.controller(session)
        if as_json or show_state:
            cli.emit_json(result)
        else:
            import yaml

            cli.out.print(yaml.safe_dump(result, sort_keys=False) or "{}", markup=False, end="")

    cli.run(body)


@scenario_app.command("start")
def scenario_start(
    session: str,
    file: Annotated[
        str, typer.Option("-f", "--file", help="The scenario, YAML or JSON (- stdin).")
    ],
    as_json: cli.JsonFlag = False,
) -> None:
    """Start a scenario on the session's VMs (embedded: plays until it ends; Ctrl-C stops it)."""

    def body() -> None:
        ops = live()
        doc = _read_one(file, "a scenario")
        if isinstance(doc, dict) and file != "-":
            doc = _inline_trace(doc, Path(file).parent)
        started = ops.start_scenario(session, doc)
        name = started["name"]
        if cli.state.server:
            cli.emit_json(started) if as_json else _print_scenario(started)
            return
        cli.out.print(f"scenario {name}: playing on {', '.join(started['vms'])}", markup=False)
        try:
            while (now := ops.scenario(session, name, "show"))["state"] in ("running", "paused"):
                time.sleep(0.2)
        except KeyboardInterrupt:
            now = ops.scenario(session, name, "stop")
        cli.emit_json(now) if as_json else _print_scenario(now)

    cli.run(body)


def _inline_trace(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    """A trace named by file (relative to the scenario's file) is sent as its text: the
    manager reads no files a request names."""
    trace = doc.get("trace")
    if isinstance(trace, str) and "\n" not in trace.strip():
        path = base / trace.strip()
        if path.is_file():
            return {**doc, "trace": path.read_text(encoding="utf-8")}
    return doc


def _scenario_action(action: str) -> Any:
    def command(session: str, name: str, as_json: cli.JsonFlag = False) -> None:
        def body() -> None:
            result = live().scenario(session, name, action)
            cli.emit_json(result) if as_json else _print_scenario(result)

        cli.run(body)

    command.__doc__ = {
        "pause": "Pause a scenario (its timeline stops; what it set stays).",
        "resume": "Resume a paused scenario where it stopped.",
        "stop": "Stop a scenario and remove what it set.",
        "show": "Show a scenario's state.",
    }[action]
    return command


for _action in ("pause", "resume", "stop", "show"):
    scenario_app.command(_action)(_scenario_action(_action))


@scenario_app.command("list")
def scenario_list(session: str, as_json: cli.JsonFlag = False) -> None:
    """Scenarios of a session (those the manager runs)."""

    def body() -> None:
        found = live().scenarios(session)
        if as_json:
            cli.emit_json(found)
            return
        for s in found:
            _print_scenario(s)

    cli.run(body)


def _print_scenario(s: dict[str, Any]) -> None:
    cli.out.print(render.scenario_line(s), markup=False)
