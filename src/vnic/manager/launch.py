"""The launch use cases: launch, stop and the desired state; the parallel launch pool.

A launch reads the database, has the agent act, and records what runs; a VM the
database does not record as running must not run (:meth:`Launching.launch_vm`).
:meth:`Launching.launch_many` runs launches in forked processes, each with its own
database connection and agent, and a :class:`Launching` (all a launch needs).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select

from vnic.agent.port import AgentPort
from vnic.errors import Conflict, InvalidInput, VnicError, error_from_body
from vnic.manager import changelog
from vnic.manager.core import applied_state
from vnic.manager.hosts import Hosts
from vnic.manager.results import Explanation, LaunchOutcome
from vnic.model.launch import PRIMARY_NIC, LaunchRequest, check_nic_count
from vnic.store.db import Database
from vnic.store.models import VmRow


class Launching(Hosts):
    """Running VMs: launch, stop, and what the agents must run."""

    def launch_vm(
        self,
        session: str,
        name: str,
        driver: AgentPort,
        kind: str | None = None,
        *,
        host: str | None = None,
    ) -> Explanation:
        """Resolve the VM's vNICs' profiles, hand the launch request to ``driver``, record
        what runs. A VM with more vNICs than the driver takes
        (:attr:`Capabilities.max_nics`) is refused before anything is touched.

        ``driver`` is the agent (:class:`~vnic.agent.port.AgentPort`); ``kind`` picks
        one of its drivers (``netns``, ``qemu``); None: the agent's default. The
        driver refuses unsupported fields before touching anything and removes what
        it made if the launch fails; the VM then stays defined (also when recording
        it fails: the VM is removed again).

        From the database read to the database write under the agent's gate, shared
        (:meth:`AgentPort.gate`; this host's agent's is its host lock): a reconcile
        (exclusive, in ``vnic serve`` or any process on the host) then sees the
        database and the agent's desired state both before or both after, never a
        launch half-recorded.

        Once hosts are added (:mod:`vnic.manager.hosts`), the VM is placed on one
        (``host``, or by capacity, labels and the session's placement) instead: its
        placement, state and a change of its host's desired state are written in one
        transaction, and the launch waits up to :attr:`host_wait` seconds for the
        agent's report. A failure the agent reports undoes the launch and is raised;
        no report in time leaves the VM desired (its agent runs it when it can).
        """
        with driver.gate().shared():
            with self.db.transaction() as s:
                vm = self._vm_row(s, session, name)
                if vm.state == "running":
                    raise Conflict(f"VM {session}/{name} is already running")
                effs = self._resolve_nics(s, vm)
                request = self._launch_request(vm, effs)
                revision = None
                if host is not None or self._fleet_active(s):
                    vm.host_id = self._place(s, vm, host).id
                    vm.state = "running"
                    s.flush()
                    revision = self._append(s, vm, placement=set())
                    vm.applied = {
                        **applied_state(kind or "netns", effs),
                        changelog.LOGGED: revision,
                    }
            if revision is None:
                return self._launch_here(driver, kind, request, effs)
        # Waited for with the gate let go: the gate covers this host's own agent, and a
        # reconcile of it (a replica starting) must not wait for other hosts' reports.
        return self._await_launch(session, name, revision, effs)

    def _launch_here(
        self,
        driver: AgentPort,
        kind: str | None,
        request: LaunchRequest,
        effs: dict[str, Any],
    ) -> Explanation:
        """The launch on the manager's own agent, recorded as running (under the gate)."""
        session, name = request.session, request.vm
        used = kind or driver.kind
        caps = {c.kind: c for c in driver.all_capabilities()}
        if used in caps:  # an unknown kind is the agent's InvalidInput, below
            check_nic_count(caps[used], len(request.nics))
        driver.launch(request, kind)
        try:
            with self.db.transaction() as s:
                vm = self._vm_row(s, session, name)
                vm.state = "running"
                vm.applied = applied_state(used, effs)
                return Explanation(self._vm_info(vm), effs[PRIMARY_NIC], effs)
        except BaseException:
            driver.destroy(session, name)  # not recorded as running: must not run
            raise

    def _await_launch(
        self, session: str, name: str, revision: int, effs: dict[str, Any]
    ) -> Explanation:
        self.waiters.local_wake()
        status = self.wait_status(session, name, revision, self.host_wait)
        if status is not None and status.error:
            self._unplace(session, name)
            raise error_from_body(dict(status.error))
        with self.db.reading() as s:
            vm = self._vm_row(s, session, name)
            return Explanation(self._vm_info(vm), effs[PRIMARY_NIC], effs)

    def _unplace(self, session: str, name: str) -> int | None:
        """Record a hosted VM as stopped and tell its host (the VM stays assigned to it
        until it is launched again); the change's revision, None for a VM on no host."""
        with self.db.transaction() as s:
            vm = self._vm_row(s, session, name)
            vm.state = "defined"
            vm.applied = None
            if vm.host_id is None:
                return None
            revision = self._append(s, vm, placement={vm.host_id})
        self.waiters.local_wake()
        return revision

    def desired(self) -> list[tuple[str, LaunchRequest]]:
        """``(driver kind, launch request)`` of every VM the database says is running on
        the manager's own agent (on no host): what that agent must run."""
        with self.db.reading() as s:
            out = []
            running = select(VmRow).where(VmRow.state == "running", VmRow.host_id.is_(None))
            for vm in s.scalars(running):
                kind = str((vm.applied or {}).get("driver", "netns"))
                out.append((kind, self._launch_request(vm, self._resolve_nics(s, vm))))
            return out

    def mark_stopped(self, session: str, name: str) -> None:
        """Record that a VM no longer runs (its agent lost it and could not restore it)."""
        with self.db.transaction() as s:
            vm = self._vm_row(s, session, name)
            vm.state = "defined"
            vm.applied = None

    def launch_many(
        self,
        session: str,
        names: Sequence[str],
        driver_kind: str = "netns",
        workers: int = 2,
        *,
        agents: Callable[[str], AgentPort],
    ) -> list[LaunchOutcome]:
        """Launch ``names`` with ``workers`` processes, each with its own database
        connection and agent, ``agents(driver_kind)``, made in the process after the fork
        (launches are CPU-bound: one process per core; a netlink socket is not to share).

        Every VM is attempted; the outcomes say which launched, in how long,
        and why the others failed.
        """
        if not names:
            return []
        if workers < 1:
            raise InvalidInput.one("workers", workers, "a number of processes of at least 1")
        # The first launch brings the session's network up; after it, launches
        # of different VMs touch disjoint objects and may run side by side.
        outcomes = [_timed_launch(self, agents(driver_kind), session, names[0])]
        rest = [(session, name) for name in names[1:]]
        if rest:
            # Children get their own connections; the parent's pool must not be shared.
            self.db.dispose()
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(
                min(workers, len(rest)),
                initializer=_worker_init,
                initargs=(self.db.url, driver_kind, agents),
            ) as pool:
                outcomes += pool.imap_unordered(_worker_launch, rest)
        return outcomes

    def destroy_vm(self, session: str, name: str, driver: AgentPort) -> None:
        """Stop the VM and remove its network; its definition (and MAC) stays. A VM on a
        host: its host is told, and the stop waits for its report (:attr:`host_wait`)."""
        with self.db.transaction() as s:
            hosted = self._vm_row(s, session, name).host_id is not None
        if hosted:  # not the own agent's: no gate (its reconcile must not wait for it)
            revision = self._unplace(session, name)
            if revision is not None:
                self.wait_status(session, name, revision, self.host_wait)
            return
        with driver.gate().shared():
            driver.destroy(session, name)
            with self.db.transaction() as s:
                vm = self._vm_row(s, session, name)
                vm.state = "defined"
                vm.applied = None

    def session_down(self, session: str, driver: AgentPort) -> list[str]:
        """Stop every VM of the session and remove its network. Returns the VMs stopped.
        The hosts of VMs placed on hosts are told, and their reports awaited
        (:attr:`host_wait` in all)."""
        with self.db.transaction() as s:
            names = [v.name for v in self._session_row(s, session).vms]
            hosted, ran_on = [], set()
            row = self._session_row(s, session)
            for vm in row.vms:
                if vm.host_id is not None and vm.state == "running":
                    vm.state, vm.applied = "defined", None
                    hosted.append((session, vm.name, self._append(s, vm)))
                    ran_on.add(vm.host_id)
            if ran_on:
                self._append_overlays(s, row.id, session, ran_on)
        if hosted:  # waited for with the gate let go, as in launch_vm
            self.waiters.local_wake()
            self.wait_statuses(hosted, self.host_wait)
        with driver.gate().shared():
            running = sorted(set(driver.running(session)) | set(names))
            driver.teardown_session(session, names)
            with self.db.transaction() as s:
                for vm in self._session_row(s, session).vms:
                    vm.state = "defined"
                    vm.applied = None
            return running


#: A pool process's launcher (``service``) and agent (``driver``), set by :func:`_worker_init`.
_worker: dict[str, Any] = {}


def _worker_init(url: str, driver_kind: str, agents: Callable[[str], AgentPort]) -> None:
    # A Launching, not the whole Service: all a launch needs, and launch.py cannot
    # import service.py (which composes it).
    _worker["service"] = Launching(Database(url, migrate=False))
    _worker["driver"] = agents(driver_kind)


def _worker_launch(task: tuple[str, str]) -> LaunchOutcome:
    session, name = task
    return _timed_launch(_worker["service"], _worker["driver"], session, name)


def _timed_launch(service: Launching, driver: AgentPort, session: str, name: str) -> LaunchOutcome:
    start = time.perf_counter()
    try:
        service.launch_vm(session, name, driver)
    except VnicError as exc:
        return LaunchOutcome(name, time.perf_counter() - start, str(exc))
    return LaunchOutcome(name, time.perf_counter() - start)
