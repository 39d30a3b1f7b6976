"""Mahimahi packet-delivery traces, read as a rate that changes over time.

The format (Mahimahi's ``mm-link``): one integer per line, a time in
milliseconds; each line is one opportunity to deliver an MTU-sized packet
(1500 bytes); a timestamp repeated *n* times means *n* packets in that
millisecond; timestamps never decrease; the trace repeats with a period equal
to its last timestamp.

Read as rates: a line ``t`` stands for a packet delivered in the millisecond
ending at ``t`` (``(t-1, t]``; ``0`` is the same instant as the period, the
last millisecond of the cycle). :meth:`Trace.rates` counts packets per window
of ``window_s`` and turns them into bit/s, so a 12 Mbit/s link (one packet per
millisecond) is ``1, 2, 3, ...`` as generators such as netem-trace write it.
:func:`write_trace` is the inverse, exact when each window's rate is a whole
number of packets per window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from vnic.errors import FieldError, InvalidInput, show_value
from vnic.model.units import is_ascii_digits

#: Bytes one delivery opportunity carries.
PACKET_BYTES: Final = 1500
PACKET_BITS: Final = PACKET_BYTES * 8
TIMESTAMP_EXPECTED: Final = "a non-decreasing integer of milliseconds"
#: Longest trace period taken: one day.
MAX_PERIOD_MS: Final = 24 * 3600 * 1000


@dataclass(frozen=True)
class Trace:
    """A parsed trace: delivery opportunities in milliseconds, non-decreasing, period > 0."""

    timestamps_ms: tuple[int, ...]

    @property
    def period_ms(self) -> int:
        return self.timestamps_ms[-1]

    @property
    def period(self) -> float:
        """Seconds after which the trace repeats."""
        return self.period_ms / 1000

    def rates(self, window_s: float = 0.1) -> list[int]:
        """Bit/s in each window of one period (the last window may be shorter)."""
        window = window_ms(window_s)
        period = self.period_ms
        count = math.ceil(period / window)
        packets = [0] * count
        for t in self.timestamps_ms:
            slot = (t - 1) % period  # the millisecond the packet is delivered in
            packets[slot // window] += 1
        out = []
        for i, n in enumerate(packets):
            length_ms = min(window, period - i * window)
            out.append(round(n * PACKET_BITS * 1000 / length_ms))
        return out

    def rate_at(self, t: float, window_s: float = 0.1) -> int:
        """Bit/s of the window in force ``t`` seconds into the (repeating) trace."""
        window = window_ms(window_s)
        position_ms = math.floor(t * 1000) % self.period_ms
        return self.rates(window_s)[position_ms // window]

    def to_text(self) -> str:
        return "".join(f"{t}\n" for t in self.timestamps_ms)


def window_ms(window_s: float) -> int:
    """A window in whole milliseconds (ValueError otherwise)."""
    ms = round(window_s * 1000)
    if ms < 1 or abs(ms - window_s * 1000) > 1e-6:
        raise ValueError(f"a trace window is a whole number of milliseconds, got {window_s} s")
    return ms


def parse_trace(text: str | Sequence[int], path: str = "trace") -> Trace:
    """Read a trace from its text (errors name ``PATH line N``) or from a list of integers
    (errors name ``PATH[i]``). Blank lines are skipped."""
    errors: list[FieldError] = []
    stamps: list[int] = []
    if isinstance(text, str):
        items: list[tuple[str, object]] = [
            (f"{path} line {n}", line.strip())
            for n, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    elif isinstance(text, list | tuple):
        items = [(f"{path}[{i}]", raw) for i, raw in enumerate(text)]
    else:
        raise InvalidInput.one(path, text, "trace text (one timestamp per line) or a list")
    last = 0
    for where, raw in items:
        value: int | None = None
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and is_ascii_digits(raw):
            value = int(raw)
        if value is None or value < last or value > MAX_PERIOD_MS:
            expected = TIMESTAMP_EXPECTED
            if value is not None and value < last:
                expected += f" (at least the previous {last})"
            elif value is not None:
                expected += f" (at most {MAX_PERIOD_MS}, one day)"
            errors.append(FieldError(where, show_value(raw), expected))
            if len(errors) >= 20:
                break
            continue
        stamps.append(value)
        last = value
    if errors:
        raise InvalidInput(errors)
    if not stamps:
        raise InvalidInput.one(path, "no timestamps", "at least one delivery opportunity")
    if stamps[-1] <= 0:
        raise InvalidInput.one(
            path,
            f"last timestamp {stamps[-1]}",
            "a last timestamp above 0 ms (the trace repeats with that period)",
        )
    return Trace(tuple(stamps))


def write_trace(rates_per_window: Sequence[float], window_s: float) -> str:
    """A trace whose :meth:`Trace.rates` for ``window_s`` are ``rates_per_window``.

    Each window gets ``round(rate × window / 12000 bit)`` packets spread evenly
    over it; exact for rates that are whole packets per window. The last
    window needs at least one packet: it holds the last timestamp, which sets
    the period (ValueError otherwise).
    """
    window = window_ms(window_s)
    if not rates_per_window:
        raise ValueError("write_trace needs at least one window")
    lines: list[str] = []
    last_count = 0
    for i, rate in enumerate(rates_per_window):
        if rate < 0 or not math.isfinite(rate):
            raise ValueError(f"window {i}: a rate is a finite number of bit/s >= 0, got {rate}")
        n = round(rate * window / 1000 / PACKET_BITS)
        last_count = n
        start = i * window
        lines.extend(str(start - (-(k + 1) * window // n)) for k in range(n))
    if last_count == 0:
        raise ValueError(
            "the last window needs at least one packet: its last timestamp is the trace's period"
        )
    return "\n".join(lines) + "\n"
