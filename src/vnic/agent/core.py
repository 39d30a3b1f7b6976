"""The host agent: desired state, launch / reconfigure / destroy, reconcile.

The agent keeps the VMs it must run in a small JSON file (its *desired
state*), written atomically before the kernel is touched on launch and before
anything is removed on destroy. That order is what makes SIGKILL at any
moment harmless:

- killed during a launch: the VM is desired but half-built; on restart,
  reconcile finds drift and builds it again from scratch;
- killed during a destroy: the VM is no longer desired but partly there;
  reconcile removes what is left, by ownership (names and tags), nothing else.

The agent never touches the database: the manager sends it requests and,
on its own start, the whole desired set (:meth:`Agent.sync`). The agent
is the manager's :class:`~vnic.agent.port.AgentPort` in process (the HTTP
client of a remote agent is the other one), so the service layer launches
through either alike.

Every mutation holds the host lock (:mod:`vnic.agent.hostlock`, the file
``<state dir>/host.lock``): launches, live changes, destroys and teardowns
shared, reconcile, sync and drift repair (:mod:`vnic.agent.repair`)
exclusive, whichever process on the host makes them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vnic.agent.hostlock import HostLock
from vnic.agent.port import (
    AgentPort,
    DesiredVm,
    Gate,
    ReconcileReport,
    RepairEvent,
    VmKey,
    vm_label,
)
from vnic.agent.state import DesiredState
from vnic.drivers.base import Driver
from vnic.drivers.registry import HOST_DRIVERS
from vnic.errors import (
    DataplaneError,
    InvalidInput,
    NotFound,
    Unavailable,
    Unsupported,
    VnicError,
    storage_error,
)
from vnic.model.command import OUTPUT_DEFAULT, TIMEOUT_DEFAULT, ExecResult, check_exec
from vnic.model.launch import Capabilities, LaunchRequest
from vnic.plan.overlay import Overlay

if TYPE_CHECKING:
    from vnic.agent.feedback import FeedbackEndpoints
    from vnic.agent.monitor import Monitor
    from vnic.agent.repair import Repairer

#: Makes a session's overlays so on this host: (session, overlays, underlay address,
#: largest vNIC MTU per network) -> what changed, one line each.
OverlayEnsure = Callable[[str, Sequence[Overlay], str, Mapping[str, int]], list[str]]


class Agent(AgentPort):
    """One host's drivers, their desired VMs, and the reconcile loop: the agent port
    (:class:`~vnic.agent.port.AgentPort`) in process.

    ``drivers`` maps a kind to a driver; ``default`` is the kind used when a
    request names none. Launches of one session are serialised (they share
    the session's switch); different sessions proceed side by side. ``doctor`` makes
    the host's report (default :func:`vnic.agent.doctor.report`, which probes the
    kernel; a test on the fake driver passes one that touches nothing); ``overlays``
    makes a session's VXLAN overlays so (default :func:`vnic.dataplane.overlay.ensure`;
    on the fake driver, :class:`vnic.drivers.fake.FakeOverlays`).
    """

    def __init__(
        self,
        state_dir: Path,
        drivers: Mapping[str, Driver],
        default: str = "netns",
        *,
        doctor: Callable[[], dict[str, Any]] | None = None,
        overlays: OverlayEnsure | None = None,
    ) -> None:
        self._doctor = doctor
        self._overlays = overlays
        if default not in drivers:
            raise InvalidInput.one("driver", default, "one of " + ", ".join(sorted(drivers)))
        self.drivers = dict(drivers)
        self.default = default
        self.state = DesiredState(state_dir)
        #: One writer per host, across processes (see the module's docstring).
        self.host = HostLock(state_dir / "host.lock")
        self.last_report = ReconcileReport()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._monitor: Monitor | None = None
        self.repairer: Repairer | None = None
        self.feedback: FeedbackEndpoints | None = None

    # The feedback endpoint.

    def serve_feedback(self) -> FeedbackEndpoints:
        """Serve the feedback endpoint in every session with VMs here, from now on
        (``vnic serve`` does, with its manager attached to answer)."""
        from vnic.agent.feedback import FeedbackEndpoints

        if self.feedback is None:
            self.feedback = FeedbackEndpoints(self.vm_at)
            for vm in self.mine():
                self._open_feedback(vm)
        return self.feedback

    def vm_at(self, session: str, address: str) -> str | None:
        """The desired VM of ``session`` with this IPv4 or IPv6 address, if any."""
        for vm in self.state.all():
            r = vm.request
            if r.session == session and address in (str(r.ipv4.ip), str(r.ipv6.ip)):
                return r.vm
        return None

    def _open_feedback(self, vm: DesiredVm) -> None:
        if self.feedback is None or vm.driver not in HOST_DRIVERS:  # on the session's bridge
            return
        try:
            self.feedback.ensure(vm.request.session, vm.request.network_id)
        except (OSError, VnicError) as exc:
            # The VM runs without it; the endpoint is a convenience, not its network.
            log.warning("no feedback endpoint in session %s: %s", vm.request.session, exc)

    # Monitoring.

    @property
    def monitor(self) -> Monitor:
        if self._monitor is None:
            from vnic.agent.monitor import Monitor

            self._monitor = Monitor(self)
        return self._monitor

    def start_monitor(
        self,
        latency_interval: float | None = None,
        drift_interval: float | None = None,
        repair_interval: float | None = None,
    ) -> None:
        """Probe latency and check drift in the background (intervals in seconds).

        With ``repair_interval`` (seconds, > 0) drift is also repaired
        (:mod:`vnic.agent.repair`), and checked that often; 0 or None: drift is
        only reported, every ``drift_interval``.
        """
        if latency_interval is not None:
            self.monitor.latency_interval = latency_interval
        if drift_interval is not None:
            self.monitor.drift_interval = drift_interval
        if repair_interval:
            self.enable_repair(repair_interval)
        self.monitor.start()

    def enable_repair(self, interval: float | None = None) -> Repairer:
        """Repair drift on its own from the next drift check on (``interval`` seconds
        between checks; default :data:`vnic.agent.repair.INTERVAL`)."""
        from vnic.agent.repair import INTERVAL, Repairer

        if self.repairer is None:
            self.repairer = Repairer(self, interval=interval or INTERVAL)
        elif interval:
            self.repairer.interval = interval
        return self.repairer

    def repairs(self, after: int = 0) -> tuple[str, list[RepairEvent]]:
        """The repairer's run id and its kept repairs numbered above ``after``, oldest
        first (:meth:`vnic.agent.repair.Repairer.recent`); ``("", [])`` with repair off."""
        if self.repairer is None:
            return "", []
        return self.repairer.run_id, self.repairer.recent(after)

    def gate(self) -> Gate:
        """The host lock (:attr:`host`): a manager holding it exclusive excludes every
        launch on the host, of any process on this state directory."""
        return self.host

    def metrics_text(self) -> str:
        """Prometheus exposition of every desired vNIC (docs/metrics.md)."""
        return self.monitor.metrics_text()

    def stats(self, session: str) -> list[dict[str, Any]]:
        """Per-vNIC samples of ``session`` as plain data (``vnic top``)."""
        return self.monitor.stats(session)

    # The rest of the agent port (the service layer launches through it).

    @property
    def kind(self) -> str:
        return self.default

    def capabilities(self) -> Capabilities:
        return self.drivers[self.default].capabilities()

    def all_capabilities(self) -> list[Capabilities]:
        return [d.capabilities() for _, d in sorted(self.drivers.items())]

    # Access to a VM, and the host's report.

    def exec(
        self,
        session: str,
        vm: str,
        argv: Sequence[str],
        *,
        timeout: float = TIMEOUT_DEFAULT,
        max_output: int = OUTPUT_DEFAULT,
    ) -> ExecResult:
        """Run ``argv`` in the VM, output captured, killed at ``timeout`` (see
        :meth:`AgentPort.exec`), by the driver that launched it. No lock is held: a
        command may run for minutes, and a reconcile or a destroy must not wait for it
        (a VM removed meanwhile ends the command with it)."""
        items, seconds, size = check_exec(argv, timeout, max_output)
        driver = self.driver(self.kind_of(session, vm))
        return driver.exec_captured(session, vm, items, timeout=seconds, max_output=size)

    def exec_attached(
        self, session: str, vm: str, argv: Sequence[str], kind: str | None = None
    ) -> int:
        """Run ``argv`` in the VM with this process's terminal (stdin, stdout and stderr),
        to its end, without a time limit (a QEMU guest's output arrives when it ends);
        its exit status. By the driver ``kind`` (default: the one that launched it).

        Not on the agent port: only an agent in the caller's process has the caller's
        terminal (the embedded ``vnic vm exec``); a remote caller uses :meth:`exec`. The
        bounds of :meth:`exec` do not apply: the caller is this host's root already."""
        driver = self.driver(kind or self.kind_of(session, vm))
        return driver.exec(session, vm, list(argv)).returncode

    def set_link(self, session: str, vm: str, up: bool, nic: str = "eth0") -> None:
        """Set the link of a QEMU guest's vNIC ``nic`` (QMP ``set_link``); InvalidInput naming
        ``vm`` for a VM whose driver has no link to set, NotFound for a vNIC it lacks."""
        kind = self.kind_of(session, vm)
        driver = self.driver(kind)
        desired = self.state.get((session, vm))
        if desired is not None and nic not in [n.name for n in desired.request.nics]:
            raise NotFound(
                f"vNIC of VM {session}/{vm}", nic, [n.name for n in desired.request.nics]
            )
        try:
            driver.set_link(session, vm, up, nic)
        except Unsupported:
            raise InvalidInput.one(
                "vm", f"{session}/{vm}", f"a QEMU guest (it runs on the {kind} driver)"
            ) from None

    def doctor(self) -> dict[str, Any]:
        """The host's report (:func:`vnic.agent.doctor.report`, unless another was given)."""
        if self._doctor is not None:
            return self._doctor()
        from vnic.agent.doctor import report

        return report()

    def driver(self, kind: str | None = None) -> Driver:
        kind = kind or self.default
        try:
            return self.drivers[kind]
        except KeyError:
            raise InvalidInput.one(
                "driver", kind, "one of " + ", ".join(sorted(self.drivers))
            ) from None

    @contextmanager
    def _session_lock(self, session: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(session, threading.Lock())
        with lock:
            yield

    def launch(self, request: LaunchRequest, kind: str | None = None) -> None:
        """Record the VM as desired, then build it; a failed build is undone in both places."""
        kind = kind or self.default
        driver = self.driver(kind)
        key = (request.session, request.vm)
        # A driver that boots something (QEMU) waits for it outside the session's
        # lock, so guests of one session boot side by side.
        with self.host.shared(), _as_dataplane_error(f"launching {vm_label(key)}"):
            with self._session_lock(request.session):
                self.state.put(DesiredVm(kind, request), new=True)
                try:
                    driver.launch_begin(request)
                except BaseException:
                    self.state.remove([key])
                    raise
            try:
                driver.launch_finish(request)
            except BaseException:
                with self._session_lock(request.session):
                    self.state.remove([key])
                    driver.destroy(request.session, request.vm)
                raise
            self._open_feedback(DesiredVm(kind, request))

    def reconfigure(self, request: LaunchRequest) -> list[str]:
        """Make a running VM match ``request`` with a live change of what differs; return
        one line per kernel object changed (empty when nothing did)."""
        outcome = self.reconfigure_many([request])[(request.session, request.vm)]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def reconfigure_many(
        self, requests: Sequence[LaunchRequest]
    ) -> dict[VmKey, list[str] | VnicError]:
        """:meth:`reconfigure` of many VMs; a driver that can batches them (one pass per
        session namespace). A VM's failure is its outcome, not the others'."""
        out: dict[VmKey, list[str] | VnicError] = {}
        by_driver: dict[str, list[tuple[LaunchRequest, LaunchRequest]]] = {}
        sessions = sorted({r.session for r in requests})
        with contextlib.ExitStack() as locks:
            locks.enter_context(self.host.shared())
            for session in sessions:  # in one order, so two batches never deadlock
                locks.enter_context(self._session_lock(session))
            for request in requests:
                key = (request.session, request.vm)
                current = self.state.get(key)
                if current is None:
                    out[key] = NotFound(
                        f"VM on this host in session {request.session!r}", request.vm
                    )
                elif current.request == request:
                    out[key] = []
                else:
                    by_driver.setdefault(current.driver, []).append((current.request, request))
            for kind, pairs in by_driver.items():
                if kind not in self.drivers:
                    why = Unavailable(f"the {kind} driver is not loaded in this agent")
                    out.update({(r.session, r.vm): why for _, r in pairs})
                    continue
                out.update(self._reconfigure_with(kind, pairs))
        return out

    def _reconfigure_with(
        self, kind: str, pairs: Sequence[tuple[LaunchRequest, LaunchRequest]]
    ) -> dict[VmKey, list[str] | VnicError]:
        driver = self.driver(kind)
        # Desired first: a kill mid-change leaves the new profile to reconcile to.
        self.state.put_many([DesiredVm(kind, request) for _, request in pairs])
        results: dict[VmKey, Any] = {}
        try:
            results = dict(driver.reconfigure_many(pairs))
        except VnicError:
            results = {}  # the batch stopped part-way: one by one says which VM failed
        if not results:
            for previous, request in pairs:
                results[(request.session, request.vm)] = self._one(driver, previous, request)
        out: dict[VmKey, list[str] | VnicError] = {}
        for previous, request in pairs:
            key = (request.session, request.vm)
            result = results.get(key, [])
            if isinstance(result, BaseException):
                self.state.put(DesiredVm(kind, previous))  # it still runs what it ran
                result = result if isinstance(result, VnicError) else DataplaneError(str(result))
            out[key] = result
        return out

    @staticmethod
    def _one(
        driver: Driver, previous: LaunchRequest, request: LaunchRequest
    ) -> list[str] | VnicError:
        try:
            # A driver without live change rebuilds the vNIC (see Driver.reconfigure).
            return [str(line) for line in driver.reconfigure(previous, request) or []]
        except VnicError as exc:
            return exc

    def destroy(self, session: str, vm: str) -> None:
        """Forget the VM first, then remove it: a kill in between leaves an orphan to reap."""
        key = (session, vm)
        with self.host.shared(), self._session_lock(session):
            current = self.state.get(key)
            kind = current.driver if current else self.default
            self.state.remove([key])
            self.driver(kind).destroy(session, vm)

    def teardown_session(self, session: str, vms: Sequence[str] = ()) -> None:
        with self.host.shared(), self._session_lock(session):
            if self.feedback is not None:
                self.feedback.close(session)
            mine = [vm for vm in self.state.all() if vm.request.session == session]
            self.state.remove([vm.key for vm in mine])
            for kind, driver in sorted(self.drivers.items()):
                names = {*vms, *(vm.request.vm for vm in mine if vm.driver == kind)}
                driver.teardown_session(session, sorted(names))
            self.state.forget_session(session)

    def ensure_overlays(
        self, session: str, overlays: Sequence[Overlay], underlay: str
    ) -> list[str]:
        """Make ``session``'s overlays on this host exactly ``overlays`` (``[]``: none), with
        ``underlay`` (this host's underlay address) as the devices' local address; what
        changed, one line each (:func:`vnic.dataplane.overlay.ensure`). The session's
        vNICs here set the MTU each network needs. Idempotent; under the host lock."""
        ensure = self._overlays
        if ensure is None:
            from vnic.dataplane import overlay  # the kernel's side: loaded when first used

            ensure = overlay.ensure
        mtus: dict[str, int] = {}
        for vm in self.state.all():
            for nic in vm.request.nics if vm.request.session == session else ():
                mtus[nic.network] = max(mtus.get(nic.network, 0), nic.profile.mtu.value)
        with (
            self.host.shared(),
            self._session_lock(session),
            _as_dataplane_error(f"the overlays of session {session}"),
        ):
            return ensure(session, overlays, underlay, mtus)

    def kind_of(self, session: str, vm: str) -> str:
        """The driver the VM was launched with (the default for a VM this host does not know)."""
        current = self.state.get((session, vm))
        return current.driver if current is not None else self.default

    def running(self, session: str) -> list[str]:
        found: set[str] = set()
        for driver in self.drivers.values():
            found |= set(driver.running(session))
        return sorted(found)

    # Reconcile.

    def desired(self) -> list[DesiredVm]:
        return self.state.all()

    def desired_vm(self, session: str, vm: str) -> DesiredVm | None:
        """The VM as this host runs it (its driver and request), None if it runs none such."""
        return self.state.get((session, vm))

    def mine(self) -> list[DesiredVm]:
        """Desired VMs of the drivers this agent has loaded (an embedded command loads one)."""
        return [vm for vm in self.state.all() if vm.driver in self.drivers]

    def sync(self, vms: Sequence[DesiredVm]) -> ReconcileReport:
        """Adopt ``vms`` as the whole desired state (the manager's view), then reconcile.

        Under the host lock, exclusive: a manager that read ``vms`` from its
        database under the same hold (:meth:`vnic.manager.dispatch.Manager.reconcile`)
        sees no launch of another process between its read and this.
        """
        with self.host.exclusive():
            self.state.replace(vms)
            return self.reconcile()

    def drift(self, only: Collection[VmKey] | None = None) -> dict[str, list[str]]:
        """Differences between each desired VM (of ``only``, or all) and the kernel, read
        back; only VMs with some, by ``session/vm``.

        Drivers that read many vNICs at once (``drift_many``: one dump per session
        namespace) are asked once for all of theirs.
        """
        out: dict[str, list[str]] = {}
        by_kind: dict[str, list[LaunchRequest]] = {}
        for vm in self.mine():
            if only is not None and vm.key not in only:
                continue
            by_kind.setdefault(vm.driver, []).append(vm.request)
        for kind, requests in sorted(by_kind.items()):
            driver = self.driver(kind)
            found: dict[VmKey, list[str]] = driver.drift_many(requests)
            out.update({vm_label(key): list(d) for key, d in found.items() if d})
        return out

    def reconcile(self) -> ReconcileReport:
        """Rebuild desired VMs that drifted, remove what nobody desires, report what is left.

        Alone on the host (the host lock, exclusive). A removal or rebuild that
        fails is in the report's ``failed``, by what it was about; the pass goes on.
        """
        with self.host.exclusive():
            return self._reconcile()

    def _reconcile(self) -> ReconcileReport:
        report = ReconcileReport()
        desired = {vm.key: vm for vm in self.mine()}
        owned = self.state.owned_sessions()
        for kind, driver in sorted(self.drivers.items()):
            present: dict[str, set[str]] = driver.inventory()
            for session, vms in sorted(present.items()):
                if session not in owned:
                    continue  # another agent's, or a test's: not ours to remove
                with self._session_lock(session):
                    orphans = sorted(
                        vm
                        for vm in vms
                        if (session, vm) not in desired or desired[(session, vm)].driver != kind
                    )
                    for vm in orphans:
                        try:
                            with _as_dataplane_error(f"removing {session}/{vm}"):
                                driver.destroy(session, vm)
                        except VnicError as exc:
                            report.failed[f"{session}/{vm}"] = str(exc)
                            continue
                        report.removed.append(f"{session}/{vm}")
                    # The session's network is shared by the VMs of every driver (netns
                    # VMs and QEMU guests on one bridge): it goes when none is desired.
                    if not any(vm.request.session == session for vm in self.state.all()):
                        if self.feedback is not None:
                            # Its sockets would keep the removed namespace alive.
                            self.feedback.close(session)
                        try:
                            with _as_dataplane_error(f"removing session {session}"):
                                driver.teardown_session(session)
                        except VnicError as exc:
                            report.failed[f"session {session}"] = str(exc)
                            continue
                        self.state.forget_session(session)
                        report.removed.append(f"session {session}")
        before = self.drift()
        for key, wanted in sorted(desired.items()):
            self._repair(wanted, before.get(vm_label(key), []), report)
            self._open_feedback(wanted)
        report.drift = self.drift() if report.reapplied or report.failed else before
        self.last_report = report
        return report

    def _repair(self, vm: DesiredVm, differences: list[str], report: ReconcileReport) -> None:
        if not differences:
            return
        try:
            self.rebuild(vm)
        except VnicError as exc:
            report.failed[vm_label(vm.key)] = str(exc)
            return
        report.reapplied[vm_label(vm.key)] = list(differences)

    def rebuild(self, vm: DesiredVm) -> None:
        """Remove the VM and build it again from its request (the repair of any drift).

        Holds the host lock exclusive (the caller usually does already). Any
        failure leaves as a :class:`~vnic.errors.VnicError`.
        """
        driver = self.driver(vm.driver)
        with (
            self.host.exclusive(),
            self._session_lock(vm.request.session),
            _as_dataplane_error(f"rebuilding {vm_label(vm.key)}"),
        ):
            driver.destroy(vm.request.session, vm.request.vm)
            driver.launch(vm.request)
        # A rebuilt session namespace (it was deleted) needs its feedback endpoint again.
        self._open_feedback(vm)


log = logging.getLogger(__name__)


@contextmanager
def _as_dataplane_error(what: str) -> Iterator[None]:
    """Let a raw kernel or OS error (``NetlinkError``, ``OSError``) leave as a
    :class:`~vnic.errors.DataplaneError` naming ``what`` failed; vnic errors pass, and
    a full disk leaves as :class:`~vnic.errors.NoSpace` naming its file (507, not 500)."""
    try:
        yield
    except VnicError:
        raise
    except Exception as exc:
        full = storage_error(exc)
        if full is not None:
            raise full from exc
        raise DataplaneError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def local_agent(kind: str = "netns", state_dir: Path | None = None) -> Agent:
    """The agent of this host, in this process, launching with the ``kind`` driver by default.

    The host's real drivers (:data:`HOST_DRIVERS`) are all loaded, so a VM is
    destroyed, changed and counted by the driver that launched it whatever
    ``kind`` a command names; ``fake`` loads alone. Embedded commands
    (``vnic vm launch`` without ``--server``) and ``vnic serve`` share its desired
    state under ``$VNIC_HOME/agent``.
    """
    from vnic.drivers.registry import get_driver
    from vnic.settings import Settings

    directory = state_dir or Settings.from_env().home / "agent"
    kinds = [kind] if kind not in HOST_DRIVERS else list(HOST_DRIVERS)
    return Agent(directory, {k: get_driver(k) for k in kinds}, default=kind)
