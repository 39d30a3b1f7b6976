"""The ``vnic`` command: a thin client of :class:`vnic.manager.service.Service`.

Every command that shows data takes ``--json``. Errors go to stderr, name the
field, the value and what was expected, and exit with status 2; a failed
command changes nothing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.table import Table

from vnic.agent.port import AgentPort
from vnic.client.manager import ManagerClient
from vnic.errors import InvalidInput, VnicError, storage_error
from vnic.manager import views
from vnic.manager.auth import Tokens
from vnic.manager.results import Explanation, VmChange, VmInfo, VmRequest
from vnic.manager.service import Service
from vnic.model.documents import DocumentErrors, dump_yaml, parse_documents, read_documents
from vnic.model.fields import FIELDS
from vnic.model.profile import parse_assignments, values_to_document
from vnic.model.session import AssignmentRule
from vnic.settings import Settings
from vnic.store.db import Database

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Virtual NICs with named network profiles.",
)
profile_app = typer.Typer(no_args_is_help=True, help="Define and inspect profiles.")
session_app = typer.Typer(
    no_args_is_help=True, help="Sessions: isolated networks with a profile policy."
)
vm_app = typer.Typer(no_args_is_help=True, help="VMs in a session and their effective profiles.")
db_app = typer.Typer(no_args_is_help=True, help="The central database.")
app.add_typer(profile_app, name="profile")
app.add_typer(session_app, name="session")
app.add_typer(vm_app, name="vm")
app.add_typer(db_app, name="db")

# Off a terminal (pipes, CI logs) rich would wrap at 80 columns; tables are wider.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


class _State:
    database_url: str | None = None
    server: str | None = None
    token: str | None = None
    service: Service | ManagerClient | None = None


state = _State()


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
    state.service = None


def service() -> Service | ManagerClient:
    """The service: a running manager's API with --server, else embedded on the database."""
    if state.service is None:
        if state.server:
            state.service = ManagerClient(state.server, state.token)
        else:
            state.service = Service(Database(database_url()))
    return state.service


def database_url() -> str:
    return state.database_url or Settings.from_env().database_url


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
    sys.stdout.write(json.dumps(data, indent=2, default=views.encode) + "\n")


def run(action: Callable[[], None]) -> None:
    """Run a command body, turning vnic errors into stderr + exit code."""
    try:
        action()
    except DocumentErrors as exc:
        err.print("[bold red]error:[/] invalid profile documents; nothing was changed", markup=True)
        for origin, sub in exc.per_document:
            for e in sub.errors:
                err.print(f"  {origin}: {e}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    except InvalidInput as exc:
        err.print("[bold red]error:[/] invalid input; nothing was changed", markup=True)
        for e in exc.errors:
            err.print(f"  {e}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    except VnicError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:
        # A full disk (file or database) or another refusal of the system: what and
        # where, not a traceback; exit 2 like every error the user can act on.
        full = storage_error(exc, _database_name())
        if full is None and not isinstance(exc, OSError):
            raise  # a bug: its traceback is the report
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


def _pairs(items: Sequence[str], option: str) -> dict[str, str]:
    out_: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InvalidInput.one(option, item, "KEY=VALUE")
        out_[key.strip()] = value.strip()
    return out_


# ----------------------------------------------------------------------------- profile


@profile_app.command("apply")
def profile_apply(
    files: Annotated[
        list[str],
        typer.Option("-f", "--file", help="YAML/JSON file, directory, or - for stdin. Repeatable."),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Create or update profiles from files (idempotent: unchanged profiles keep their revision)."""

    def body() -> None:
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
        print_changes(changes)

    run(body)


@profile_app.command("list")
def profile_list(as_json: JsonFlag = False) -> None:
    """List profiles with their current revision and users."""

    def body() -> None:
        infos = service().list_profiles()
        if as_json:
            emit_json([views.profile_json(p) for p in infos])
            return
        table = Table("name", "rev", "description", "labels", "used by")
        for p in infos:
            table.add_row(
                p.name,
                str(p.revision),
                p.description,
                ",".join(f"{k}={v}" for k, v in p.labels.items()),
                str(len(p.users)),
            )
        out.print(table)

    run(body)


@profile_app.command("show")
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
            emit_json(views.profile_json(p))
            return
        out.print(f"# profile {p.name}, revision {p.revision}", markup=False)
        out.print(dump_yaml([p.document]).rstrip(), markup=False)
        if p.users:
            out.print("# used by: " + "; ".join(p.users), markup=False)

    run(body)


@profile_app.command("history")
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
        table = Table("rev", "created", "document")
        for r in revs:
            doc = {k: v for k, v in r.document.items() if k != "name"}
            table.add_row(
                str(r.revision), r.created_at.isoformat(timespec="seconds"), json.dumps(doc)
            )
        out.print(table)

    run(body)


@profile_app.command("delete")
def profile_delete(name: str) -> None:
    """Delete a profile and its revisions (refused while a session or VM uses it)."""

    def body() -> None:
        service().delete_profile(name)
        out.print(f"profile {name}: deleted", markup=False)

    run(body)


@profile_app.command("export")
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
        docs = service().export_profiles(names or [])
        text = json.dumps(docs, indent=2) + "\n" if as_json else dump_yaml(docs) if docs else "[]\n"
        if output:
            output.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)

    run(body)


@profile_app.command("fields")
def profile_fields(as_json: JsonFlag = False) -> None:
    """List every profile field, its unit and what it does."""
    if as_json:
        emit_json(
            [
                {"field": f.path, "unit": f.unit, "expected": f.expected, "doc": f.doc}
                for f in FIELDS.values()
            ]
        )
        return
    table = Table("field", "unit", "meaning")
    for f in FIELDS.values():
        table.add_row(f.path, f.unit, f.doc)
    out.print(table)


# ----------------------------------------------------------------------------- session


@session_app.command("create")
def session_create(
    name: str,
    default_profile: Annotated[
        str | None, typer.Option("--default-profile", "-p", help="Profile every VM starts from.")
    ] = None,
    rules: Annotated[
        list[str] | None,
        typer.Option(
            "--rule",
            help="Assignment rule 'profile=P,name=GLOB,role=R,label.K=V,needs=N'; first match wins. Repeatable.",
        ),
    ] = None,
    network_id: Annotated[
        int | None,
        typer.Option("--network-id", help="Network id (VNI 1..16777215); default: lowest free."),
    ] = None,
    no_overrides: Annotated[
        bool, typer.Option("--no-overrides", help="Forbid per-VM overrides.")
    ] = False,
    owner: Annotated[
        str | None,
        typer.Option("--owner", help="Name of the owner token that may run its VMs."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a session with its profile policy."""

    def body() -> None:
        parsed = [AssignmentRule.parse_cli(r, f"--rule[{i}]") for i, r in enumerate(rules or [])]
        info = service().create_session(
            name,
            default_profile=default_profile,
            rules=parsed,
            network_id=network_id,
            overrides_allowed=not no_overrides,
            owner=owner,
        )
        if as_json:
            emit_json(views.session_json(info))
        else:
            out.print(f"session {info.name}: created (network id {info.network_id})", markup=False)

    run(body)


@session_app.command("list")
def session_list(as_json: JsonFlag = False) -> None:
    """List sessions."""

    def body() -> None:
        infos = service().list_sessions()
        if as_json:
            emit_json([views.session_json(s) for s in infos])
            return
        table = Table("name", "network id", "default profile", "rules", "overrides", "vms")
        for s in infos:
            table.add_row(
                s.name,
                str(s.network_id),
                s.policy.default_profile or "-",
                str(len(s.policy.rules)),
                "allowed" if s.policy.overrides_allowed else "forbidden",
                str(len(s.vms)),
            )
        out.print(table)

    run(body)


@session_app.command("show")
def session_show(name: str, as_json: JsonFlag = False) -> None:
    """Show a session's policy and VMs."""

    def body() -> None:
        info = service().get_session(name)
        vms = service().list_vms(name)
        if as_json:
            data = views.session_json(info)
            data["vms"] = [views.vm_json(v) for v in vms]
            emit_json(data)
            return
        out.print(f"session {info.name}  network id {info.network_id}", markup=False)
        out.print(f"  default profile: {info.policy.default_profile or '-'}", markup=False)
        out.print(f"  owner: {info.owner or '-'} (besides admins)", markup=False)
        out.print(
            f"  overrides: {'allowed' if info.policy.overrides_allowed else 'forbidden'}",
            markup=False,
        )
        for i, r in enumerate(info.policy.rules):
            out.print(f"  rule #{i + 1}: {r.describe()} -> {r.profile}", markup=False)
        _vm_table(vms)

    run(body)


@session_app.command("up")
def session_up(
    name: str,
    workers: Annotated[
        int, typer.Option("--workers", help="Launch processes (one per core is best).")
    ] = 2,
    driver: Annotated[str, typer.Option("--driver", help="Driver kind.")] = "netns",
    as_json: JsonFlag = False,
) -> None:
    """Launch every defined VM of the session, in parallel."""

    def body() -> None:
        svc = service()
        pending = [v.name for v in svc.list_vms(name) if v.state == "defined"]
        from vnic.agent.core import local_agent

        outcomes = svc.launch_many(name, pending, driver, workers, agents=local_agent)
        failed = [o for o in outcomes if o.error]
        if as_json:
            emit_json([o.__dict__ for o in outcomes])
        else:
            for o in sorted(outcomes, key=lambda o: o.vm):
                status = f"failed: {o.error}" if o.error else f"running ({o.seconds * 1000:.0f} ms)"
                out.print(f"vm {name}/{o.vm}: {status}", markup=False)
        if failed:
            raise typer.Exit(2)

    run(body)


@session_app.command("down")
def session_down(
    name: str,
    driver: Annotated[str, typer.Option("--driver", help="Driver kind.")] = "netns",
) -> None:
    """Stop every VM of the session and remove its network namespaces, links and qdiscs."""

    def body() -> None:
        stopped = service().session_down(name, dispatcher(driver))
        out.print(f"session {name}: down ({len(stopped)} VMs stopped)", markup=False)

    run(body)


@session_app.command("delete")
def session_delete(
    name: str,
    force: Annotated[bool, typer.Option("--force", help="Also remove the session's VMs.")] = False,
) -> None:
    """Delete a session (refused while it has VMs, unless --force)."""

    def body() -> None:
        removed = service().delete_session(name, force=force)
        extra = f" with VMs {', '.join(removed)}" if removed else ""
        out.print(f"session {name}: deleted{extra}", markup=False)

    run(body)


# ----------------------------------------------------------------------------- vm


def _vm_table(vms: Sequence[VmInfo]) -> None:
    table = Table("vm", "role", "labels", "mac", "override", "state")
    for v in vms:
        override = v.override_profile or ""
        if v.override_patch:
            override = (override + " + " if override else "") + "patch"
        table.add_row(
            v.name,
            v.role or "-",
            ",".join(f"{k}={val}" for k, val in v.labels.items()),
            v.mac or "-",
            override or "-",
            f"{v.state} ({v.driver})" if v.driver else v.state,
        )
    out.print(table)


@vm_app.command("add")
def vm_add(
    session: str,
    name: str,
    role: Annotated[str | None, typer.Option("--role", help="Role, for assignment rules.")] = None,
    labels: Annotated[
        list[str] | None, typer.Option("--label", help="Label KEY=VALUE. Repeatable.")
    ] = None,
    needs: Annotated[
        list[str] | None, typer.Option("--need", help="Declared application need. Repeatable.")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option("--profile", help="Override: use this profile on top of the policy."),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one field, FIELD=VALUE (off removes). Repeatable."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Define a VM in a session; its profile is resolved and its MAC allocated."""

    def body() -> None:
        patch = parse_assignments(sets) if sets else None
        result = service().add_vm(
            VmRequest(
                session=session,
                name=name,
                role=role,
                labels=_pairs(labels or [], "--label"),
                needs=tuple(needs or ()),
                profile=profile,
                patch=patch,
            )
        )
        if as_json:
            emit_json(views.explain_json(result))
        else:
            out.print(f"vm {session}/{name}: added, MAC {result.vm.mac}", markup=False)

    run(body)


@vm_app.command("launch")
def vm_launch(
    session: str,
    name: str,
    role: Annotated[
        str | None, typer.Option("--role", help="Role, for assignment rules (new VMs).")
    ] = None,
    labels: Annotated[
        list[str] | None, typer.Option("--label", help="Label KEY=VALUE (new VMs). Repeatable.")
    ] = None,
    needs: Annotated[
        list[str] | None,
        typer.Option("--need", help="Declared application need (new VMs). Repeatable."),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="Override profile (new VMs).")
    ] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="Override FIELD=VALUE (new VMs). Repeatable.")
    ] = None,
    driver: Annotated[
        str, typer.Option("--driver", help="netns (a namespace) or qemu (a QEMU guest).")
    ] = "netns",
    as_json: JsonFlag = False,
) -> None:
    """Launch a VM: define it first if new, resolve its profile, configure its vNIC, start it."""

    def body() -> None:
        drv = dispatcher(driver)
        svc = service()
        known = {v.name for v in svc.list_vms(session)}
        if name not in known:
            patch = parse_assignments(sets) if sets else None
            svc.add_vm(
                VmRequest(
                    session=session,
                    name=name,
                    role=role,
                    labels=_pairs(labels or [], "--label"),
                    needs=tuple(needs or ()),
                    profile=profile,
                    patch=patch,
                )
            )
        elif role or labels or needs or profile or sets:
            raise InvalidInput.one(
                "vm",
                name,
                "a new VM name: role, labels, needs and overrides are set when a VM is added",
            )
        try:
            result = svc.launch_vm(session, name, drv, driver)
        except BaseException:
            if name not in known:
                svc.remove_vm(session, name)  # a failed launch of a new VM defines nothing
            raise
        if as_json:
            emit_json(views.explain_json(result))
        else:
            v = result.vm
            out.print(
                f"vm {session}/{name}: running, MAC {v.mac}, {v.ipv4}, {v.ipv6}", markup=False
            )

    run(body)


@vm_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def vm_exec(
    session: str,
    name: str,
    command: Annotated[list[str], typer.Argument(help="Command to run inside the VM (after --).")],
    driver: Annotated[
        str | None,
        typer.Option("--driver", help="Driver kind (default: the one the VM was launched with)."),
    ] = None,
) -> None:
    """Run a command inside a running VM; exits with the command's status.

    In a netns VM the command runs inside it, with this terminal: it sees the VM's
    processes, /proc and /etc/hosts, not the host's or other VMs'. In a QEMU
    guest it runs through the guest agent, and its output arrives when it ends."""
    from vnic.agent.core import local_agent

    code = 0

    def body() -> None:
        nonlocal code
        agent = local_agent()
        drv = agent.driver(driver or agent.kind_of(session, name))
        code = drv.exec(session, name, command).returncode

    run(body)
    raise typer.Exit(code)


@vm_app.command("link")
def vm_link(
    session: str,
    name: str,
    state: Annotated[str, typer.Argument(help="up or down")],
) -> None:
    """Set a QEMU guest's NIC link up or down (QMP set_link: the guest sees its carrier go)."""
    from vnic.agent.core import local_agent
    from vnic.drivers.qemu import QemuDriver

    def body() -> None:
        if state not in ("up", "down"):
            raise InvalidInput.one("state", state, "up or down")
        agent = local_agent()
        kind = agent.kind_of(session, name)
        driver = agent.driver(kind)
        if not isinstance(driver, QemuDriver):
            raise InvalidInput.one(
                "vm", f"{session}/{name}", f"a QEMU guest (it runs on the {kind} driver)"
            )
        driver.set_link(session, name, state == "up")
        out.print(f"vm {session}/{name}: link {state}", markup=False)

    run(body)


@vm_app.command("destroy")
def vm_destroy(
    session: str,
    name: str,
    driver: Annotated[str, typer.Option("--driver", help="Driver kind.")] = "netns",
) -> None:
    """Stop a VM and remove its network (the definition and MAC stay)."""

    def body() -> None:
        service().destroy_vm(session, name, dispatcher(driver))
        out.print(f"vm {session}/{name}: destroyed", markup=False)

    run(body)


@vm_app.command("list")
def vm_list(session: str, as_json: JsonFlag = False) -> None:
    """List the VMs of a session."""

    def body() -> None:
        vms = service().list_vms(session)
        if as_json:
            emit_json([views.vm_json(v) for v in vms])
        else:
            _vm_table(vms)

    run(body)


@vm_app.command("remove")
def vm_remove(session: str, name: str) -> None:
    """Remove a VM definition and release its MAC."""

    def body() -> None:
        service().remove_vm(session, name)
        out.print(f"vm {session}/{name}: removed", markup=False)

    run(body)


@vm_app.command("set")
def vm_set(
    session: str,
    name: str,
    assignments: Annotated[
        list[str] | None,
        typer.Argument(help="FIELD=VALUE: set in the VM's override (off removes an impairment)."),
    ] = None,
    unset: Annotated[
        list[str] | None,
        typer.Option("--unset", help="FIELD: drop from the override (the policy decides again)."),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="Override profile ('none' removes it).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Change a VM's override; a running VM gets it live (only what changed, in place)."""

    def body() -> None:
        changes: dict[str, Any] = {}
        patch = values_to_document(parse_assignments(assignments)) if assignments else {}
        for path in unset or []:
            if path not in FIELDS:
                raise InvalidInput.one("--unset", path, "a profile field, e.g. egress.rate")
            head, _, tail = path.partition(".")
            if tail:
                patch.setdefault(head, {})[tail] = None
            else:
                patch[head] = None
        if patch:
            changes["patch"] = patch
        if profile is not None:
            changes["profile"] = None if profile == "none" else profile
        if not changes:
            raise InvalidInput.one(
                "FIELD=VALUE", "", "at least one assignment, --unset or --profile"
            )
        result, applied = service().update_vm_live(session, name, changes, dispatcher("netns"))
        if as_json:
            emit_json(
                {**views.explain_json(result), "changes": [views.change_json(c) for c in applied]}
            )
            return
        if result.vm.state != "running":
            out.print(
                f"vm {session}/{name}: override saved (not running: applies at launch)",
                markup=False,
            )
        elif not applied:
            out.print(f"vm {session}/{name}: no effective change", markup=False)
        print_changes(applied)

    run(body)


def print_changes(changes: Sequence[VmChange]) -> None:
    """One line per changed field of each running VM, then what the kernel got."""
    for c in changes:
        label = f"vm {c.session}/{c.vm}"
        if c.error:
            out.print(f"{label}: NOT changed: {c.error}", markup=False)
            continue
        for path, (old, new) in c.fields.items():
            why = c.sources.get(path, "")
            out.print(
                f"{label}: {path} {_shown(old)} -> {_shown(new)}" + (f"  ({why})" if why else ""),
                markup=False,
            )
        for line in c.kernel:
            out.print(f"  kernel: {line}", markup=False)


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


@vm_app.command("explain")
def vm_explain(
    session: str,
    name: str,
    all_fields: Annotated[bool, typer.Option("--all", help="Also list fields nobody set.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show a VM's effective profile and, for every field, the layer it came from."""

    def body() -> None:
        e = service().explain(session, name)
        if as_json:
            emit_json(views.explain_json(e))
            return
        print_explanation(e, all_fields=all_fields)

    run(body)


def print_explanation(e: Explanation, *, all_fields: bool = False) -> None:
    revs = (
        ", ".join(f"{n} r{r}" for n, r in sorted(e.effective.revisions.items())) or "built-in only"
    )
    title = f"{e.vm.session}/{e.vm.name}  mac {e.vm.mac}  role {e.vm.role or '-'}  profiles: {revs}"
    table = Table("field", "value", "source", title=title, title_justify="left")
    for path, value, source in e.effective.rows():
        if value == "-" and not all_fields and source.layer == "unset":
            continue
        table.add_row(path, value, str(source))
    out.print(table)


# ----------------------------------------------------------------------------- doctor


def _qemu_report() -> dict[str, Any]:
    """What the qemu driver needs here, found without building or booting anything new:
    the accelerator and why, QEMU's binary and version, and the guest boot image."""
    import os
    import shutil
    import subprocess

    from vnic.dataplane import qemu
    from vnic.errors import DataplaneError

    accelerator: dict[str, str | None]
    try:
        accel = qemu.known_accelerator()
    except DataplaneError as exc:
        accelerator = {"name": None, "why": str(exc)}
    else:
        accelerator = (
            {"name": accel.name, "why": accel.reason}
            if accel is not None
            else {
                "name": None,
                "why": "/dev/kvm exists and the CPU shows vmx/svm: a KVM trial boot of the "
                "guest image decides, on the first launch (the image is not built yet)",
            }
        )
    binary = shutil.which("qemu-system-x86_64")
    version = None
    if binary is not None:
        try:
            proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc = None
        if proc is not None and proc.returncode == 0 and proc.stdout.strip():
            version = proc.stdout.strip().splitlines()[0]
    image = qemu.cached_image()
    return {
        "accelerator": accelerator,
        "binary": {"path": binary, "version": version},
        "image": {
            "directory": str(image.directory) if image is not None else None,
            "info": image.info() if image is not None else {},
            "given": os.environ.get("VNIC_VM_IMAGE") or None,
            "cache": str(qemu.image_cache()),
        },
    }


def _qemu_table(report: dict[str, Any]) -> Table:
    table = Table("qemu driver needs", "here", "detail")
    accel = report["accelerator"]
    table.add_row("accelerator", accel["name"] or "undecided", accel["why"])
    binary = report["binary"]
    if binary["path"] is None:
        table.add_row("qemu-system-x86_64", "missing", "run scripts/install.sh")
    else:
        table.add_row("qemu-system-x86_64", binary["path"], binary["version"] or "-")
    image = report["image"]
    if image["directory"] is not None:
        info = image["info"]
        built = f"kernel {info.get('kernel', '?')}, built {info.get('built', '?')}"
        table.add_row("guest image", "built", f"{image['directory']}\n{built}")
    elif image["given"] is not None:
        table.add_row(
            "guest image", "missing", f"VNIC_VM_IMAGE={image['given']} has no vmlinuz or initrd.img"
        )
    else:
        table.add_row(
            "guest image",
            "not built",
            f"none for this build script in {image['cache']}: the first qemu launch "
            "builds it (seconds), or run scripts/install.sh",
        )
    return table


@app.command("doctor")
def doctor(as_json: JsonFlag = False) -> None:
    """Probe what this kernel can do (by trying, in a throwaway namespace) and which
    profile fields each driver can therefore honour; and what the qemu driver's guests
    run with (accelerator, QEMU, boot image). Needs root."""

    def body() -> None:
        from vnic.dataplane.probe import run_probe, tools_missing
        from vnic.drivers.netns import NetnsDriver, capabilities_from_probe, choose_engine
        from vnic.drivers.qemu import QemuDriver

        probe = run_probe()
        caps = capabilities_from_probe(probe)
        guest_caps = QemuDriver(probe).capabilities()
        choice = choose_engine(probe)
        in_use = NetnsDriver(probe).engines_in_use()
        guests = _qemu_report()
        if as_json:
            emit_json(
                {
                    "kernel": probe.to_dict(),
                    "tools_missing": tools_missing(),
                    "drivers": [caps.to_dict(), guest_caps.to_dict()],
                    "delay_engine": {"engine": choice.engine, "why": choice.reason},
                    "qemu": guests,
                    "vnics": in_use,
                }
            )
            return
        table = Table("kind", "available", "missing")
        for group, found in probe.to_dict().items():
            if group == "congestion_control":
                continue
            assert isinstance(found, dict)
            table.add_row(
                group,
                " ".join(k for k, v in found.items() if v) or "-",
                " ".join(k for k, v in found.items() if not v) or "-",
            )
        cc = ", ".join(f"{k} (by {v})" for k, v in probe.congestion_control.items())
        table.add_row("tcp congestion control", cc, "-")
        out.print(table)
        fields = Table("driver", "honours", "cannot honour here (needs)", title_justify="left")
        for driver_caps in (caps, guest_caps):
            fields.add_row(
                driver_caps.kind,
                "\n".join(sorted(driver_caps.fields)),
                "\n".join(f"{k}: {v}" for k, v in sorted(driver_caps.missing.items())),
                end_section=True,
            )
        out.print(fields)
        out.print(f"delay and loss engine: {choice.engine} ({choice.reason})", markup=False)
        out.print(_qemu_table(guests))
        if in_use:
            vnics = Table("session", "vm", "engine", "detail")
            for row in in_use:
                detail = str(row.get("why") or "")
                counters = row.get("counters")
                if isinstance(counters, dict):
                    detail += "\n" + (
                        "; ".join(
                            f"{d}: held {c['held_frames']}, lost {c['dropped_loss']}, "
                            f"overflow {c['dropped_overflow']}, late {c['late']}"
                            for d, c in counters.items()
                        )
                        + f"; pid {row['pid']}, cpu {row['cpu_seconds']:.2f} s"
                    )
                vnics.add_row(str(row["session"]), str(row["vm"]), str(row["engine"]), str(detail))
            out.print(vnics)
        missing = tools_missing()
        if missing:
            out.print(f"missing tools: {' '.join(missing)} (run scripts/install.sh)", markup=False)

    run(body)


# ----------------------------------------------------------------------------- bench

bench_app = typer.Typer(
    no_args_is_help=True, help="Benchmarks (root): JSON out plus a short table."
)
app.add_typer(bench_app, name="bench")


def _rates_table(result: dict[str, Any]) -> Table:
    rows = result["rows"]
    judged = any("pass" in r for r in rows)
    title = "shaping fidelity (iperf3)"
    if result.get("driver") == "qemu":
        title += f" of a QEMU guest ({result['accelerator']}) against a netns peer"
    table = Table(
        "case", "configured", "measured (frames)", "ratio", "lost / reordered", title=title
    )
    if judged:
        table.add_column(f"±{result['tolerance'] * 100:g} %")
    for r in rows:
        extra = f"{r['lost_percent']}% / {r['out_of_order']}" if "lost_percent" in r else ""
        measured = "—" if r["measured_bps"] is None else f"{r['measured_bps'] / 1e6:.3f} Mbit/s"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.3f}"
        cells = [r["case"], f"{r['configured_bps'] / 1e6:g} Mbit/s", measured, ratio, extra]
        if judged:
            verdict = "met" if r.get("pass") else "MISSED"
            if "error" in r:
                verdict += f": {r['error'][:60]}"
            elif "limited_by" in r:
                verdict += f": {r['limited_by']}"
            cells.append(verdict)
        table.add_row(*cells)
    return table


def _bench_notes(result: dict[str, Any]) -> None:
    """The notes of a benchmark result: its ceiling and what it skipped, and why."""
    ceiling = result.get("ceiling")
    if ceiling:
        moved = [
            f"{key.removesuffix('_bps').replace('_', ' ')} {value / 1e6:.0f} Mbit/s"
            for key, value in ceiling.items()
            if key.endswith("_bps") and value is not None
        ]
        out.print(f"unshaped guest (its ceiling): {', '.join(moved)}", markup=False)
    reasons: dict[str, list[str]] = {}
    for s in result.get("skipped", []):
        reasons.setdefault(s["reason"], []).append(s["case"])
    for reason, cases in reasons.items():
        out.print(f"skipped {', '.join(cases)}: {reason}", markup=False)


def _loss_with_interval(row: dict[str, Any]) -> str:
    """A measured loss rate with its 95 % interval, in percent."""
    lo, hi = row["interval_95_percent"]
    return f"{row['measured_percent']:.3f} % [{lo:.3f}, {hi:.3f}]"


def _impairments_table(result: dict[str, Any]) -> Table:
    table = Table(
        "case",
        "configured",
        "measured",
        "detail",
        "target",
        title=f"delay, jitter and loss (engine: {result['engine']})"
        + (" through a QEMU guest" if result.get("driver") == "qemu" else ""),
    )
    for r in result["rows"]:
        kind = r["kind"]
        configured = measured = detail = ""
        if kind == "baseline" and "median_rtt_us" in r:
            measured = f"{r['median_rtt_us']} µs RTT"
            detail = f"p99 {r['p99_rtt_us']} µs, n {r['samples']}"
        elif kind == "baseline":
            measured = f"{r['median_one_way_us']} µs one way"
        elif kind == "rtt_delay":
            configured = f"{r['configured_ms']} ms"
            measured = f"{r['measured_ms']:.3f} ms RTT added"
            detail = f"error {r['median_error_us']} µs, p99-p50 {r['p99_minus_median_us']} µs, n {r['samples']}"
        elif kind == "udp_loss":
            configured = f"{r['configured_percent']:g} %"
            measured = _loss_with_interval(r)
            detail = f"{r['lost']} of {r['packets']}, expected {r['expected_count_95']}"
        elif kind == "delay":
            configured, measured = f"{r['configured_ms']} ms", f"{r['measured_ms']:.3f} ms"
            detail = f"error {r['median_error_us']} µs, p99-p50 {r['p99_minus_median_us']} µs, reordered {r['reordered']}"
        elif kind == "jitter":
            configured = f"σ {r['configured_sigma_ms']:.3f} ms"
            measured = f"σ {r['measured_sigma_ms']:.3f} ms ({r['ratio']:.3f})"
            detail = f"n {r['samples']}, skew {r['skewness']}, reordered {r['reordered']}"
        elif kind == "loss":
            configured = f"{r['configured_percent']:g} %, bursts {r['configured_burst']:g}"
            measured = _loss_with_interval(r)
            detail = f"mean burst {r['mean_burst']}, n {r['packets']}"
            if "engine_lost_percent" in r:
                detail += (
                    f"; engine decided {r['engine_lost_percent']:.3f} %, "
                    f"measuring path lost {r['measuring_path_lost']}"
                )
        elif kind == "order":
            measured = f"{r['reordered']} reordered of {r['received']}"
        elif kind == "seed":
            measured = f"identical: {r['identical']} ({r['lost_first']} / {r['lost_second']} lost)"
        elif kind == "throughput":
            configured = f"{r['configured_bps'] / 1e6:g} Mbit/s"
            measured = f"{r['measured_bps'] / 1e6:.2f} Mbit/s ({r['ratio']:.3f})"
        elif kind == "engine":
            if "offered_pps" in r:
                configured = f"{r['offered_pps']} pkt/s"
                measured = f"{r['received_pps']} pkt/s"
                detail = f"late {r['late_share']}, {r['engine_cpu_us_per_packet']} µs CPU/pkt"
            else:
                measured = f"{r['measured_bps'] / 1e9:.2f} Gbit/s"
                detail = f"engine CPU {r['engine_cpu_share']}, late {r['late_share']}"
        elif kind == "mobile":
            configured = r.get("configured", "")
            if "median_ms" in r:
                measured = f"{r['median_ms']} ms, σ {r['sigma_ms']} ms, loss {r['loss_percent']} %"
                detail = f"loss 95% {r['loss_interval_95_percent']}, reordered {r['reordered']}"
            else:
                measured = f"{r['egress_bps'] / 1e6:.2f} / {r['ingress_bps'] / 1e6:.2f} Mbit/s"
        verdict = {True: "met", False: "MISSED"}.get(r.get("pass"), "")
        table.add_row(r["case"], configured, measured, detail, verdict)
    return table


def _qemu_launch_table(result: dict[str, Any]) -> Table:
    table = Table(
        "measure",
        "p50 s",
        "p99 s",
        "each (s)",
        "target",
        title=f"launch of QEMU guests ({result['accelerator']})",
    )
    seq = result["sequential"]
    for name, key in (
        ("launch", "launch"),
        ("launch + first ping", "ready"),
        ("destroy", "destroy"),
    ):
        target = ""
        if key == "launch":
            target = f"≤ {seq['target_s']:g} s: " + ("met" if seq["pass"] else "MISSED")
        table.add_row(
            f"{name}, one at a time",
            str(seq[key]["p50_s"]),
            str(seq[key]["p99_s"]),
            " ".join(f"{t:.2f}" for t in seq[f"{key}_s"]),
            target,
        )
    for name, key in (
        ("one session", "concurrent_one_session"),
        ("separate sessions", "concurrent_separate_sessions"),
    ):
        c = result[key]
        table.add_row(
            f"{c['guests']} at once, {name} (wall {c['wall_s']:.2f} s)",
            str(c["p50_s"]),
            str(c["p99_s"]),
            " ".join(f"{t:.2f}" for t in c["per_guest_s"].values()),
            f"no error, {c['answering_ping']}/{c['guests']} answer ping: "
            + ("met" if not c["errors"] and c["answering_ping"] == c["guests"] else "MISSED"),
        )
    return table


def _bench(
    which: str,
    out_path: Path | None,
    part: str = "all",
    quick: bool = False,
    cells: str | None = None,
    driver: str = "netns",
) -> None:
    from vnic.lab.bench.run import DRIVERS
    from vnic.lab.bench.run import run as run_bench

    def printer(result: dict[str, Any]) -> None:
        if which == "fidelity":
            for key, render in (("rates", _rates_table), ("impairments", _impairments_table)):
                if key in result:
                    out.print(render(result[key]))
                    _bench_notes(result[key])
            return
        if result.get("driver") == "qemu":
            out.print(_qemu_launch_table(result))
            for key in ("concurrent_one_session", "concurrent_separate_sessions"):
                for error in result[key]["errors"]:
                    out.print(f"error: {error}", markup=False)
            return
        table = Table("metric", "value", title=f"launch of {result['vms']} shaped VMs")
        for k, v in result.items():
            if k != "benchmark":
                table.add_row(k, str(v))
        out.print(table)

    def body() -> None:
        if driver not in DRIVERS:
            raise InvalidInput.one("--driver", driver, "one of " + ", ".join(DRIVERS))
        from vnic.lab.bench import impairments as bench_impairments
        from vnic.lab.bench import qemu as bench_qemu

        valid: tuple[str, ...] = bench_qemu.CELLS if driver == "qemu" else bench_impairments.CELLS
        if part not in ("all", "rates", "impairments"):
            raise InvalidInput.one("--part", part, "one of all, rates, impairments")
        chosen = tuple(c.strip() for c in cells.split(",")) if cells else valid
        unknown = [c for c in chosen if c not in valid]
        if unknown:
            raise InvalidInput.one(
                "--cells", cells, f"a comma-separated list of {', '.join(valid)} (driver {driver})"
            )
        run_bench(which, out_path, printer, part=part, quick=quick, cells=chosen, driver=driver)

    run(body)


_DRIVER_OPTION = typer.Option(
    "--driver", help="The VMs measured: netns, or qemu (QEMU guests against a netns peer)."
)


@bench_app.command("fidelity")
def bench_fidelity(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
    part: Annotated[
        str,
        typer.Option("--part", help="all, rates (shaping) or impairments (delay, jitter, loss)."),
    ] = "all",
    quick: Annotated[
        bool, typer.Option("--quick", help="Shorter measurements (a smoke run).")
    ] = False,
    cells: Annotated[
        str | None,
        typer.Option("--cells", help="Impairment cells to run (comma-separated); default all."),
    ] = None,
    driver: Annotated[str, _DRIVER_OPTION] = "netns",
) -> None:
    """Configured vs measured: rates (1, 10, 100, 1000 Mbit/s each way, TCP and UDP), QoS shares,
    asymmetry; delay, jitter, loss, order, seeds and the delay engine's ceiling. With
    --driver qemu: the same rates through a QEMU guest, and its delay (RTT) and loss cells."""
    _bench("fidelity", json_out, part, quick, cells, driver)


@bench_app.command("launch")
def bench_launch(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
    driver: Annotated[str, _DRIVER_OPTION] = "netns",
) -> None:
    """Launch 100 shaped VMs: per-VM launch time p50/p99, total, time to read all counters.
    With --driver qemu: 5 guests one at a time (p50/p99), then 4 at once."""
    _bench("launch", json_out, driver=driver)


@bench_app.command("change")
def bench_change(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer repeats (a smoke run).")] = False,
) -> None:
    """Live changes (root): API call to kernel for one vNIC and for a profile on 100 VMs, a
    rate change under a TCP flow, trace replay per 100 ms against the trace."""
    from vnic.lab.bench.change import run as run_change
    from vnic.lab.bench.change import table as change_table

    def body() -> None:
        result = run_change(quick=quick)
        out.print(change_table(result))
        if json_out:
            json_out.write_text(json.dumps({"benchmark": "change", **result}, indent=2) + "\n")

    run(body)


@bench_app.command("api")
def bench_api(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
    no_launch: Annotated[
        bool, typer.Option("--no-launch", help="Skip the netns launch part (it needs root).")
    ] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer repeats (a smoke run).")] = False,
) -> None:
    """Control plane through real HTTP: explain and profile list on 1000 VMs / 100 profiles,
    100 concurrent launches on the netns driver, /metrics rendering for 1000 vNICs."""
    from vnic.lab.bench.api import run as run_api

    def body() -> None:
        result = run_api(launch=not no_launch, quick=quick)
        table = Table("measure", "p50 ms", "p99 ms", "max ms", "n", "target")
        rec = result["records"]
        rows = [
            (f"explain ({rec['vms']} VMs)", rec["explain"], "p99 < 20 ms"),
            (f"profile list ({rec['profiles']})", rec["profile_list"], "< 50 ms"),
            ("render /metrics, 1000 vNICs", result["metrics_render"], "< 500 ms"),
        ]
        if "launch" in result:
            lau = result["launch"]
            rows.append(
                (f"launch, {lau['concurrent_requests']} at once", lau["per_launch"], "no error")
            )
            rows.append(
                (
                    f"scrape /metrics, {lau['concurrent_requests']} real vNICs",
                    lau["metrics_scrape"],
                    "",
                )
            )
        for name, m, target in rows:
            table.add_row(
                name, str(m["p50_ms"]), str(m["p99_ms"]), str(m["max_ms"]), str(m["n"]), target
            )
        out.print(table)
        if "launch" in result:
            lau = result["launch"]
            out.print(
                f"launch errors: {len(lau['errors'])}; wall {lau['wall_seconds']} s", markup=False
            )
        if json_out:
            json_out.write_text(json.dumps({"benchmark": "api", **result}, indent=2) + "\n")

    run(body)


@bench_app.command("ui")
def bench_ui(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
    vms: Annotated[int, typer.Option("--vms", min=1, max=2000, help="VMs in the session.")] = 200,
    runs: Annotated[int, typer.Option("--runs", min=1, max=50, help="Renders of each page.")] = 5,
) -> None:
    """The web UI in Chromium: a session page of 200 VMs against one of a single VM."""
    from vnic.lab.bench.ui import run as run_ui

    def body() -> None:
        r = run_ui(vms=vms, runs=runs)
        table = Table("page", "median ms", "renders ms", "target")
        table.add_row(
            f"session of {r['vms']} VMs",
            str(r["median_ms"]),
            " ".join(map(str, r["render_ms"])),
            f"< {r['target_ms']} ms: {'met' if r['pass'] else 'missed'}",
        )
        table.add_row(
            "session of 1 VM",
            str(r["one_vm_median_ms"]),
            " ".join(map(str, r["one_vm_render_ms"])),
            "",
        )
        out.print(table)
        out.print(f"ratio {r['vms']} VMs / 1 VM: {r['ratio_to_one_vm']}", markup=False)
        if json_out:
            json_out.write_text(json.dumps({"benchmark": "ui", **r}, indent=2) + "\n")

    run(body)


@bench_app.command("load")
def bench_load(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
    readers: Annotated[int, typer.Option("--readers", help="Reading clients.", min=1)] = 200,
    writers: Annotated[int, typer.Option("--writers", help="Writing clients.", min=0)] = 20,
    seconds: Annotated[
        float, typer.Option("--seconds", help="How long they run.", min=1, max=600)
    ] = 30.0,
    serve_option: Annotated[
        list[str] | None,
        typer.Option("--serve-option", help="Passed to vnic serve, e.g. --max-reads=64."),
    ] = None,
) -> None:
    """Readers and writers at once against vnic serve on 127.0.0.1 with 10 netns VMs (root):
    p50/p99 per kind, answers by status (429 = refused by admission), server RSS."""
    from vnic.lab.bench.api import run_load

    def body() -> None:
        result = run_load(
            readers=readers, writers=writers, seconds=seconds, serve_args=tuple(serve_option or ())
        )
        table = Table("kind", "p50 ms", "p99 ms", "max ms", "ok/s", "answers by status")
        for kind in ("read", "write"):
            rep = result[kind]
            m = rep["ok"] or {"p50_ms": "-", "p99_ms": "-", "max_ms": "-"}
            statuses = " ".join(f"{k}:{v}" for k, v in rep["by_status"].items())
            table.add_row(
                f"{kind} (2xx)",
                str(m["p50_ms"]),
                str(m["p99_ms"]),
                str(m["max_ms"]),
                str(rep["per_second_ok"]),
                statuses,
            )
        out.print(table)
        rss, probe = result["rss_kib"], result["health_probe"]
        out.print(
            f"health probe (own process, no admission): p50 {probe.get('p50_ms')} ms, "
            f"p99 {probe.get('p99_ms')} ms, {probe['failed']} failed",
            markup=False,
        )
        out.print(
            f"{readers} readers + {writers} writers, {seconds:g} s; errors other than 429: "
            f"{sum(result['errors_other_than_429'].values())}; server RSS "
            f"{rss['before']} -> {rss['after']} KiB",
            markup=False,
        )
        if json_out:
            json_out.write_text(json.dumps({"benchmark": "load", **result}, indent=2) + "\n")

    run(body)


# ----------------------------------------------------------------------------- db, demo


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the newest revision."""

    def body() -> None:
        svc = Service(Database(database_url()))
        out.print(
            f"database {svc.db.engine.url.render_as_string(hide_password=True)}: up to date",
            markup=False,
        )

    run(body)


@app.command("demo")
def demo(
    profiles_dir: Annotated[
        Path, typer.Option("--profiles", help="Directory of sample profiles.")
    ] = Path("examples/demo"),
) -> None:
    """Launch a shaped demo session (default, rule, override), measure each VM both ways, tear it down. Root."""
    from vnic.lab.demo import run_demo

    run(lambda: run_demo(Service(Database(database_url())), profiles_dir, out))


# ----------------------------------------------------------------------------- servers, tokens

LatencyInterval = Annotated[
    float, typer.Option("--latency-interval", help="Seconds between two latency probes.")
]
DriftInterval = Annotated[
    float, typer.Option("--drift-interval", help="Seconds between two drift checks.")
]
RepairInterval = Annotated[
    float,
    typer.Option(
        "--repair-interval",
        help="Seconds between two drift checks that repair what drifted (0: only report it,"
        " every --drift-interval).",
        min=0.0,
    ),
]
AllowedHosts = Annotated[
    list[str] | None,
    typer.Option(
        "--allowed-host",
        metavar="NAME",
        help="A Host name clients use besides loopback and --host (repeatable), "
        "e.g. the name in front of a proxy; any other Host is refused (DNS rebinding).",
    ),
]
token_app = typer.Typer(no_args_is_help=True, help="API tokens (admin, owner, reader).")
app.add_typer(token_app, name="token")


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8470,
    agent: Annotated[
        str | None,
        typer.Option("--agent", help="URL of a standalone agent (default: one in this process)."),
    ] = None,
    agent_key_file: Annotated[
        Path | None, typer.Option("--agent-key-file", help="The agent's key (with --agent).")
    ] = None,
    driver: Annotated[str, typer.Option("--driver", help="Driver kind.")] = "netns",
    latency_interval: LatencyInterval = 10.0,
    drift_interval: DriftInterval = 60.0,
    repair_interval: RepairInterval = 2.0,
    controller_interval: Annotated[
        float,
        typer.Option(
            "--controller-interval",
            help="Seconds between controller rounds (threshold rules, expiry).",
            min=0.1,
        ),
    ] = 1.0,
    max_reads: Annotated[
        int, typer.Option("--max-reads", help="Reads (GET) in flight; more wait, then 429.")
    ] = 8,
    max_writes: Annotated[
        int, typer.Option("--max-writes", help="Writes in flight; more wait, then 429.")
    ] = 4,
    queue: Annotated[
        int, typer.Option("--queue", help="Requests of one kind that may wait for a slot.")
    ] = 16,
    queue_wait: Annotated[
        float, typer.Option("--queue-wait", help="Seconds a request may wait for a slot.")
    ] = 0.25,
    max_streams: Annotated[
        int, typer.Option("--max-streams", help="Live event streams open at once; more: 429.")
    ] = 32,
    allowed_host: AllowedHosts = None,
) -> None:
    """Run the session manager: REST API, OpenAPI at /docs, metrics at /metrics, the
    controller (rules, feedback endpoint in each session, scenarios).
    Binds to localhost unless told otherwise; every call needs a token (vnic token create).
    Past --max-reads / --max-writes requests in flight (reads and writes apart), a request
    waits up to --queue-wait seconds, then gets 429 with Retry-After."""
    from vnic.edge.admission import Limits
    from vnic.server import build_manager, run_manager

    def body() -> None:
        limits = Limits(
            max_reads=max_reads,
            max_writes=max_writes,
            queue=queue,
            wait=queue_wait,
            max_streams=max_streams,
        )
        key = agent_key_file.read_text().strip() if agent_key_file else None
        served = build_manager(database_url(), agent_url=agent, agent_key=key, driver=driver)
        served.manager.live.interval = controller_interval
        run_manager(
            served,
            host,
            port,
            (latency_interval, drift_interval, repair_interval),
            limits,
            allowed_host or [],
        )

    run(body)


@app.command("agent")
def agent_command(
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8471,
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key-file", help="Agent key file (default $VNIC_HOME/agent.key, made once)."
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Desired-state directory (default $VNIC_HOME/agent)."),
    ] = None,
    driver: Annotated[str, typer.Option("--driver", help="Driver kind.")] = "netns",
    latency_interval: LatencyInterval = 10.0,
    drift_interval: DriftInterval = 60.0,
    repair_interval: RepairInterval = 2.0,
    allowed_host: AllowedHosts = None,
) -> None:
    """Run this host's agent on its own: the manager reaches it with --agent URL.
    Reconciles the kernel with its desired state before it answers."""
    from vnic.agent.api import agent_key
    from vnic.agent.core import local_agent
    from vnic.server import run_agent

    def body() -> None:
        home = Settings.from_env().home
        key = agent_key(key_file or home / "agent.key")
        run_agent(
            local_agent(driver, state_dir),
            key,
            host,
            port,
            (latency_interval, drift_interval, repair_interval),
            allowed_host or [],
        )

    run(body)


@token_app.command("create")
def token_create(
    name: str,
    role: Annotated[str, typer.Option("--role", help="admin, owner or reader.")],
    as_json: JsonFlag = False,
) -> None:
    """Create a token and print its secret (shown once). Embedded, this is how the
    first admin token is made."""

    def body() -> None:
        svc = service()
        if isinstance(svc, ManagerClient):
            info, secret = svc.create_token(name, role)
        else:
            info, secret = Tokens(svc.db).create(name, role)
        if as_json:
            emit_json({**views.token_json(info), "secret": secret})
        else:
            out.print(f"token {info.name} ({info.role}): {secret}", markup=False)

    run(body)


@token_app.command("list")
def token_list(as_json: JsonFlag = False) -> None:
    """List tokens (names and roles; secrets are never stored)."""

    def body() -> None:
        svc = service()
        infos = svc.list_tokens() if isinstance(svc, ManagerClient) else Tokens(svc.db).list()
        if as_json:
            emit_json([views.token_json(t) for t in infos])
            return
        table = Table("name", "role", "created")
        for t in infos:
            table.add_row(t.name, t.role, t.created_at.isoformat(timespec="seconds"))
        out.print(table)

    run(body)


@token_app.command("revoke")
def token_revoke(name: str) -> None:
    """Revoke a token: calls with it are refused from now on."""

    def body() -> None:
        svc = service()
        if isinstance(svc, ManagerClient):
            svc.revoke_token(name)
        else:
            Tokens(svc.db).revoke(name)
        out.print(f"token {name}: revoked", markup=False)

    run(body)


@app.command("top")
def top(
    session: str,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between updates.")] = 1.0,
    count: Annotated[
        int, typer.Option("--count", help="Updates to show, then exit (0: until Ctrl-C).")
    ] = 0,
) -> None:
    """Live per-vNIC table of a session: rates against the profile, drops by cause, latency."""
    from vnic.cli.top import run_top

    def body() -> None:
        svc = service()
        if isinstance(svc, ManagerClient):
            source = svc.stats
        else:
            from vnic.agent.core import local_agent

            svc.get_session(session)
            source = local_agent().stats
        run_top(session, source, out, interval=interval, count=count)

    run(body)


def main() -> None:
    from vnic.cli import live as cli_live

    cli_live.register(app, vm_app, session_app)
    app()


if __name__ == "__main__":
    # Run the module under its own name (not __main__): vnic.cli.live imports it and
    # must see the same options.
    import vnic.cli.app

    vnic.cli.app.main()
