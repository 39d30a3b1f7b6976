"""A command run in a VM through the agent port (``vnic vm exec`` with ``--server``): its
bounds, checked in one place, and its captured result with the wire form both HTTP APIs
carry.

The bounds (:func:`check_exec`): ``argv`` is 1 to :data:`ARGV_ITEMS_MAX` strings of at
most :data:`ARGV_BYTES_MAX` UTF-8 bytes in all, none with a NUL byte (the kernel's
``execve`` would cut it there); ``timeout`` is seconds, more than 0 and at most
:data:`TIMEOUT_MAX`; ``max_output`` is the bytes kept of *each* of stdout and stderr,
0 to :data:`OUTPUT_MAX`. A bad value is :class:`~vnic.errors.InvalidInput` naming the
field, the value and what was expected, every bad field at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vnic.errors import FieldError, InvalidInput, show_value

#: Items ``argv`` may have.
ARGV_ITEMS_MAX = 64
#: UTF-8 bytes all of ``argv``'s items may have together (16 KiB).
ARGV_BYTES_MAX = 16 << 10
#: Seconds a command runs when the caller says nothing, and at most.
TIMEOUT_DEFAULT = 30.0
TIMEOUT_MAX = 300.0
#: Bytes kept of each of stdout and stderr when the caller says nothing (256 KiB), and
#: at most (1 MiB); the rest is read and dropped, and the result says it was cut.
OUTPUT_DEFAULT = 256 << 10
OUTPUT_MAX = 1 << 20
#: The exit status a command killed at its timeout gives ``vnic vm exec`` (as
#: ``timeout(1)`` does); its :attr:`ExecResult.returncode` is None.
TIMED_OUT_STATUS = 124


def check_exec(argv: Any, timeout: Any, max_output: Any) -> tuple[tuple[str, ...], float, int]:
    """``argv``, ``timeout`` and ``max_output`` checked against the bounds (the module's
    docstring), as a tuple of strings, float seconds and int bytes."""
    problems: list[FieldError] = []
    items: tuple[str, ...] = ()
    if not isinstance(argv, Sequence) or isinstance(argv, str | bytes):
        problems.append(FieldError("argv", show_value(argv), "a list of strings"))
    elif not argv:
        problems.append(FieldError("argv", "[]", "at least one item: the program to run"))
    elif len(argv) > ARGV_ITEMS_MAX:
        problems.append(FieldError("argv", f"{len(argv)} items", f"at most {ARGV_ITEMS_MAX} items"))
    else:
        size = 0
        for i, item in enumerate(argv):
            where = f"argv[{i}]"
            if not isinstance(item, str):
                problems.append(FieldError(where, show_value(item), "a string"))
                continue
            if "\0" in item:
                problems.append(FieldError(where, show_value(item), "text without NUL bytes"))
                continue
            try:
                size += len(item.encode())
            except UnicodeEncodeError:
                problems.append(FieldError(where, show_value(item), "valid Unicode text"))
        if not problems and size > ARGV_BYTES_MAX:
            problems.append(
                FieldError("argv", f"{size} bytes", f"at most {ARGV_BYTES_MAX} bytes in all")
            )
        if not problems and not argv[0]:
            problems.append(FieldError("argv[0]", "''", "the program to run, not empty"))
        items = tuple(str(a) for a in argv)
    seconds = 0.0
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= TIMEOUT_MAX
    ):
        problems.append(
            FieldError(
                "timeout", show_value(timeout), f"seconds, more than 0 and at most {TIMEOUT_MAX:g}"
            )
        )
    else:
        seconds = float(timeout)
    size_max = 0
    if isinstance(max_output, bool) or not isinstance(max_output, int):
        problems.append(FieldError("max_output", show_value(max_output), "a number of bytes"))
    elif not 0 <= max_output <= OUTPUT_MAX:
        problems.append(
            FieldError("max_output", show_value(max_output), f"bytes, 0 to {OUTPUT_MAX} (1 MiB)")
        )
    else:
        size_max = max_output
    if problems:
        raise InvalidInput(problems)
    return items, seconds, size_max


#: Seconds an HTTP call carrying a command waits besides the command's timeout (the kill,
#: the answer, the way there and back).
CALL_MARGIN = 30.0


def call_timeout(timeout: Any) -> float:
    """Seconds an HTTP call that runs a command of ``timeout`` seconds may take: more than
    the longest the command may run (a bad ``timeout`` is refused by the other side at
    once: the margin alone)."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        return CALL_MARGIN
    if not math.isfinite(timeout):
        return CALL_MARGIN
    return min(max(float(timeout), 0.0), TIMEOUT_MAX) + CALL_MARGIN


@dataclass(frozen=True)
class ExecResult:
    """What a command run in a VM gave: its status and its output, each stream cut at the
    caller's ``max_output`` bytes (``*_truncated`` says so; the text is the bytes decoded
    as UTF-8, a broken sequence replaced by U+FFFD).

    ``returncode`` is the command's exit status, ``-N`` if signal N ended it, and None when
    it was killed at its timeout (``timed_out``; what it wrote until then is kept where the
    driver can keep it).
    """

    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timed_out: bool = False

    @property
    def truncated(self) -> bool:
        """Whether either stream was cut."""
        return self.stdout_truncated or self.stderr_truncated

    @property
    def status(self) -> int:
        """The exit status a shell would give: the code, 128 + N for signal N,
        :data:`TIMED_OUT_STATUS` for a timeout."""
        if self.returncode is None:
            return TIMED_OUT_STATUS
        return 128 - self.returncode if self.returncode < 0 else self.returncode

    @classmethod
    def captured(
        cls,
        returncode: int | None,
        stdout: bytes,
        stderr: bytes,
        max_output: int,
        *,
        timed_out: bool = False,
    ) -> ExecResult:
        """The result of output read whole (``stdout``, ``stderr``), cut at ``max_output``."""
        return cls(
            returncode,
            stdout[:max_output].decode(errors="replace"),
            stderr[:max_output].decode(errors="replace"),
            len(stdout) > max_output,
            len(stderr) > max_output,
            timed_out,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "returncode": self.returncode,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "timed_out": self.timed_out,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ExecResult:
        """The result :meth:`to_dict` wrote; InvalidInput names a field of the wrong type."""
        if not isinstance(doc, Mapping):
            raise InvalidInput.one("result", doc, "an object")
        problems: list[FieldError] = []
        code = doc.get("returncode")
        if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
            problems.append(FieldError("returncode", show_value(code), "an integer or null"))
        for name in ("stdout", "stderr"):
            if not isinstance(doc.get(name, ""), str):
                problems.append(FieldError(name, show_value(doc.get(name)), "a string"))
        for name in ("stdout_truncated", "stderr_truncated", "timed_out"):
            if not isinstance(doc.get(name, False), bool):
                problems.append(FieldError(name, show_value(doc.get(name)), "true or false"))
        if problems:
            raise InvalidInput(problems)
        return cls(
            code,
            doc.get("stdout", ""),
            doc.get("stderr", ""),
            doc.get("stdout_truncated", False),
            doc.get("stderr_truncated", False),
            doc.get("timed_out", False),
        )
