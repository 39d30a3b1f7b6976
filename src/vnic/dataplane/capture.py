"""A started process's output, captured within bounds: at most ``max_output`` bytes kept of
each stream, and the process killed at its deadline.

:func:`capture` takes a :class:`subprocess.Popen` started with ``stdout`` and ``stderr``
as pipes and ``start_new_session=True`` (so it leads a process group of its own). It
reads both pipes as they fill, keeps the first ``max_output`` bytes of each and reads
and drops the rest (a command that writes gigabytes neither blocks on a full pipe nor
fills this process's memory). At the deadline it kills the whole process group with
SIGKILL: the command, and what it started that stayed in its group (a shell's
children; a process that made a session of its own escapes, as from ``timeout(1)``).
When the command ends first, what it left running keeps running and the pipes are
read no further.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from typing import IO, Any

from vnic.model.command import ExecResult

#: Bytes read from a pipe at a time.
_CHUNK = 64 << 10
#: Seconds between looks at whether the command ended, while its pipes stay open.
_POLL = 0.05


def capture(proc: subprocess.Popen[Any], *, timeout: float, max_output: int) -> ExecResult:
    """Wait for ``proc`` for at most ``timeout`` seconds, its output bounded (see the
    module's docstring); killed at the deadline (``timed_out``, returncode None)."""
    deadline = time.monotonic() + timeout
    streams: list[IO[Any]] = [s for s in (proc.stdout, proc.stderr) if s is not None]
    out_fd, err_fd = (s.fileno() if s is not None else -1 for s in (proc.stdout, proc.stderr))
    kept = {s.fileno(): bytearray() for s in streams}
    timed_out = False
    finished = False
    try:
        with selectors.DefaultSelector() as selector:
            for s in streams:
                os.set_blocking(s.fileno(), False)
                selector.register(s.fileno(), selectors.EVENT_READ)

            def read(fd: int) -> bool:
                """Read one chunk of ``fd`` if it has one; False when it has none now."""
                try:
                    chunk = os.read(fd, _CHUNK)
                except BlockingIOError:
                    return False
                if not chunk:
                    selector.unregister(fd)
                    return False
                room = max_output + 1 - len(kept[fd])  # one more: enough to know it was cut
                if room > 0:
                    kept[fd] += chunk[:room]
                return True

            # One chunk per ready pipe and round, so a command that writes without end
            # still meets its deadline.
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in selector.select(min(left, _POLL)):
                    read(key.fd)
                if proc.poll() is not None:
                    # What it wrote before it ended (until the deadline: a child it left
                    # may write on); pipes its children hold stay unread after.
                    for open_key in list(selector.get_map().values()):
                        while time.monotonic() < deadline and read(open_key.fd):
                            pass
                    break
        if not timed_out:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        finished = not timed_out
    finally:
        if not finished:  # the deadline, or this thread was interrupted
            _kill_group(proc)
        for s in streams:
            s.close()
    out, err = (bytes(kept.get(fd, b"")) for fd in (out_fd, err_fd))
    code = None if timed_out else proc.returncode
    return ExecResult.captured(code, out, err, max_output, timed_out=timed_out)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process group ``proc`` leads, and reap ``proc``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
