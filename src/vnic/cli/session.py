"""``vnic session``: sessions, isolated networks with a profile policy."""

from typing import Annotated

import typer

from vnic.cli import render
from vnic.cli.common import JsonFlag, dispatcher, emit_json, out, pairs, run, service

app = typer.Typer(no_args_is_help=True, help="Sessions: isolated networks with a profile policy.")


@app.command("create")
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
    placement: Annotated[
        str | None,
        typer.Option("--placement", help="With many hosts: spread (default) or pack its VMs."),
    ] = None,
    placement_labels: Annotated[
        list[str] | None,
        typer.Option(
            "--placement-label", help="With many hosts: a label KEY=VALUE its hosts must have."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a session with its profile policy."""

    def body() -> None:
        from vnic.model.session import AssignmentRule

        parsed = [AssignmentRule.parse_cli(r, f"--rule[{i}]") for i, r in enumerate(rules or [])]
        info = service().create_session(
            name,
            default_profile=default_profile,
            rules=parsed,
            network_id=network_id,
            overrides_allowed=not no_overrides,
            owner=owner,
            placement=(
                {
                    "strategy": placement or "spread",
                    "labels": pairs(placement_labels or [], "--placement-label"),
                }
                if placement or placement_labels
                else None
            ),
        )
        if as_json:
            from vnic.manager import views

            emit_json(views.session_json(info))
        else:
            out.print(f"session {info.name}: created (network id {info.network_id})", markup=False)

    run(body)


@app.command("list")
def session_list(as_json: JsonFlag = False) -> None:
    """List sessions."""

    def body() -> None:
        infos = service().list_sessions()
        if as_json:
            from vnic.manager import views

            emit_json([views.session_json(s) for s in infos])
            return
        out.print(render.sessions_table(infos))

    run(body)


@app.command("show")
def session_show(name: str, as_json: JsonFlag = False) -> None:
    """Show a session's policy and VMs."""

    def body() -> None:
        info = service().get_session(name)
        vms = service().list_vms(name)
        if as_json:
            from vnic.manager import views

            data = views.session_json(info)
            data["vms"] = [views.vm_json(v) for v in vms]
            emit_json(data)
            return
        for line in render.session_lines(info):
            out.print(line, markup=False)
        out.print(render.vms_table(vms))

    run(body)


@app.command("up")
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


@app.command("down")
def session_down(
    name: str,
    driver: Annotated[str, typer.Option("--driver", help="Driver kind.")] = "netns",
) -> None:
    """Stop every VM of the session and remove its network namespaces, links and qdiscs."""

    def body() -> None:
        stopped = service().session_down(name, dispatcher(driver))
        out.print(f"session {name}: down ({len(stopped)} VMs stopped)", markup=False)

    run(body)


@app.command("delete")
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


network_app = typer.Typer(
    no_args_is_help=True,
    help="A session's networks: default, and others its VMs' vNICs may join.",
)
app.add_typer(network_app, name="network")


@network_app.command("add")
def network_add(
    session: str,
    name: str,
    network_id: Annotated[
        int | None,
        typer.Option(
            "--id",
            help="Network id (VNI 1..16777215, unique across sessions); default: lowest free.",
        ),
    ] = None,
    ipv4: Annotated[
        str | None,
        typer.Option("--ipv4", help="IPv4 subnet (CIDR, /8../24); default: from the network id."),
    ] = None,
    ipv6: Annotated[
        str | None,
        typer.Option("--ipv6", help="IPv6 subnet (CIDR, /8../120); default: from the network id."),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", "-p", help="Default profile of its vNICs; default: the session's."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Add a network to a session (a bridge of its own in the session's namespace)."""

    def body() -> None:
        info = service().add_network(
            session, name, network_id=network_id, ipv4=ipv4, ipv6=ipv6, default_profile=profile
        )
        if as_json:
            from vnic.manager import views

            emit_json(views.network_json(info))
        else:
            out.print(
                f"network {session}/{info.name}: added (network id {info.network_id}, "
                f"{info.ipv4}, {info.ipv6})",
                markup=False,
            )

    run(body)


@network_app.command("list")
def network_list(session: str, as_json: JsonFlag = False) -> None:
    """List a session's networks and the vNICs on each."""

    def body() -> None:
        infos = service().list_networks(session)
        if as_json:
            from vnic.manager import views

            emit_json([views.network_json(n) for n in infos])
            return
        out.print(render.networks_table(infos))

    run(body)


@network_app.command("remove")
def network_remove(session: str, name: str) -> None:
    """Remove a network no vNIC uses (never default)."""

    def body() -> None:
        service().remove_network(session, name)
        out.print(f"network {session}/{name}: removed", markup=False)

    run(body)
