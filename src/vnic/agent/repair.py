"""Level-triggered drift repair: the agent puts back what it owns, on its own.

Every round (the agent's drift check, every :data:`INTERVAL` seconds with
repair on) the drift of every desired VM is read; each VM that differs is
rebuilt as reconcile rebuilds it (destroy, then launch from its request).
Nobody has to notice: a flushed guard chain, a deleted namespace, a killed
delay engine, an altered class or a deleted qdisc is back within a round or
two.

Bounds, so a fight with something that keeps undoing the kernel cannot eat
the host:

- a token bucket per VM (:data:`PER_VM` repairs a minute) and one for the
  host (:data:`OVERALL` a minute); a VM over its budget waits, counted as
  ``skipped{reason="rate"}``;
- a VM whose repair fails (the rebuild raises, or the drift is still there
  after it) backs off: :data:`BACKOFF` seconds, doubling per failure up to
  :data:`BACKOFF_MAX`, counted as ``skipped{reason="backoff"}``; it is logged
  at every failure, never hidden;
- a repair takes the host lock exclusive *without waiting*
  (:class:`~vnic.agent.hostlock.HostLock`): while a launch, a live change or
  a reconcile holds it, in this process or another, the round is skipped
  (``skipped{reason="busy"}``) and the drift read again next round, under the
  lock, before anything is rebuilt: a VM half-built by a launch in progress
  is never "repaired" under it.

Each attempt is a :class:`RepairEvent`, logged, counted in
``vnic_repairs_total`` and passed to the listeners (``vnic serve``'s manager
writes it to the audit log, source ``agent``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from vnic.agent.hostlock import HostLock
from vnic.agent.metrics import escape_label
from vnic.agent.port import DesiredVm, RepairEvent, VmKey, vm_label
from vnic.errors import VnicError

log = logging.getLogger("vnic.agent")

#: Seconds between two drift checks while repair is on.
INTERVAL = 2.0
#: Repairs a minute, of one VM and of the whole host.
PER_VM = 3
OVERALL = 30
#: Seconds a VM waits after its first failed repair, and at most.
BACKOFF = 10.0
BACKOFF_MAX = 300.0
#: Events kept for :meth:`Repairer.recent`.
KEPT = 100


class DesiredLookup(Protocol):
    """The agent's desired state, as far as a repair reads it."""

    def get(self, key: VmKey) -> DesiredVm | None:
        """The desired VM ``key`` (None: no longer desired)."""


class Repairable(Protocol):
    """What a repairer needs of its agent (:class:`vnic.agent.core.Agent` is one; this
    module does not import it, which would make an import circle)."""

    @property
    def host(self) -> HostLock:
        """The host lock: a repair takes it exclusive, without waiting."""

    @property
    def state(self) -> DesiredLookup:
        """The desired VMs, read again just before each rebuild."""

    def mine(self) -> list[DesiredVm]:
        """The desired VMs of the drivers the agent has loaded."""

    def drift(self, only: Collection[VmKey] | None = None) -> dict[str, list[str]]:
        """Differences from the kernel of each desired VM (of ``only``), by ``session/vm``."""

    def rebuild(self, vm: DesiredVm) -> None:
        """Destroy the VM and build it again from its request."""


class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity`` per ``period`` seconds."""

    def __init__(self, capacity: int, period: float, now: float) -> None:
        self.capacity = capacity
        self.period = period
        self.tokens = float(capacity)
        self.at = now

    def take(self, now: float) -> bool:
        """Take a token if there is one."""
        self.tokens = min(
            float(self.capacity),
            self.tokens + (now - self.at) * self.capacity / self.period,
        )
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass
class _VmState:
    bucket: TokenBucket
    failures: int = 0
    not_before: float = 0.0
    repaired: int = 0
    failed: int = 0
    postponed: bool = False


class Repairer:
    """Drift repair of one agent's VMs (clock injected: ``clock()`` in seconds)."""

    def __init__(
        self,
        agent: Repairable,
        *,
        interval: float = INTERVAL,
        per_vm: int = PER_VM,
        overall: int = OVERALL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.interval = interval
        self.per_vm = per_vm
        self.clock = clock
        self._overall = TokenBucket(overall, 60.0, clock())
        self._vms: dict[VmKey, _VmState] = {}
        self.skipped: dict[str, int] = {"rate": 0, "backoff": 0, "busy": 0}
        self.listeners: list[Callable[[RepairEvent], None]] = []
        self._recent: deque[RepairEvent] = deque(maxlen=KEPT)
        #: Names this process's run: event numbers start again when it changes.
        self.run_id = uuid.uuid4().hex[:12]
        self._seq = 0

    def recent(self, after: int = 0) -> list[RepairEvent]:
        """The last :data:`KEPT` attempts numbered above ``after``, oldest first."""
        return [e for e in self._recent if e.seq > after]

    def run(self, found: Mapping[str, list[str]]) -> list[RepairEvent]:
        """Repair the VMs of ``found`` (``session/vm`` -> differences, as
        :meth:`Agent.drift` gives them) that the bounds allow; return the attempts."""
        now = self.clock()
        desired = {vm_label(vm.key): vm for vm in self.agent.mine()}
        # VMs no longer desired keep no budget (a new VM of that name starts afresh).
        self._vms = {k: v for k, v in self._vms.items() if vm_label(k) in desired}
        due = []
        for label in sorted(found):
            vm = desired.get(label)
            if vm is None or not found[label]:
                continue
            state = self._state(vm.key, now)
            if now < state.not_before:
                self.skipped["backoff"] += 1
                continue
            due.append(vm)
        if not due:
            return []
        events: list[RepairEvent] = []
        with self.agent.host.exclusive(wait=0) as alone:
            if not alone:
                self.skipped["busy"] += 1
                return []
            # Read again under the lock: what a launch or change in progress was
            # building is finished now, and only what still differs is rebuilt.
            fresh = self.agent.drift([vm.key for vm in due])
            for vm in due:
                differences = fresh.get(vm_label(vm.key), [])
                if not differences:
                    continue
                state = self._state(vm.key, now)
                if not state.bucket.take(now) or not self._overall.take(now):
                    self.skipped["rate"] += 1
                    if not state.postponed:  # once per wait, not every round
                        log.warning(
                            "repair of %s/%s postponed: over %d repairs a minute (per VM) "
                            "or %d (the host)",
                            *vm.key,
                            self.per_vm,
                            self._overall.capacity,
                        )
                    state.postponed = True
                    continue
                state.postponed = False
                events.append(self._repair(vm.key, differences, state))
        for event in events:
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception as exc:  # the audit is best effort: the repair is done
                    log.warning("repair of %s/%s not recorded: %s", event.session, event.vm, exc)
        return events

    def _state(self, key: VmKey, now: float) -> _VmState:
        if key not in self._vms:
            self._vms[key] = _VmState(TokenBucket(self.per_vm, 60.0, now))
        return self._vms[key]

    def _repair(self, key: VmKey, differences: list[str], state: _VmState) -> RepairEvent:
        vm = self.agent.state.get(key)
        error: str | None = None
        try:
            if vm is None:
                self._seq += 1
                return dataclasses.replace(
                    RepairEvent(*key, differences, "no longer desired"), seq=self._seq
                )
            self.agent.rebuild(vm)
            left = self.agent.drift([key]).get(vm_label(key), [])
            if left:
                error = "still differs after the rebuild: " + "; ".join(left)
        except VnicError as exc:
            error = str(exc)
        except Exception as exc:  # a raw kernel error: reported like the others
            error = f"{type(exc).__name__}: {exc}"
        self._seq += 1
        event = RepairEvent(*key, differences, error, seq=self._seq)
        if error is None:
            state.repaired += 1
            state.failures = 0
            state.not_before = 0.0
            log.warning("repaired %s/%s: %s", *key, "; ".join(differences))
        else:
            state.failed += 1
            state.failures += 1
            wait = min(BACKOFF * 2 ** (state.failures - 1), BACKOFF_MAX)
            state.not_before = self.clock() + wait
            log.warning("repair of %s/%s failed (next in %g s): %s", *key, wait, error)
        self._recent.append(event)
        return event

    def metrics_lines(self) -> list[str]:
        """``vnic_repairs_total`` and ``vnic_repairs_skipped_total`` (docs/metrics.md)."""
        out = [
            "# HELP vnic_repairs_total Drift repairs the agent made on its own, by outcome",
            "# TYPE vnic_repairs_total counter",
        ]
        for (session, vm), state in sorted(self._vms.items()):
            base = f'session="{escape_label(session)}",vm="{escape_label(vm)}"'
            out.append(f'vnic_repairs_total{{{base},result="repaired"}} {state.repaired}')
            out.append(f'vnic_repairs_total{{{base},result="failed"}} {state.failed}')
        out += [
            "# HELP vnic_repairs_skipped_total Drifted VMs left for a later round, by reason",
            "# TYPE vnic_repairs_skipped_total counter",
        ]
        out += [
            f'vnic_repairs_skipped_total{{reason="{reason}"}} {count}'
            for reason, count in sorted(self.skipped.items())
        ]
        return out
