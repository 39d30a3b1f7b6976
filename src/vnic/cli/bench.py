"""``vnic bench``: the benchmarks (root, except ``startup``): JSON out plus a short table
(:mod:`vnic.cli.render_bench`). Each benchmark is imported when it runs."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from vnic.cli import render_bench
from vnic.cli.common import out, run

app = typer.Typer(no_args_is_help=True, help="Benchmarks (root): JSON out plus a short table.")


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
            tables = (
                ("rates", render_bench.rates_table),
                ("impairments", render_bench.impairments_table),
            )
            for key, table in tables:
                if key in result:
                    out.print(table(result[key]))
                    for line in render_bench.note_lines(result[key]):
                        out.print(line, markup=False)
            return
        if result.get("driver") == "qemu":
            out.print(render_bench.qemu_launch_table(result))
            for key in ("concurrent_one_session", "concurrent_separate_sessions"):
                for error in result[key]["errors"]:
                    out.print(f"error: {error}", markup=False)
            return
        out.print(render_bench.launch_table(result))

    def body() -> None:
        from vnic.errors import InvalidInput

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


@app.command("fidelity")
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


@app.command("launch")
def bench_launch(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
    driver: Annotated[str, _DRIVER_OPTION] = "netns",
) -> None:
    """Launch 100 shaped VMs: per-VM launch time p50/p99, total, time to read all counters.
    With --driver qemu: 5 guests one at a time (p50/p99), then 4 at once."""
    _bench("launch", json_out, driver=driver)


@app.command("nics")
def bench_nics(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Shorter flows, 10-VM batches (a smoke run).")
    ] = False,
) -> None:
    """Several vNICs per VM (root): each vNIC of a two-vNIC VM against its own rate and delay
    while both carry traffic; launch time of 4 vNICs against 1, of 100 VMs × 2 vNICs
    against 100 × 1."""
    from vnic.lab.bench.nics import run as run_nics

    def body() -> None:
        result = run_nics(quick=quick)
        for table in render_bench.nics_tables(result):
            out.print(table)
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2) + "\n")

    run(body)


@app.command("change")
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


@app.command("api")
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
        out.print(render_bench.api_table(result))
        for line in render_bench.api_lines(result):
            out.print(line, markup=False)
        if json_out:
            json_out.write_text(json.dumps({"benchmark": "api", **result}, indent=2) + "\n")

    run(body)


@app.command("ui")
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
        out.print(render_bench.ui_table(r))
        out.print(f"ratio {r['vms']} VMs / 1 VM: {r['ratio_to_one_vm']}", markup=False)
        if json_out:
            json_out.write_text(json.dumps({"benchmark": "ui", **r}, indent=2) + "\n")

    run(body)


@app.command("load")
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
        out.print(render_bench.load_table(result))
        for line in render_bench.load_lines(result, readers, writers, seconds):
            out.print(line, markup=False)
        if json_out:
            json_out.write_text(json.dumps({"benchmark": "load", **result}, indent=2) + "\n")

    run(body)


@app.command("startup")
def bench_startup(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
    runs: Annotated[
        int, typer.Option("--runs", min=1, max=1000, help="Timed runs of each command.")
    ] = 15,
) -> None:
    """Start-up time (no root needed): python -c pass, the typer and rich import, vnic --help,
    vnic profile list on a fresh SQLite database, tcset --help if installed; each run
    --runs times, interleaved; median seconds and the ratio to python -c pass."""
    from vnic.lab.bench.startup import run as run_startup

    def body() -> None:
        result = run_startup(runs=runs)
        out.print(render_bench.startup_table(result))
        for row in result["commands"]:
            if "error" in row:
                out.print(f"{row['name']} failed: {row['error']}", markup=False)
        for line in render_bench.note_lines(result):
            out.print(line, markup=False)
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2) + "\n")

    run(body)


@app.command("hosts")
def bench_hosts(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON here.")
    ] = None,
    n: Annotated[
        int, typer.Option("--vms", min=1, help="VMs a profile change reaches (issue: 100).")
    ] = 10,
    m: Annotated[
        int, typer.Option("--scale-vms", min=1, help="VMs launched for scale (issue: 300).")
    ] = 30,
    parallel: Annotated[
        int, typer.Option("--parallel", min=1, max=64, help="API launches at once.")
    ] = 4,
    agents: Annotated[
        int, typer.Option("--sim-agents", min=1, help="Simulated agents (issue: 200).")
    ] = 20,
    vnics: Annotated[
        int, typer.Option("--sim-vnics", min=1, help="Simulated vNICs (issue: 20000).")
    ] = 800,
    parts: Annotated[
        str,
        typer.Option(
            "--parts", help="Comma-separated: change, convergence, cross_host, scale, simulation."
        ),
    ] = "change,convergence,cross_host,scale,simulation",
) -> None:
    """Many hosts (root): a host bed of 3 emulated hosts, PostgreSQL, 2 manager replicas:
    a profile change reaching VMs over 3 hosts against all on one, convergence after a
    partition and a manager SIGKILL, scale (launch, resync, down, agent CPU and RSS), and
    a simulation of many agents on the fake driver, and TCP across hosts against on one."""
    from vnic.lab.bench.hosts import PARTS
    from vnic.lab.bench.hosts import run as run_hosts

    def body() -> None:
        from vnic.errors import InvalidInput

        chosen = tuple(p.strip() for p in parts.split(",") if p.strip())
        if not chosen or any(p not in PARTS for p in chosen):
            raise InvalidInput.one(
                "--parts", parts, "a comma-separated list of " + ", ".join(PARTS)
            )
        result = run_hosts(n=n, m=m, parallel=parallel, agents=agents, vnics=vnics, parts=chosen)
        out.print(render_bench.hosts_table(result))
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2) + "\n")

    run(body)
