"""``vnic vm``: VMs in a session and their effective profiles."""

import sys
from typing import Annotated, Any

import typer

from vnic.cli import render
from vnic.cli.common import (
    JsonFlag,
    backend,
    dispatcher,
    emit_json,
    err,
    out,
    pairs,
    run,
    service,
    vm_and_nic,
)

app = typer.Typer(no_args_is_help=True, help="VMs in a session and their effective profiles.")


def nic_specs(texts: list[str] | None) -> list[Any]:
    """The vNICs of ``--nic`` options, eth0 first (none: the VM's eth0 on default)."""
    from vnic.model.network import parse_nic_cli

    return [parse_nic_cli(text, i) for i, text in enumerate(texts or [])]


@app.command("add")
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
    nics: Annotated[
        list[str] | None,
        typer.Option(
            "--nic",
            help="A vNIC 'net=NETWORK,profile=P,set=FIELD=VALUE' (each key optional), eth0 first."
            " Repeatable. Without it: eth0 on default, overridden by --profile/--set;"
            " with it, --profile/--set are refused (say them per vNIC).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Define a VM in a session: every vNIC's profile is resolved, its MAC and address
    allocated."""

    def body() -> None:
        from vnic.manager.results import VmRequest
        from vnic.model.profile import parse_assignments

        patch = parse_assignments(sets) if sets else None
        result = service().add_vm(
            VmRequest(
                session=session,
                name=name,
                role=role,
                labels=pairs(labels or [], "--label"),
                needs=tuple(needs or ()),
                profile=profile,
                patch=patch,
                nics=nic_specs(nics),
            )
        )
        if as_json:
            from vnic.manager import views

            emit_json(views.explain_json(result))
        else:
            out.print(f"vm {session}/{name}: added, MAC {result.vm.mac}", markup=False)
            for n in result.vm.nics[1:]:
                out.print(
                    f"  {n.name} on {n.network}: MAC {n.mac}, {n.ipv4}, {n.ipv6}", markup=False
                )

    run(body)


@app.command("launch")
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
    nics: Annotated[
        list[str] | None,
        typer.Option(
            "--nic",
            help="A vNIC 'net=NETWORK,profile=P,set=FIELD=VALUE' (each key optional), eth0 first (new VMs)."
            " Repeatable. Without it: eth0 on default, overridden by --profile/--set;"
            " with it, --profile/--set are refused (say them per vNIC).",
        ),
    ] = None,
    driver: Annotated[
        str, typer.Option("--driver", help="netns (a namespace) or qemu (a QEMU guest).")
    ] = "netns",
    host: Annotated[
        str | None,
        typer.Option(
            "--host", help="The host to launch on (once hosts are added); default: placed."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Launch a VM: define it first if new, resolve its profile, configure its vNIC, start it."""

    def body() -> None:
        from vnic.errors import InvalidInput
        from vnic.manager.results import VmRequest
        from vnic.model.profile import parse_assignments

        drv = dispatcher(driver)
        svc = service()
        known = {v.name for v in svc.list_vms(session)}
        if name not in known:
            request = VmRequest(
                session=session,
                name=name,
                role=role,
                labels=pairs(labels or [], "--label"),
                needs=tuple(needs or ()),
                profile=profile,
                patch=parse_assignments(sets) if sets else None,
                nics=nic_specs(nics),
            )
            # A failed launch defines nothing.
            result = svc.add_and_launch(request, drv, driver, host=host)
        elif role or labels or needs or profile or sets or nics:
            raise InvalidInput.one(
                "vm",
                name,
                "a new VM name: role, labels, needs and overrides are set when a VM is added",
            )
        else:
            result = svc.launch_vm(session, name, drv, driver, host=host)
        if as_json:
            from vnic.manager import views

            emit_json(views.explain_json(result))
        else:
            v = result.vm
            where = f" on host {v.host}" if v.host else ""
            out.print(
                f"vm {session}/{name}: running{where}, MAC {v.mac}, {v.ipv4}, {v.ipv6}",
                markup=False,
            )
            for n in v.nics[1:]:
                out.print(
                    f"  {n.name} on {n.network}: MAC {n.mac}, {n.ipv4}, {n.ipv6}", markup=False
                )

    run(body)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def vm_exec(
    session: str,
    name: str,
    command: Annotated[list[str], typer.Argument(help="Command to run inside the VM (after --).")],
    driver: Annotated[
        str | None,
        typer.Option(
            "--driver",
            help="Driver kind (default: the one the VM was launched with; not with --server).",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            help="Seconds before the command is killed (exit 124), at most 300; with --server "
            "only: embedded, the command has this terminal until it ends.",
        ),
    ] = 30.0,
) -> None:
    """Run a command inside a running VM; exits with the command's status.

    In a netns VM the command runs inside it: it sees the VM's processes, /proc and
    /etc/hosts, not the host's or other VMs'. In a QEMU guest it runs through the guest
    agent, and its output arrives when it ends.

    Embedded, the command has this terminal. With --server it runs on the manager's
    agent without one (stdin empty); its output (at most 256 KiB of each stream) is
    printed when it ends, and it is killed after --timeout seconds (exit 124)."""
    code = 0

    def body() -> None:
        nonlocal code
        result = backend().exec_in_vm(session, name, command, timeout=timeout, driver=driver)
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
        sys.stderr.flush()
        for stream, cut in (
            ("stdout", result.stdout_truncated),
            ("stderr", result.stderr_truncated),
        ):
            if cut:
                err.print(f"vnic: the command's {stream} was cut (output limit)", markup=False)
        if result.timed_out:
            err.print(
                f"vnic: the command did not end within {timeout:g} s and was killed", markup=False
            )
        code = result.status

    run(body)
    raise typer.Exit(code)


@app.command("link")
def vm_link(
    session: str,
    name: Annotated[str, typer.Argument(help="VM, or VM/NIC for one vNIC (VM alone: eth0).")],
    state: Annotated[str, typer.Argument(help="up or down")],
) -> None:
    """Set a QEMU guest's vNIC link up or down (QMP set_link: the guest sees its carrier go)."""

    def body() -> None:
        from vnic.errors import InvalidInput

        if state not in ("up", "down"):
            raise InvalidInput.one("state", state, "up or down")
        vm, nic = vm_and_nic(name)
        backend().set_link(session, vm, state == "up", nic)
        out.print(f"vm {session}/{name}: link {state}", markup=False)

    run(body)


@app.command("destroy")
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


@app.command("list")
def vm_list(session: str, as_json: JsonFlag = False) -> None:
    """List the VMs of a session."""

    def body() -> None:
        vms = service().list_vms(session)
        if as_json:
            from vnic.manager import views

            emit_json([views.vm_json(v) for v in vms])
        else:
            out.print(render.vms_table(vms))

    run(body)


@app.command("remove")
def vm_remove(session: str, name: str) -> None:
    """Remove a VM definition and release its MAC."""

    def body() -> None:
        service().remove_vm(session, name)
        out.print(f"vm {session}/{name}: removed", markup=False)

    run(body)


@app.command("set")
def vm_set(
    session: str,
    name: Annotated[str, typer.Argument(help="VM, or VM/NIC for one vNIC (VM alone: eth0).")],
    assignments: Annotated[
        list[str] | None,
        typer.Argument(help="FIELD=VALUE: set in the vNIC's override (off removes an impairment)."),
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
    """Change a vNIC's override (eth0 unless VM/NIC); a running VM gets it live (only what
    changed, in place)."""

    def body() -> None:
        from vnic.errors import InvalidInput
        from vnic.model.fields import FIELDS
        from vnic.model.profile import parse_assignments, values_to_document

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
        vm, nic = vm_and_nic(name)
        result, applied = service().update_vm_live(
            session, vm, changes, dispatcher("netns"), nic=nic
        )
        if as_json:
            from vnic.manager import views

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
        for line in render.change_lines(applied):
            out.print(line, markup=False)

    run(body)


@app.command("explain")
def vm_explain(
    session: str,
    name: Annotated[str, typer.Argument(help="VM, or VM/NIC for one vNIC.")],
    all_fields: Annotated[bool, typer.Option("--all", help="Also list fields nobody set.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show every vNIC's effective profile (VM/NIC: that vNIC's) and, for every field,
    the layer it came from (a VM of one vNIC: its table, as before VMs had several)."""

    def body() -> None:
        vm, nic = vm_and_nic(name)
        named = "/" in name
        e = service().explain(session, vm)
        if named and nic not in e.nics:
            from vnic.errors import NotFound

            raise NotFound(f"vNIC of VM {session}/{vm}", nic, list(e.nics))
        if as_json:
            from vnic.manager import views

            doc = views.explain_json(e)
            emit_json(next(n for n in doc["nics"] if n["name"] == nic) if named else doc)
            return
        if e.vm.host:
            out.print(f"vm {session}/{vm}: placed on host {e.vm.host}", markup=False)
        if named:
            out.print(render.nic_explanation_table(e, nic, all_fields=all_fields))
            return
        if len(e.nics) <= 1:
            from vnic.lab.explain import explanation_table

            out.print(explanation_table(e, all_fields=all_fields))
            return
        out.print(render.nics_table(e.vm))
        for nic in e.nics:
            out.print(render.nic_explanation_table(e, nic, all_fields=all_fields))

    run(body)
