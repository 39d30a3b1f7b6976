"""QMP and the QEMU guest agent, spoken by :mod:`vnic.dataplane.qemu` to fake servers.

Each fake listens on the Unix socket QEMU would make in a guest's run
directory, answers one client at a time in a thread, and speaks the real wire
format: QMP's greeting, capabilities negotiation, events interleaved with
replies and ``{"error": {"class", "desc"}}``; the agent's ``0xFF`` resync and
``guest-sync-delimited`` (with whatever an interrupted client left in the
channel before it), ``guest-exec`` and ``guest-exec-status`` with base64
output. No root, no QEMU.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from vnic.dataplane import qemu
from vnic.errors import Conflict, DataplaneError
from vnic.plan.guest import RunFiles

Handler = Callable[[BinaryIO, Callable[[bytes], None]], None]


class FakeSocket:
    """A Unix-socket server on ``path`` that hands each connection, one at a time (as a
    QEMU chardev does), to ``handler(reader, send)``; what goes wrong is kept in ``errors``."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.errors: list[BaseException] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(0.02)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn, conn.makefile("rb") as reader:
                conn.settimeout(2.0)
                try:
                    self.handler(reader, conn.sendall)
                except (OSError, ValueError, AssertionError) as exc:
                    self.errors.append(exc)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(2.0)
        self._listener.close()
        assert not self._thread.is_alive()


@pytest.fixture
def run() -> Iterator[RunFiles]:
    """A guest's run directory (short: socket paths have a 108-byte limit)."""
    directory = Path(tempfile.mkdtemp(prefix="vq-", dir="/tmp"))
    try:
        yield RunFiles(directory)
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def serve(run: RunFiles) -> Iterator[Callable[[Path, Handler], FakeSocket]]:
    """Start fake servers; stopped (and checked for protocol errors) after the test."""
    started: list[FakeSocket] = []

    def start(path: Path, handler: Handler) -> FakeSocket:
        server = FakeSocket(path, handler)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
    assert [e for s in started for e in s.errors] == []


def line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


# ----------------------------------------------------------------------------- QMP

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2"},
        "capabilities": ["oob"],
    }
}


@dataclass
class FakeQmp:
    """QEMU's QMP monitor: ``replies`` maps a command to the lines sent after it (events,
    then its return or error); ``received`` is every command, as parsed."""

    replies: dict[str, list[dict[str, Any]]]
    received: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, reader: BinaryIO, send: Callable[[bytes], None]) -> None:
        send(line(GREETING))
        negotiated = False
        while raw := reader.readline():
            message = json.loads(raw)
            self.received.append(message)
            command = message["execute"]
            if command == "qmp_capabilities":
                negotiated = True
                send(line({"return": {}}))
            elif not negotiated:
                send(
                    line(
                        {
                            "error": {
                                "class": "CommandNotFound",
                                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
                            }
                        }
                    )
                )
            else:
                for reply in self.replies[command]:
                    send(line(reply))


NIC_EVENT = {
    "timestamp": {"seconds": 1764398400, "microseconds": 123456},
    "event": "NIC_RX_FILTER_CHANGED",
    "data": {"name": "nic0", "path": "/machine/peripheral-anon/device[0]/virtio-backend"},
}
RX_FILTER = [{"name": "nic0", "main-mac": "52:54:00:12:34:56", "promiscuous": False}]


def test_qmp_negotiates_then_returns_the_commands_return(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    fake = FakeQmp({"query-rx-filter": [{"return": RX_FILTER}]})
    serve(run.qmp, fake)
    assert qemu.qmp(run, "query-rx-filter", name="nic0") == RX_FILTER
    assert fake.received == [
        {"execute": "qmp_capabilities"},
        {"execute": "query-rx-filter", "arguments": {"name": "nic0"}},
    ]


def test_qmp_skips_events_between_the_command_and_its_reply(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    stop = {"timestamp": NIC_EVENT["timestamp"], "event": "STOP"}
    fake = FakeQmp(
        {
            "set_link": [NIC_EVENT, {"return": {}}],
            "query-status": [stop, NIC_EVENT, {"return": {"status": "paused", "running": False}}],
        }
    )
    server = serve(run.qmp, fake)
    assert qemu.qmp(run, "set_link", name="nic0", up=False) == {}
    assert qemu.qmp(run, "query-status") == {"status": "paused", "running": False}
    assert fake.received[1] == {
        "execute": "set_link",
        "arguments": {"name": "nic0", "up": False},
    }
    assert fake.received[3] == {"execute": "query-status"}  # no empty arguments
    assert server.connections == 2  # one connection per call: the monitor is not held


def test_a_qmp_error_raises_with_its_description(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    desc = "Device 'nope' not found"
    fake = FakeQmp({"set_link": [NIC_EVENT, {"error": {"class": "DeviceNotFound", "desc": desc}}]})
    serve(run.qmp, fake)
    with pytest.raises(DataplaneError, match=f"set_link: {desc}"):
        qemu.qmp(run, "set_link", name="nope", up=True)


def test_qmp_to_a_monitor_that_hangs_up_or_is_not_there(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    with pytest.raises(DataplaneError, match=re.escape(str(run.qmp))):
        qemu.qmp(run, "query-status")  # no socket: QEMU is not running

    def hang_up(reader: BinaryIO, send: Callable[[bytes], None]) -> None:
        send(line(GREETING))
        reader.readline()  # qmp_capabilities, never answered

    serve(run.qmp, hang_up)
    with pytest.raises(DataplaneError, match="closed"):
        qemu.qmp(run, "query-status")


def test_a_qmp_monitor_that_never_answers_times_out(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    released = threading.Event()

    def silent(reader: BinaryIO, send: Callable[[bytes], None]) -> None:
        released.wait(60.0)  # answers nothing until the test is over

    serve(run.qmp, silent)
    with pytest.raises(DataplaneError, match="timed out"):  # not the 60 s of the server
        qemu.qmp(run, "query-status", timeout=0.2)
    released.set()


# ----------------------------------------------------------------------------- guest agent


@dataclass
class GuestCommand:
    """A process the fake agent started: what it was asked, and what it reports."""

    path: str
    args: list[str]
    stdin: str | None
    capture: bool
    polls_until_exit: int | None  # None: never exits
    exitcode: int | None = 0
    signal: int | None = None
    out: bytes = b""
    err: bytes = b""
    polls: int = 0


@dataclass
class FakeAgent:
    """qemu-ga on its virtio-serial channel.

    Every client first sends ``0xFF`` and ``guest-sync-delimited``; the agent
    answers ``0xFF`` and ``{"return": id}``. ``leftovers`` is what the channel
    still holds ahead of the next sync answer (the unread replies of a client
    that went away), consumed one entry per connection. ``program`` says, by the
    path of the command, how a started process behaves.
    """

    program: dict[str, dict[str, Any]] = field(default_factory=dict)
    leftovers: list[bytes] = field(default_factory=list)
    processes: dict[int, GuestCommand] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    syncs: list[int] = field(default_factory=list)
    next_pid: int = 812

    def __call__(self, reader: BinaryIO, send: Callable[[bytes], None]) -> None:
        first = reader.readline()
        assert first.startswith(b"\xff"), f"no 0xFF resync before {first!r}"
        sync = json.loads(first.lstrip(b"\xff"))
        assert sync["execute"] == "guest-sync-delimited"
        self.syncs.append(sync["arguments"]["id"])
        stale = self.leftovers.pop(0) if self.leftovers else b""
        send(stale + b"\xff" + line({"return": sync["arguments"]["id"]}))
        while raw := reader.readline():
            message = json.loads(raw)
            self.commands.append(message["execute"])
            send(line(self.answer(message["execute"], message.get("arguments", {}))))

    def answer(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if command == "guest-ping":
            return {"return": {}}
        if command == "guest-exec":
            pid = self.next_pid
            self.next_pid += 1
            stdin = args.get("input-data")
            self.processes[pid] = GuestCommand(
                path=args["path"],
                args=args.get("arg", []),
                stdin=base64.b64decode(stdin).decode() if stdin is not None else None,
                capture=bool(args.get("capture-output")),
                **self.program.get(args["path"], {"polls_until_exit": 0}),
            )
            return {"return": {"pid": pid}}
        if command == "guest-exec-status":
            proc = self.processes.get(args["pid"])
            if proc is None:
                return {"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}}
            proc.polls += 1
            if proc.polls_until_exit is None or proc.polls <= proc.polls_until_exit:
                return {"return": {"exited": False}}
            status: dict[str, Any] = {"exited": True}
            if proc.signal is not None:
                status["signal"] = proc.signal
            else:
                status["exitcode"] = proc.exitcode
            if proc.capture:
                if proc.out:
                    status["out-data"] = base64.b64encode(proc.out).decode()
                if proc.err:
                    status["err-data"] = base64.b64encode(proc.err).decode()
            return {"return": status}
        return {
            "error": {
                "class": "CommandNotFound",
                "desc": f"The command {command} has not been found",
            }
        }


# What an interrupted client leaves in the channel: replies it never read, including
# an older sync answer (0xFF and another id), and a half-written line.
LEFTOVERS = [
    line({"return": {"exited": False}}) + line({"return": {"pid": 77}}),
    b"\xff" + line({"return": 4242}) + line({"return": {}}),
    b'{"return": {"exited": true, "exitco',
]


def test_agent_call_skips_what_earlier_clients_left_unread(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    agent = FakeAgent(leftovers=list(LEFTOVERS))
    serve(run.agent, agent)
    for _ in range(len(LEFTOVERS) + 1):
        assert qemu.agent_call(run, "guest-ping") == {}
    assert agent.commands == ["guest-ping"] * 4
    assert len(set(agent.syncs)) == len(agent.syncs)  # a fresh sync id per exchange


def test_agent_call_raises_the_agents_error(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    serve(run.agent, FakeAgent())
    with pytest.raises(DataplaneError, match="guest-fstrim: The command guest-fstrim has not"):
        qemu.agent_call(run, "guest-fstrim")


def test_an_agent_that_closes_before_syncing_is_an_error(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    def gone(reader: BinaryIO, send: Callable[[bytes], None]) -> None:
        reader.readline()
        send(line({"return": {"exited": False}}))  # stale bytes, then the agent dies

    serve(run.agent, gone)
    with pytest.raises(DataplaneError, match="closed"):
        qemu.agent_call(run, "guest-ping")


def test_execute_collects_output_and_exit_status_after_polling(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    agent = FakeAgent(
        program={
            "iperf3": {
                "polls_until_exit": 2,
                "exitcode": 1,
                "out": b"Connecting to host 10.0.1.3, port 5201\n",
                "err": "iperf3: error - unable to connect: Connection refused — ✗\n".encode(),
            }
        },
        leftovers=list(LEFTOVERS),
    )
    serve(run.agent, agent)
    done = qemu.execute(run, ["iperf3", "-c", "10.0.1.3", "-t", "1"], timeout=2.0)
    assert done.args == ["iperf3", "-c", "10.0.1.3", "-t", "1"]
    assert done.returncode == 1
    assert done.stdout == "Connecting to host 10.0.1.3, port 5201\n"
    assert done.stderr == "iperf3: error - unable to connect: Connection refused — ✗\n"
    (proc,) = agent.processes.values()
    assert (proc.path, proc.args, proc.capture, proc.stdin) == (
        "iperf3",
        ["-c", "10.0.1.3", "-t", "1"],
        True,
        None,
    )
    assert agent.commands == ["guest-exec"] + ["guest-exec-status"] * 3


def test_execute_sends_stdin(run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]) -> None:
    agent = FakeAgent()
    serve(run.agent, agent)
    text = "net.ipv4.tcp_ecn = 1\nnet.ipv4.tcp_sack = 0\n"
    assert qemu.execute(run, ["sysctl", "-p", "-"], stdin=text, timeout=2.0).returncode == 0
    big = "x" * 3_000_000 + "\n"  # more than a Unix socket buffer holds: written in parts
    assert qemu.execute(run, ["wc", "-c"], stdin=big, timeout=2.0).returncode == 0
    assert [p.stdin for p in agent.processes.values()] == [text, big]


def test_a_process_killed_by_a_signal_reports_128_plus_it(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    serve(run.agent, FakeAgent(program={"sh": {"polls_until_exit": 0, "signal": 15}}))
    done = qemu.execute(run, ["sh", "-c", "kill -TERM $$"], timeout=2.0)
    assert done.returncode == 128 + 15


def test_spawn_without_capture_then_poll_and_wait(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    agent = FakeAgent(program={"iperf3": {"polls_until_exit": 3, "out": b"not captured"}})
    serve(run.agent, agent)
    proc = qemu.spawn(run, ["iperf3", "-s", "-1"], capture=False)
    assert proc.pid == 812 and proc.argv == ("iperf3", "-s", "-1")
    assert agent.processes[812].capture is False
    assert proc.poll() is None
    assert proc.wait(timeout=2.0) == 0
    assert (proc.stdout, proc.stderr) == ("", "")
    polls = agent.processes[812].polls
    assert proc.poll() == 0 and agent.processes[812].polls == polls  # remembered, not asked


def test_a_process_that_never_exits_times_out_and_is_killed(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    agent = FakeAgent(program={"sleep": {"polls_until_exit": None}})
    serve(run.agent, agent)
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        qemu.execute(run, ["sleep", "3600"], timeout=0.2)
    assert time.monotonic() - started >= 0.2  # it waited its timeout (then killed, not 3600 s)
    assert caught.value.cmd == ["sleep", "3600"] and caught.value.timeout == 0.2
    sleeper, killer = agent.processes.items()
    assert sleeper[1].path == "sleep"
    assert (killer[1].path, killer[1].args) == ("kill", ["-9", str(sleeper[0])])
    assert killer[1].capture is False
    assert agent.commands[-1] == "guest-exec"  # the kill was the last thing asked


def test_kill_of_a_finished_process_sends_nothing(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    agent = FakeAgent()
    serve(run.agent, agent)
    proc = qemu.spawn(run, ["true"])
    assert proc.wait(timeout=2.0) == 0
    proc.kill()
    assert [p.path for p in agent.processes.values()] == ["true"]


def test_spawn_refuses_an_empty_command(run: RunFiles) -> None:
    with pytest.raises(Conflict, match="no command"):
        qemu.spawn(run, [])


def test_wait_agent_waits_for_the_socket(
    run: RunFiles, serve: Callable[[Path, Handler], FakeSocket]
) -> None:
    later = threading.Timer(0.15, lambda: serve(run.agent, FakeAgent()))
    later.start()
    try:
        started = time.monotonic()
        qemu.wait_agent(run, timeout=2.0)
        assert time.monotonic() - started >= 0.1  # it waited for the socket to appear
    finally:
        later.join()
    nobody = RunFiles(run.directory / "no-guest")
    with pytest.raises(DataplaneError, match="did not answer"):
        qemu.wait_agent(nobody, timeout=0.2)
