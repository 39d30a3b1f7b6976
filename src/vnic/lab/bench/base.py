"""What the data-plane benchmarks stand on: a throwaway :class:`Bench` (database, agent
state, session) and concurrent UDP flows. :mod:`vnic.lab.bench.run` (netns rates and
launch), :mod:`vnic.lab.bench.impairments` and :mod:`vnic.lab.bench.qemu` import it;
it imports none of them (so they form no circle)."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vnic.agent.core import Agent, local_agent
from vnic.drivers.netns import NetnsDriver
from vnic.lab.measure import UDP_PAYLOAD, Throughput, iperf3
from vnic.manager.results import VmRequest
from vnic.manager.service import Service
from vnic.model.profile import parse_profile_document
from vnic.store.db import Database

#: The measuring peer's rate each way: far above any rate measured.
PEER_RATE = "10Gbit"


@dataclass
class Bench:
    """A throwaway database, an agent of this host's drivers (netns and qemu) with its own
    state directory, and one session."""

    service: Service
    agent: Agent
    session: str

    @property
    def driver(self) -> NetnsDriver:
        """The netns driver (for :meth:`NetnsDriver.exec` in netns VMs)."""
        netns = self.agent.driver("netns")
        assert isinstance(netns, NetnsDriver)
        return netns

    def profile(self, **doc: Any) -> str:
        spec = parse_profile_document(doc)
        self.service.apply_profiles([spec])
        return spec.name

    def launch(self, vm: str, profile: str | None = None, kind: str = "netns") -> str:
        """Define and launch ``vm`` with the ``kind`` driver; its IPv4 address."""
        self.service.add_vm(VmRequest(self.session, vm, profile=profile))
        info = self.service.launch_vm(self.session, vm, self.agent, kind).vm
        assert info.ipv4
        return info.ipv4

    def destroy(self, vm: str) -> None:
        """Stop ``vm`` (whichever driver runs it) and remove its network."""
        self.service.destroy_vm(self.session, vm, self.agent)


@contextlib.contextmanager
def bench_session(default_doc: dict[str, Any]) -> Iterator[Bench]:
    """A :class:`Bench` whose session is torn down when the block ends, failed or not."""
    with tempfile.TemporaryDirectory(prefix="vnic-bench-") as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'bench.db'}")
        service = Service(db)
        service.apply_profiles([parse_profile_document(default_doc)])
        session = f"b{uuid.uuid4().hex[:8]}"
        service.create_session(session, default_profile=default_doc["name"])
        agent = local_agent("netns", state_dir=Path(tmp) / "agent")
        try:
            yield Bench(service, agent, session)
        finally:
            try:
                service.session_down(session, agent)
            finally:
                db.dispose()


def concurrent_udp(
    session: str,
    client: str,
    server: str,
    server_ip: str,
    *,
    tos_values: tuple[int, ...],
    seconds: float,
    offer: str = "10M",
) -> list[Throughput]:
    """One UDP flow per TOS value, all at once, each offering ``offer``; what each received."""
    with ThreadPoolExecutor(len(tos_values)) as pool:
        flows = [
            pool.submit(
                iperf3,
                session,
                client,
                server,
                server_ip,
                seconds=seconds,
                udp_rate=offer,
                length=UDP_PAYLOAD,
                tos=tos,
                port=5301 + i,
            )
            for i, tos in enumerate(tos_values)
        ]
        return [f.result() for f in flows]
