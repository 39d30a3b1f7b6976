"""Playing a scenario (:mod:`vnic.controller.scenario`): which steps are due at a
moment, and one run's position in its timeline. Pure: the caller's clock and the
caller's layer writes (:mod:`vnic.manager.live`) do the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vnic.controller.scenario import (
    EPSILON,
    FINISHED,
    IDLE,
    PAUSED,
    RUNNING,
    STOPPED,
    Scenario,
    ScenarioLayer,
    Step,
)
from vnic.errors import Conflict


@dataclass(frozen=True)
class DueStep:
    """A step whose time has come: ``index`` in the timeline, loop ``cycle`` (0 first),
    ``due_at`` seconds into the run, and how ``late`` it is handed out (seconds)."""

    index: int
    cycle: int
    step: Step
    due_at: float
    late: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "cycle": self.cycle,
            "due_at": self.due_at,
            "late": self.late,
            **self.step.to_document(),
        }


class ScenarioRun:
    """One run of a scenario against ``clock`` (monotonic seconds).

    ``state``: idle → running ⇄ paused → stopped, or finished once a run
    without loop has handed out its last step and reached its duration.
    :meth:`position` is seconds into the timeline (frozen while paused, and
    after stop or finish); across loop cycles it keeps counting.
    """

    def __init__(self, scenario: Scenario, clock: Callable[[], float]) -> None:
        self.scenario = scenario
        self.clock = clock
        self._state = IDLE
        self._started: float | None = None
        self._paused_total = 0.0
        self._frozen: float | None = None  # position while not running
        self._next = 0  # index of the next step to hand out, counted across cycles
        self._layer = ScenarioLayer()
        self._cycle = -1  # cycle of the last handed-out step

    # ------------------------------------------------------------------ control

    @property
    def state(self) -> str:
        self._check_finished()
        return self._state

    def start(self) -> None:
        if self._state != IDLE:
            raise Conflict(f"scenario {self.scenario.name!r} is {self._state}; it starts once")
        self._started = self.clock()
        self._state = RUNNING

    def pause(self) -> None:
        state = self.state
        if state == PAUSED:
            return
        if state != RUNNING:
            raise Conflict(f"scenario {self.scenario.name!r} is {state}; only a running one pauses")
        self._frozen = self._raw_position()
        self._state = PAUSED

    def resume(self) -> None:
        state = self.state
        if state == RUNNING:
            return
        if state != PAUSED:
            raise Conflict(f"scenario {self.scenario.name!r} is {state}; only a paused one resumes")
        assert self._frozen is not None and self._started is not None
        self._paused_total = self.clock() - self._started - self._frozen
        self._frozen = None
        self._state = RUNNING

    def stop(self) -> None:
        """Stop for good (no-op when already stopped or finished)."""
        state = self.state
        if state in (STOPPED, FINISHED):
            return
        self._frozen = self.position()
        self._state = STOPPED

    # ------------------------------------------------------------------ time

    def position(self) -> float:
        """Seconds into the timeline (counting across loop cycles)."""
        self._check_finished()
        return self._raw_position()

    def _raw_position(self) -> float:
        if self._frozen is not None:
            return self._frozen
        if self._started is None:
            return 0.0
        return self.clock() - self._started - self._paused_total

    def _due_at(self, n: int) -> float | None:
        """Seconds into the run at which the ``n``-th hand-out (across cycles) is due."""
        steps = self.scenario.steps
        if not steps:
            return None
        cycle, index = divmod(n, len(steps))
        if cycle and not self.scenario.loop:
            return None
        return cycle * self.scenario.duration + steps[index].at

    def _check_finished(self) -> None:
        if self._state != RUNNING or self.scenario.loop:
            return
        if self._next < len(self.scenario.steps):
            return
        if self._raw_position() + EPSILON >= self.scenario.duration:
            self._frozen = self.scenario.duration
            self._state = FINISHED

    def due(self) -> list[DueStep]:
        """The steps whose time has come since the last call, in order, each exactly once.

        Nothing is skipped: after a stall every step passed is handed out, each
        with its lateness. Empty unless running.
        """
        if self._state != RUNNING:
            return []
        now = self._raw_position()
        out: list[DueStep] = []
        steps = self.scenario.steps
        while True:
            when = self._due_at(self._next)
            if when is None or when > now + EPSILON:
                break
            cycle, index = divmod(self._next, len(steps))
            step = steps[index]
            self._fold(cycle, step)
            out.append(DueStep(index, cycle, step, when, max(0.0, now - when)))
            self._next += 1
        self._check_finished()
        return out

    def next_due_in(self) -> float | None:
        """Seconds (of timeline time) until the next step, or until the end of a run
        without loop whose steps are all handed out; 0 when one is due now; None once
        stopped or finished (and before start). While paused the clock does not bring
        it closer: the value is what it will be right after resume."""
        state = self.state
        if state in (IDLE, STOPPED, FINISHED):
            return None
        now = self._raw_position()
        when = self._due_at(self._next)
        if when is None:
            when = self.scenario.duration
        return max(0.0, when - now)

    # ------------------------------------------------------------------ the layer

    def _fold(self, cycle: int, step: Step) -> None:
        if cycle != self._cycle:
            self._layer = ScenarioLayer()  # each cycle starts afresh
            self._cycle = cycle
        if step.clear:
            self._layer = ScenarioLayer()
        elif step.profile is not None:
            self._layer = ScenarioLayer(step.profile, dict(step.values))
        else:
            self._layer = ScenarioLayer(self._layer.profile, {**self._layer.values, **step.values})

    def layer(self) -> ScenarioLayer:
        """What the scenario's adjustment should hold after the steps handed out so far."""
        return self._layer

    @property
    def handed_out(self) -> int:
        """Steps handed out by :meth:`due` so far, across cycles."""
        return self._next

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.scenario.name,
            "state": self.state,
            "position_s": round(self.position(), 6),
            "next_due_in_s": self.next_due_in(),
            "steps_handed_out": self._next,
            "layer": self._layer.to_dict(),
        }
