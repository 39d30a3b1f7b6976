"""``vnic host``: hypervisor hosts whose agents dial out to the manager (``vnic agent
--manager``), embedded or through ``--server``. See ``docs/hosts.md``."""

from typing import TYPE_CHECKING, Annotated

import typer

from vnic.cli import render
from vnic.cli.common import JsonFlag, emit_json, out, pairs, run, service

if TYPE_CHECKING:
    from vnic.manager.hosts import HostInfo

app = typer.Typer(
    no_args_is_help=True, help="Hypervisor hosts: add, list, show, cordon, drain, remove."
)


def _json(info: "HostInfo") -> dict[str, object]:
    from vnic.manager.views import host_json

    return host_json(info)


@app.command("add")
def host_add(
    name: str,
    labels: Annotated[
        list[str] | None, typer.Option("--label", help="Label KEY=VALUE. Repeatable.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Add a host and print its token (shown once): its agent registers with it
    (``vnic agent --manager URL --host NAME --host-token-file F``). From then on VMs
    are placed on hosts."""

    def body() -> None:
        info, token = service().add_host(name, pairs(labels or [], "--label"))
        if as_json:
            emit_json({**_json(info), "token": token})
        else:
            out.print(f"host {name}: added; its token (shown once): {token}", markup=False)

    run(body)


@app.command("list")
def host_list(as_json: JsonFlag = False) -> None:
    """List hosts: state (new, ready, unknown), epoch, VMs and vNICs placed, labels."""

    def body() -> None:
        hosts = service().list_hosts()
        if as_json:
            emit_json([_json(h) for h in hosts])
        else:
            out.print(render.hosts_table(hosts))

    run(body)


@app.command("show")
def host_show(name: str, as_json: JsonFlag = False) -> None:
    """One host, with its lease and capacity."""

    def body() -> None:
        info = service().get_host(name)
        if as_json:
            emit_json(_json(info))
        else:
            out.print(render.hosts_table([info]))
            until = info.lease_until.isoformat() if info.lease_until else "-"
            out.print(f"lease until {until}; metrics {info.metrics_url or '-'}", markup=False)

    run(body)


@app.command("cordon")
def host_cordon(name: str) -> None:
    """Place nothing new on the host; its VMs keep running."""

    def body() -> None:
        service().cordon_host(name, True)
        out.print(f"host {name}: cordoned", markup=False)

    run(body)


@app.command("drain")
def host_drain(name: str, as_json: JsonFlag = False) -> None:
    """Cordon the host and relaunch each of its VMs on another host, with the same MACs
    and addresses; a VM no other host can take stays (and is named)."""

    def body() -> None:
        moves = service().drain_host(name)
        if as_json:
            emit_json([m.__dict__ for m in moves])
            return
        for m in moves:
            where = f"moved to {m.to}" if m.to and not m.error else "stayed"
            why = f" ({m.error})" if m.error else ""
            out.print(f"vm {m.session}/{m.vm}: {where}{why}", markup=False)
        if not moves:
            out.print(f"host {name}: drained (no VMs ran there)", markup=False)

    run(body)


@app.command("uncordon")
def host_uncordon(name: str) -> None:
    """Let placement use the host again."""

    def body() -> None:
        service().cordon_host(name, False)
        out.print(f"host {name}: uncordoned", markup=False)

    run(body)


@app.command("remove")
def host_remove(name: str) -> None:
    """Remove a host no running VM is placed on (those that are are named)."""

    def body() -> None:
        service().remove_host(name)
        out.print(f"host {name}: removed", markup=False)

    run(body)
