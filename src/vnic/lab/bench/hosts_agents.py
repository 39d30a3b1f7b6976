"""In-memory agents for the simulation of ``vnic bench hosts``: each a real
:class:`~vnic.agent.follow.Follower` with a real :class:`~vnic.agent.upstream.HttpSource`
over HTTP, on the in-memory fake driver (:class:`~vnic.drivers.fake.FakeDriver`, the one
the unit tests use) and in-memory overlays (:class:`~vnic.drivers.fake.FakeOverlays`:
before, the simulated agents' overlays were made by the real VXLAN code, which read the
machine's routes for every peer), one thread each (and its lease thread) in this process.

``python -m vnic.lab.bench.hosts_agents`` reads one JSON document on stdin: ``root`` (a
directory: each agent's desired-state directory is ``root/NAME``), ``vnics`` (each
host's capacity) and ``hosts`` (each ``[name, token, manager URL]``); it follows until
SIGTERM, then exits 0 without waiting for the long polls in flight (nothing of the fake
driver outlives the process).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from vnic.agent.core import Agent
from vnic.agent.follow import Follower
from vnic.agent.upstream import HostInfo, HttpSource
from vnic.drivers.fake import FakeDriver, FakeOverlays


def follow_all(doc: dict[str, Any], stop: threading.Event) -> list[threading.Thread]:
    """Start a follower thread per host of ``doc``; they run until ``stop`` is set."""
    threads = []
    for i, (name, token, url) in enumerate(doc["hosts"]):
        agent = Agent(
            Path(doc["root"]) / name,
            {"fake": FakeDriver()},
            default="fake",
            overlays=FakeOverlays(),  # no kernel: the overlays are held in memory too
        )
        underlay = f"10.{200 + i // 65536 % 50}.{i // 256 % 256}.{i % 256}"
        info = HostInfo(name, underlay, int(doc["vnics"]), 1)
        follower = Follower(agent, HttpSource(url, token), info)
        thread = threading.Thread(target=follower.run, args=(stop,), name=name, daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    follow_all(json.load(sys.stdin), stop)
    print("following", flush=True)
    stop.wait()
    os._exit(0)  # the daemon threads' long polls end with the process


if __name__ == "__main__":
    main()
