"""``vnic serve`` (the session manager) and ``vnic agent`` (this host's agent on its own):
the two long-running servers. Their server code is imported when one starts."""

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
        from vnic.settings import Settings

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
