"""The agent following its manager: register, list, then watch (``vnic agent --manager``).

The agent dials out (no control port on the host, no database credentials on it) to a
:class:`~vnic.agent.upstream.DesiredSource` and makes its host run what the source
says, level-based: a change carries the VM's whole desired state *now*, so applying
it twice, or late, or after a newer one was missed and relisted, does no harm
(ensure, not create):

- desired none: destroy the VM if it runs (and the session's network with its last VM);
- not running: launch it; running on another driver: destroy, then launch;
- running with another request: change it live (:meth:`Agent.reconfigure`, no rebuild);
- running with the same request: nothing.

One VM's failure is its status (:class:`~vnic.agent.upstream.VmStatus`), not the
others'. The order of one turn (:meth:`Follower.step`):

1. **register** when there is no registration, it was fenced (409: another
   registration is current, or the lease lapsed on the manager) or its lease ran out
   by this process's own monotonic clock (the process was paused past it): always
   before acting on anything else, and each new registration (a new epoch) relists;
2. **relist** (a snapshot, then one full reconcile: live changes first, then
   :meth:`Agent.sync`, which rebuilds what still differs and removes what nobody
   desires) after a registration, a 410, any reconnect and every ``resync`` seconds;
3. otherwise **watch**: one long poll for the changes after the revision held, each
   applied in order, the registration checked again before each.

A session's overlays (its networks across hosts, ``docs/overlay.md``) are held here,
made so on every change of them, every full reconcile and right after a launch of a VM
of the session (its namespace may be new), and reported as a status with ``vm ""``.

A status goes to the manager for every VM a snapshot or change named. A lease thread
renews every lease/3 seconds and registers again at once when fenced. No answer from
the manager: retry after 0.2 s, doubling to 2 s (:class:`Backoff`), then relist. Each
of those waits is scaled by a random factor from 0.75 to 1 (:func:`jitter`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping

from vnic.agent.core import Agent
from vnic.agent.port import DesiredVm, VmKey, vm_label
from vnic.agent.upstream import (
    Change,
    DesiredSource,
    Fenced,
    HostInfo,
    Refused,
    Registration,
    Relist,
    Snapshot,
    Unreachable,
    VmStatus,
    error_doc,
)
from vnic.errors import InvalidInput, VnicError
from vnic.model.launch import LaunchRequest
from vnic.plan.overlay import Overlay

log = logging.getLogger("vnic.agent.follow")

#: Seconds one long poll may wait for a change (the contract allows up to 30).
WAIT = 25.0
#: Seconds between two full reconciles when nothing else asks for one. Five minutes: the
#: change log delivers every change, and every reconnect relists; the period is a safety
#: net. A full reconcile is a snapshot of every VM and every overlay of the host (every
#: remote MAC of each of its sessions): with 200 agents at 20 000 vNICs, one a minute per
#: agent was a large part of the simulation's load.
RESYNC = 300.0
#: Seconds: the first retry after no answer, and the longest wait between two (short: a
#: healed partition or a restarted manager is followed again within it; a fleet's
#: retries at a manager that is down are refused connections, cheap to answer).
BACKOFF_FIRST, BACKOFF_CAP = 0.2, 2.0
#: Seconds between two tries at most while the manager's address refuses connections
#: (nothing listens: a replica restarting answers within this of its start).
REFUSED_CAP = 0.5


def jitter() -> float:
    """A factor from 0.75 to 1 for each wait between calls (lease renewals, retries): a
    fleet started at once, or cut off at once, does not call its manager in step."""
    return random.uniform(0.75, 1.0)


class Backoff:
    """Waits between retries: ``first`` seconds, doubling up to ``cap``; :meth:`reset`
    after a success."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> None:
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


class Follower:
    """Makes ``agent``'s host run what ``source`` desires for the host ``info`` names.

    ``resync``: seconds between full reconciles (default :data:`RESYNC`); ``wait``:
    seconds of one long poll (default :data:`WAIT`); ``clock``: monotonic seconds, the
    lease's time (injected by tests); ``sleep``: how :meth:`run` waits between retries
    (default: the stop event's wait, so a stop ends it); ``spread``: the factor each wait
    between two calls is scaled by (default :func:`jitter`; tests pin it to 1).
    """

    def __init__(
        self,
        agent: Agent,
        source: DesiredSource,
        info: HostInfo,
        *,
        resync: float = RESYNC,
        wait: float = WAIT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        backoff: Backoff | None = None,
        spread: Callable[[], float] = jitter,
    ) -> None:
        self.agent, self.source, self.info = agent, source, info
        self.spread = spread
        self.resync, self.wait, self.clock = resync, wait, clock
        self._sleep = sleep
        self.backoff = backoff or Backoff()
        self._lease_backoff = Backoff(self.backoff.first, self.backoff.cap)
        #: The registration acted under (None before the first).
        self.registration: Registration | None = None
        #: The revision of the host's desired state applied so far.
        self.revision = 0
        # Guards the registration, its lease deadline and the fenced mark, which the
        # lease thread and the main loop both read and replace.
        self._lock = threading.RLock()
        self._deadline = 0.0
        self._fenced = False
        self._synced_epoch: int | None = None  # epoch of the last full reconcile
        self._relist_asked = True
        self._last_sync = 0.0
        #: Each session's overlays on this host as the manager desires them (kept while
        #: the session has no VM here, applied when its namespace appears).
        self.overlays: dict[str, list[Overlay]] = {}
        self._streak = 0  # failed turns in a row
        # Held while the host is changed (a relist, a batch of changes): halt() waits
        # for it, so a stop never cuts an apply short.
        self._acting = threading.Lock()
        self._halted = False
        self._registered = threading.Event()  # wakes the lease thread

    # Registration and lease.

    def current(self) -> Registration:
        """The registration to act under: a new one first when there is none, it was
        fenced, or its lease ran out by this process's clock."""
        with self._lock:
            reg, why = self.registration, ""
            if reg is None:
                why = "registering"
            elif self._fenced:
                why = f"epoch {reg.epoch} fenced: registering again"
            elif self.clock() >= self._deadline:
                why = f"lease of epoch {reg.epoch} ran out by this agent's clock: registering again"
            if reg is not None and not why:
                return reg
            started = self.clock()  # the lease runs from the request, not the answer
            new = self.source.register(self.info)
            self.registration, self._deadline, self._fenced = (
                new,
                started + new.lease_seconds,
                False,
            )
            self._registered.set()
            log.info(
                "%s: host %s has epoch %d (lease %g s, revision %d)",
                why,
                new.host,
                new.epoch,
                new.lease_seconds,
                new.revision,
            )
            return new

    def stale(self, reg: Registration) -> bool:
        """Whether ``reg`` may no longer be acted under (replaced, fenced, lapsed)."""
        with self._lock:
            return self.registration is not reg or self._fenced or self.clock() >= self._deadline

    def fence(self, reg: Registration, why: object) -> None:
        """Mark ``reg`` stale (if it is still the current one): the next turn registers."""
        with self._lock:
            if self.registration is reg and not self._fenced:
                self._fenced = True
                log.info("epoch %d fenced: %s", reg.epoch, why)

    def renew_once(self) -> float:
        """Renew the lease once, or register again if it is fenced or lapsed (the lease
        thread's turn); seconds until the next turn (a third of the lease)."""
        with self._lock:
            reg = self.registration
            if reg is None:
                return 0.5  # the main loop registers first
            lapsed = self._fenced or self.clock() >= self._deadline
        if not lapsed:
            started = self.clock()
            try:
                lease = self.source.renew(reg.epoch)
            except Fenced as exc:
                self.fence(reg, f"lease refused: {exc}")
            except (Unreachable, VnicError) as exc:
                log.info("renewing the lease of epoch %d failed: %s", reg.epoch, exc)
                return self._retry_lease(reg)
            else:
                with self._lock:
                    if self.registration is reg:
                        self._deadline = started + lease
                self._lease_backoff.reset()
                return lease / 3 * self.spread()
        try:
            # At once, not at the main loop's next turn (it may be in a long poll): the
            # host is not left without a lease that long.
            reg = self.current()
        except (Unreachable, VnicError) as exc:
            log.info("registering again failed: %s", exc)
            return self._retry_lease(reg)
        self._lease_backoff.reset()
        return reg.lease_seconds / 3 * self.spread()

    def _retry_lease(self, reg: Registration) -> float:
        """Seconds to the next try after a failed one: the backoff, but never past a
        third of the lease (a lease thread that slept through it would lose it), so
        a fleet does not hammer a manager that is down."""
        return min(self._lease_backoff.next(), reg.lease_seconds / 3) * self.spread()

    # The main loop.

    def run(self, stop: threading.Event) -> None:
        """Follow until ``stop`` is set: the lease thread, and :meth:`step` after step,
        retrying what fails (see the module's docstring). Leaves every VM as it runs."""
        sleep = self._sleep or stop.wait

        def renewing() -> None:
            delay = 0.0
            while not stop.is_set():
                if self._registered.wait(delay):
                    # A new registration: its lease counts from now, a third of it to go.
                    self._registered.clear()
                    reg = self.registration
                    delay = reg.lease_seconds / 3 * self.spread() if reg is not None else 0.5
                    continue
                delay = self.renew_once()

        threading.Thread(target=renewing, name="vnic-lease", daemon=True).start()
        while not stop.is_set() and not self._halted:
            delay = self.turn()
            if delay:
                sleep(delay)

    def turn(self) -> float:
        """One :meth:`step`, its failure handled (what :meth:`run` repeats): seconds to
        wait before the next turn (0: none)."""
        try:
            self.step()
        except (Relist, Fenced) as exc:
            if isinstance(exc, Fenced) and self.registration is not None:
                self.fence(self.registration, exc)
            else:
                log.info("relisting: %s", exc)
            self._relist_asked = True
            self._streak += 1
            # Once is normal; again and again is a manager that cannot keep a watch or
            # a registration: do not hammer it.
            return self.backoff.next() * self.spread() if self._streak > 1 else 0.0
        except Exception as exc:
            # A daemon's loop: whatever failed (no answer, a refused token, a full
            # disk), it is logged and tried again; the VMs keep running meanwhile.
            delay = self.backoff.next()
            if isinstance(exc, Refused):
                delay = min(delay, REFUSED_CAP)
            delay *= self.spread()
            level = logging.INFO if isinstance(exc, Unreachable) else logging.WARNING
            log.log(level, "%s; retrying in %g s, then relisting", exc, delay)
            self._relist_asked = True
            self._streak += 1
            return delay
        self.backoff.reset()
        self._streak = 0
        return 0.0

    def halt(self, timeout: float = 30.0) -> bool:
        """Change nothing from now on: wait up to ``timeout`` seconds for a change in
        progress to end (False if it did not), and begin none after. The VMs keep
        running (the manager decides what becomes of them)."""
        done = self._acting.acquire(timeout=timeout)
        self._halted = True
        if done:
            self._acting.release()
        return done

    def step(self) -> None:
        """One turn: register if needed, then relist if needed, else one watch round."""
        reg = self.current()
        if self._synced_epoch != reg.epoch or self._relist_asked:
            why = None
        elif self.clock() - self._last_sync >= self.resync:
            why = f"periodic full reconcile (every {self.resync:g} s)"
        else:
            revision, changes = self.source.changes(self.revision, self.wait)
            with self._acting:
                if not self._halted:
                    self.apply(reg, revision, changes)
            return
        if why:
            log.info("%s", why)
        with self._acting:
            if not self._halted:
                self.relist(reg)

    def relist(self, reg: Registration) -> None:
        """A snapshot, then a full reconcile to it, then a status for every VM it names."""
        snap = self.source.snapshot()
        if snap.epoch is not None and snap.epoch != reg.epoch:
            raise Fenced(f"the manager answers for epoch {snap.epoch}, not {reg.epoch}")
        if self.stale(reg):
            return  # the next turn registers first
        statuses = self._reconcile(snap)
        self.revision, self._synced_epoch = snap.revision, reg.epoch
        self._relist_asked, self._last_sync = False, self.clock()
        self._report(reg, statuses)

    def _reconcile(self, snap: Snapshot) -> list[VmStatus]:
        rev = snap.revision
        statuses: list[VmStatus] = []
        wanted: list[DesiredVm] = []
        running = {vm.key: vm for vm in self.agent.desired()}
        refused = dict(snap.invalid)
        for vm in snap.vms:
            if vm.driver not in self.agent.drivers:
                known = ", ".join(sorted(self.agent.drivers))
                refused[vm.key] = InvalidInput.one("driver", vm.driver, f"one of {known}")
        for key, error in refused.items():
            # A document this agent cannot follow is no reason to stop what runs.
            kept = running.get(key)
            wanted += [kept] if kept is not None else []
            statuses.append(VmStatus(key[0], key[1], rev, error_doc(error)))
        changed: list[LaunchRequest] = []
        for vm in snap.vms:
            if vm.key in refused:
                continue
            wanted.append(vm)
            current = running.get(vm.key)
            if current is not None and current.driver == vm.driver and current != vm:
                changed.append(vm.request)
        # Live first: a VM that missed a profile change keeps its traffic; the sync
        # below rebuilds only what this could not mend.
        live: dict[str, list[str]] = {}
        for key, result in self.agent.reconfigure_many(changed).items() if changed else ():
            if isinstance(result, VnicError):
                log.info("live change of %s failed, it is rebuilt: %s", vm_label(key), result)
            else:
                live[vm_label(key)] = result
        report = self.agent.sync(wanted)
        for vm in wanted:
            label = vm_label(vm.key)
            if vm.key in refused:
                continue  # kept as it runs: its status says why already
            failed = report.failed.get(label)
            doc = None if failed is None else {"kind": "dataplane", "message": failed, "fields": []}
            changes = live.get(label, []) + [
                f"rebuilt: {d}" for d in report.reapplied.get(label, [])
            ]
            statuses.append(VmStatus(*vm.key, rev, doc, changes))
        for label in report.removed:
            if not label.startswith("session "):
                session, _, name = label.partition("/")
                statuses.append(VmStatus(session, name, rev, None, ["removed"]))
        statuses += self._reconcile_overlays(snap)
        log.info(
            "full reconcile at revision %d: %d VMs, %d rebuilt, %d removed, %d failed",
            rev,
            len(snap.vms),
            len(report.reapplied),
            len(report.removed),
            len(report.failed) + len(refused),
        )
        return statuses

    def _reconcile_overlays(self, snap: Snapshot) -> list[VmStatus]:
        """Every session's overlays as the snapshot says (those it no longer names:
        none); a session whose overlays did not parse keeps what it had."""
        statuses = [
            VmStatus(session, "", snap.revision, error_doc(error))
            for session, error in snap.overlay_errors.items()
        ]
        wanted = dict(snap.overlays)
        for session in snap.overlay_errors:
            if session in self.overlays:
                wanted[session] = self.overlays[session]
        for session in sorted(set(wanted) | set(self.overlays)):
            if session not in snap.overlay_errors:
                statuses.append(self._set_overlays(session, wanted.get(session, []), snap.revision))
        return statuses

    def _set_overlays(self, session: str, overlays: list[Overlay], revision: int) -> VmStatus:
        """Hold ``overlays`` as the session's and make them so on the host; the status."""
        if overlays:
            self.overlays[session] = list(overlays)
        else:
            self.overlays.pop(session, None)
        try:
            lines = self.agent.ensure_overlays(session, overlays, self.info.underlay)
        except Exception as exc:  # the session's overlays failed: its status, not the others'
            log.info("overlays of session %s at revision %d failed: %s", session, revision, exc)
            return VmStatus(session, "", revision, error_doc(exc))
        return VmStatus(session, "", revision, None, lines)

    def apply(self, reg: Registration, revision: int, changes: list[Change]) -> None:
        """Apply ``changes`` in order, then hold ``revision``; stop (without moving the
        revision) when ``reg`` goes stale: the next turn registers and relists.

        Consecutive live changes (running VMs, new requests: a profile change reaching
        many VMs) go to the agent as one batch (:meth:`Agent.reconfigure_many`, one pass
        per session namespace); any other change first ends the batch, so the order holds.
        """
        statuses: list[VmStatus] = []
        batch: list[Change] = []
        stopped = False
        for change in changes:
            if self.stale(reg):
                stopped = True
                break
            if self._live(change) and all(c.key != change.key for c in batch):
                batch.append(change)
                continue
            statuses += self._apply_live(batch)
            batch = []
            if self.stale(reg):
                stopped = True
                break
            if self._live(change):
                batch.append(change)  # the same VM again: after the batch that had it
            else:
                statuses += self._apply_one(change)
        if not stopped and batch and self.stale(reg):
            stopped = True
        if not stopped:
            statuses += self._apply_live(batch)
            self.revision = max(self.revision, revision)
        if statuses:
            self._report(reg, statuses)

    def _live(self, change: Change) -> bool:
        """Whether ``change`` is a live change of a VM running here on the same driver."""
        want = change.desired
        if want is None or change.error is not None:
            return False
        current = self.agent.desired_vm(change.session, change.vm)
        return current is not None and current.driver == want.driver and current != want

    def _apply_live(self, batch: list[Change]) -> list[VmStatus]:
        if not batch:
            return []
        requests = [c.desired.request for c in batch if c.desired is not None]
        results: Mapping[VmKey, list[str] | BaseException]
        try:
            results = self.agent.reconfigure_many(requests)
        except Exception as exc:  # the batch as a whole failed (the host lock): each says so
            results = {c.key: exc for c in batch}
        out = []
        for c in batch:
            result = results.get(c.key, [])
            if isinstance(result, BaseException):
                log.info("applying %s/%s at revision %d failed: %s", *c.key, c.revision, result)
                out.append(VmStatus(c.session, c.vm, c.revision, error_doc(result)))
            else:
                out.append(VmStatus(c.session, c.vm, c.revision, None, list(result)))
        return out

    def _apply_one(self, change: Change) -> list[VmStatus]:
        """The change's status (a VM's, or with ``vm ""`` the session's overlays'); after a
        launch, the session's overlays made again (its namespace may be new) and theirs."""
        session, vm, rev = change.session, change.vm, change.revision
        if change.error is not None:
            log.info(
                "desired state of %s/%s at revision %d refused: %s", session, vm, rev, change.error
            )
            return [VmStatus(session, vm, rev, error_doc(change.error))]
        if change.overlays is not None:
            return [self._set_overlays(session, change.overlays, rev)]
        try:
            lines = self._ensure(change)
        except Exception as exc:  # this VM's failure is its status; the others go on
            log.info("applying %s/%s at revision %d failed: %s", session, vm, rev, exc)
            return [VmStatus(session, vm, rev, error_doc(exc))]
        out = [VmStatus(session, vm, rev, None, lines)]
        launched = any(line.startswith("launched") for line in lines)
        if launched and self.overlays.get(session):
            out.append(self._set_overlays(session, self.overlays[session], rev))
        return out

    def _ensure(self, change: Change) -> list[str]:
        """Make the VM as ``change`` desires it; what was done, one line each."""
        session, vm, want = change.session, change.vm, change.desired
        current = self.agent.desired_vm(session, vm)
        lines: list[str] = []
        if current is not None and (want is None or current.driver != want.driver):
            self.agent.destroy(session, vm)
            lines.append(f"removed from the {current.driver} driver")
            current = None
            if want is None and not any(v.request.session == session for v in self.agent.desired()):
                # Its last VM here is gone: so goes its network (as a full reconcile does).
                self.agent.teardown_session(session)
                lines.append(f"removed session {session}")
        if want is None:
            return lines
        if current is None:
            self.agent.launch(want.request, want.driver)
            return [*lines, f"launched on the {want.driver} driver"]
        if current.request == want.request:
            return []
        return self.agent.reconfigure(want.request)

    def _report(self, reg: Registration, statuses: list[VmStatus]) -> None:
        """Send ``statuses``; a stale epoch marks ``reg`` fenced (the relist that follows
        reports every VM again). No answer raises: the retry relists, and so reports."""
        try:
            self.source.report(reg.epoch, statuses)
        except Fenced as exc:
            self.fence(reg, f"status refused: {exc}")
