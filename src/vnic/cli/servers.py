"""``vnic serve`` (the session manager) and ``vnic agent`` (this host's agent on its own):
the two long-running servers. Their server code is imported when one starts."""

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer

from vnic.cli.common import database_url, run

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
    host_wait: Annotated[
        float,
        typer.Option(
            "--host-wait",
            help="Seconds a launch, stop or live change of a VM on a host waits for its"
            " agent's report (the change stays desired after).",
            min=0.0,
            max=600.0,
        ),
    ] = 60.0,
    lease: Annotated[
        float,
        typer.Option(
            "--lease",
            help="Seconds a host's registration or renewal holds its lease (its agent "
            "renews every third of it; past it the host is unknown). Longer for large "
            "fleets: each agent's renewal is a call.",
            min=3.0,
            max=300.0,
        ),
    ] = 10.0,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", help="Serve HTTPS with this certificate (PEM, chain first)."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="The key of --tls-cert (PEM).")
    ] = None,
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
        if (tls_cert is None) != (tls_key is None):
            from vnic.errors import InvalidInput

            missing = "--tls-key" if tls_key is None else "--tls-cert"
            raise InvalidInput.one(
                missing, None, "a PEM file (--tls-cert and --tls-key go together)"
            )
        for option, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            if path is not None and not path.is_file():
                from vnic.errors import InvalidInput

                raise InvalidInput.one(option, str(path), "a readable PEM file")
        key = agent_key_file.read_text().strip() if agent_key_file else None
        served = build_manager(database_url(), agent_url=agent, agent_key=key, driver=driver)
        served.manager.live.interval = controller_interval
        served.manager.service.host_wait = host_wait
        served.manager.service.lease_seconds = lease
        run_manager(
            served,
            host,
            port,
            (latency_interval, drift_interval, repair_interval),
            limits,
            allowed_host or [],
            (tls_cert, tls_key) if tls_cert and tls_key else None,
        )

    run(body)


def agent_command(
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            help="Address to bind (default 127.0.0.1); with --manager: this host's name.",
        ),
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="TCP port (default 8471).")] = None,
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
    manager: Annotated[
        str | None,
        typer.Option(
            "--manager",
            metavar="URL[,URL...]",
            help="Follow the manager at URL (https:// or http://): dial out, register, "
            "list then watch this host's desired state; no control API is served. "
            "Replicas' URLs, comma-separated: when one does not answer, the next is used.",
        ),
    ] = None,
    host_token_file: Annotated[
        Path | None,
        typer.Option("--host-token-file", help="The host's token (with --manager)."),
    ] = None,
    underlay: Annotated[
        str | None,
        typer.Option("--underlay", metavar="ADDR", help="This host's underlay IP address."),
    ] = None,
    vnics: Annotated[
        int | None, typer.Option("--vnics", help="vNICs this host may run (default 64).")
    ] = None,
    cpus: Annotated[
        int | None, typer.Option("--cpus", help="CPUs this host offers (default: all it has).")
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", metavar="KEY=VALUE", help="A label for placement (repeatable)."),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option("--ca", help="CA bundle (PEM) that verifies an https:// manager."),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            metavar="HOST:PORT",
            help="Serve GET /metrics (read-only, nothing else) there; its URL is registered.",
        ),
    ] = None,
) -> None:
    """Run this host's agent on its own. Without --manager: it serves its API, and the
    manager reaches it with --agent URL. With --manager URL --host-token-file F --host
    NAME --underlay ADDR: it dials out to the manager instead and follows this host's
    desired state. Either way it reconciles the kernel with its desired state first;
    SIGTERM stops it and leaves the VMs running."""
    from vnic.agent.core import local_agent

    if manager is None:
        follow_only = {
            "--host-token-file": host_token_file,
            "--underlay": underlay,
            "--vnics": vnics,
            "--cpus": cpus,
            "--label": label or None,
            "--ca": ca,
            "--metrics-listen": metrics_listen,
        }

        def serve_api() -> None:
            from vnic.agent.api import agent_key
            from vnic.server import run_agent
            from vnic.settings import Settings

            _refuse(follow_only, "only with --manager")
            home = Settings.from_env().home
            key = agent_key(key_file or home / "agent.key")
            run_agent(
                local_agent(driver, state_dir),
                key,
                host or "127.0.0.1",
                port if port is not None else 8471,
                (latency_interval, drift_interval, repair_interval),
                allowed_host or [],
            )

        run(serve_api)
        return

    def follow() -> None:
        from vnic.cli.follow_flags import follow_flags
        from vnic.server import run_follower

        _refuse(
            {"--port": port, "--key-file": key_file, "--allowed-host": allowed_host or None},
            "no control API is served with --manager (metrics: --metrics-listen)",
        )
        flags = follow_flags(
            manager, host_token_file, host, underlay, vnics, cpus, label or [], ca, metrics_listen
        )
        agent = local_agent(driver, state_dir)
        metrics = flags.bind_metrics(agent.metrics_text, agent.stats)
        run_follower(
            agent,
            flags.source(),
            flags.info(metrics),
            (latency_interval, drift_interval, repair_interval),
            metrics,
        )

    run(follow)


def _refuse(given: Mapping[str, object], why: str) -> None:
    """InvalidInput naming every flag of ``given`` that was given (not None)."""
    from vnic.errors import FieldError, InvalidInput, show_value

    wrong = [FieldError(k, show_value(str(v)), why) for k, v in given.items() if v is not None]
    if wrong:
        raise InvalidInput(wrong)
