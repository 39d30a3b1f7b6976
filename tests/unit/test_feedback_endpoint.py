"""The feedback endpoint's HTTP edge, served on 127.0.0.1 with a recording decider:

- strict parsing: bad, negative, huge Content-Length; chunked; too many or too big
  headers; nesting, long strings; each a 4xx with a JSON reason naming the field,
  and the decider never sees it (a known VM's malformed request is counted instead);
- a request's deadline cuts slow bodies and silent connections;
- every request counts against its address's budget: 429 with Retry-After, while
  another address is still answered;
- connections are capped in total and per address, with a fixed number of threads.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from vnic.agent import feedback as fb
from vnic.agent import feedback_http as fh
from vnic.agent.feedback_http import SourceBudget


class Decider:
    """Answers 200 with what it was asked; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, dict[str, Any]]] = []
        self.malformed_calls: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    def feedback(
        self, session: str, vm: str, method: str, body: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.calls.append((session, vm, method, dict(body)))
        return 200, {"vm": vm, "method": method}

    def malformed(self, session: str, vm: str, reason: str) -> None:
        with self.lock:
            self.malformed_calls.append((session, vm, reason))


VMS = {"127.0.0.1": "a", "127.0.0.2": "b"}


def listener(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(64)
    return sock


@pytest.fixture
def endpoint() -> Iterator[tuple[fb.FeedbackEndpoints, Decider, int]]:
    eps = fb.FeedbackEndpoints(lambda _s, ip: VMS.get(ip))
    decider = Decider()
    eps.attach(decider)
    sock = listener()
    port = sock.getsockname()[1]
    eps.serve("lab", [sock])
    try:
        yield eps, decider, port
    finally:
        eps.close_all()


def exchange(port: int, raw: bytes, source: str = "127.0.0.1", timeout: float = 10) -> bytes:
    """Send ``raw`` from ``source`` and read the answer until the endpoint closes."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as s:
        if raw:
            s.sendall(raw)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def settled(eps: fb.FeedbackEndpoints, want: int = 0) -> int:
    """The endpoint's open connections once they are ``want`` (or after 5 s)."""
    deadline = time.monotonic() + 5
    while eps.connections() != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return eps.connections()


def parsed(answer: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, json.loads(body)


def post(body: bytes, length: str | None = None, extra: str = "") -> bytes:
    cl = f"Content-Length: {len(body) if length is None else length}\r\n"
    return f"POST /v1/feedback HTTP/1.1\r\nHost: x\r\n{cl}{extra}\r\n".encode() + body


def test_a_well_formed_request_reaches_the_decider(endpoint: Any) -> None:
    _, decider, port = endpoint
    status, _, body = parsed(exchange(port, post(b'{"set": {"egress.rate": "20Mbit"}}')))
    assert (status, body) == (200, {"vm": "a", "method": "POST"})
    status, _, body = parsed(exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n", "127.0.0.2"))
    assert (status, body["vm"]) == (200, "b")
    assert decider.calls == [
        ("lab", "a", "POST", {"set": {"egress.rate": "20Mbit"}}),
        ("lab", "b", "GET", {}),
    ]
    assert decider.malformed_calls == []


def test_a_delete_or_get_naming_a_vnic_brings_its_body(endpoint: Any) -> None:
    """``curl -X DELETE -d '{"nic": "eth1"}'``: the vNIC a hand-back is about."""
    _, decider, port = endpoint
    for method in (b"DELETE", b"GET"):
        raw = post(b'{"nic": "eth1"}').replace(b"POST", method, 1)
        assert parsed(exchange(port, raw))[0] == 200
    assert decider.calls == [
        ("lab", "a", "DELETE", {"nic": "eth1"}),
        ("lab", "a", "GET", {"nic": "eth1"}),
    ]


@pytest.mark.parametrize(
    ("raw", "status", "field"),
    [
        (post(b"{}", "-1"), 400, "Content-Length"),
        (post(b"{}", "abc"), 400, "Content-Length"),
        (post(b"{}", "+2"), 400, "Content-Length"),
        (post(b"{}", "²"), 400, "Content-Length"),
        (post(b"{}", "9" * 5000), 413, "Content-Length"),
        (post(b"{}", str(fh.MAX_BODY + 1)), 413, "Content-Length"),
        (post(b"{}", extra="Content-Length: 2\r\n"), 400, "Content-Length"),
        (b"POST /v1/feedback HTTP/1.1\r\n\r\n{}", 411, "Content-Length"),
        (
            post(b"2\r\n{}\r\n0\r\n\r\n", extra="Transfer-Encoding: chunked\r\n"),
            411,
            "Transfer-Encoding",
        ),
        (b"GARBAGE\r\n\r\n", 400, "request line"),
        (b"GET /v1/other HTTP/1.1\r\n\r\n", 404, "path"),
        (b"PUT /v1/feedback HTTP/1.1\r\n\r\n", 405, "method"),
        (b"GET /v1/feedback HTTP/1.1\r\n folded\r\n\r\n", 400, "header"),
        (
            b"GET /v1/feedback HTTP/1.1\r\n" + b"X: y\r\n" * (fh.MAX_HEADERS + 1) + b"\r\n",
            431,
            "headers",
        ),
        (b"GET /v1/feedback HTTP/1.1\r\nX: " + b"y" * fh.MAX_HEAD, 431, "request head"),
        (post(b"[" * 5000 + b"]" * 5000), 400, "body"),
        (post(b"   " + b" " * 10000), 400, "body"),
        (post(b'{"set": {"egress.rate": "1' + b" " * 5000 + b'"}}'), 400, "set.egress.rate"),
        (post(b'{"set": {}, "set": {}}'), 400, "body"),
        (post(b'{"duration": NaN}'), 400, "body"),
        (post(b"[1]"), 400, "body"),
        (post(b'{"a": [' + b"1," * 400 + b"1]}"), 400, "body"),
        (post(b"\xff\xfe{}"), 400, "body"),
        (post(b'{"set": {}}', "5"), 400, "body"),  # the body is longer than it says
    ],
)
def test_malformed_requests_are_refused_with_a_reason_and_counted(
    endpoint: Any, raw: bytes, status: int, field: str
) -> None:
    eps, decider, port = endpoint
    got, headers, body = parsed(exchange(port, raw))
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert body["fields"][0]["field"] == field, body
    assert body["fields"][0]["expected"] and body["message"]
    assert decider.calls == []  # nothing malformed goes on to the decision
    assert [(s, vm) for s, vm, _ in decider.malformed_calls] == [("lab", "a")]
    assert settled(eps) == 0


def test_an_address_that_is_no_vm_is_refused_and_not_counted(endpoint: Any) -> None:
    _, decider, port = endpoint
    status, _, body = parsed(exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n", "127.0.0.9"))
    assert status == 403 and "127.0.0.9" in body["message"]
    status, _, _ = parsed(exchange(port, post(b"{}", "-1"), "127.0.0.9"))
    assert status == 400
    assert decider.calls == [] and decider.malformed_calls == []


def test_a_slow_body_is_cut_at_the_request_deadline(
    endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fb, "REQUEST_DEADLINE_S", 1.0)
    _, decider, port = endpoint
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(post(b"", "100"))
        answer = b""
        # One byte every 0.2 s: never idle, never complete; bounded at 40 bytes / 8 s.
        for _ in range(40):
            try:
                s.sendall(b" ")
            except OSError:
                break
            s.settimeout(0.2)
            try:
                answer = s.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        s.settimeout(5)
        answer += read_all(s)
    status, _, body = parsed(answer)
    assert status == 408 and "took over 1 s" in body["message"], body
    assert decider.calls == []


def test_a_silent_connection_is_closed_after_the_idle_timeout(
    endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fb, "IDLE_TIMEOUT_S", 0.5)
    eps, _, port = endpoint
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v1/feed")
        status, _, body = parsed(read_all(s))
    assert status == 408 and "nothing came" in body["message"]
    assert settled(eps) == 0


def test_every_request_counts_against_its_address_budget(endpoint: Any) -> None:
    eps, decider, port = endpoint
    eps.budget = SourceBudget(rate=0.5, burst=3)
    statuses = []
    for raw in (b"GET /v1/feedback HTTP/1.0\r\n\r\n", post(b"{}", "-1"), b"JUNK\r\n\r\n"):
        statuses.append(parsed(exchange(port, raw))[0])
    assert statuses == [200, 400, 400]
    status, headers, body = parsed(exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n"))
    assert status == 429 and int(headers["retry-after"]) >= 1, body
    assert "127.0.0.1" in body["message"] and body["retry_after"] > 0
    # Another VM is still answered.
    assert parsed(exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n", "127.0.0.2"))[0] == 200
    assert [c[1] for c in decider.calls] == ["a", "b"]


def test_connections_are_capped_per_address_and_threads_stay_fixed(
    endpoint: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fb, "IDLE_TIMEOUT_S", 30.0)
    monkeypatch.setattr(fb, "REQUEST_DEADLINE_S", 30.0)
    eps, _, port = endpoint
    exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n")  # the loop and a worker started
    threads = threading.active_count()
    idle = []
    try:
        for _ in range(fb.MAX_PER_SOURCE):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        assert settled(eps, fb.MAX_PER_SOURCE) == fb.MAX_PER_SOURCE
        # One more from the same address: 503 at once, not kept.
        status, _, body = parsed(exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n"))
        assert status == 503 and "too many connections" in body["message"]
        assert eps.connections() == fb.MAX_PER_SOURCE
        # Another address is still served.
        assert parsed(exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n", "127.0.0.2"))[0] == 200
        assert threading.active_count() <= threads + fb.WORKERS
    finally:
        for s in idle:
            s.close()
    assert settled(eps) == 0


def test_connections_are_capped_in_total(endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fb, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(fb, "IDLE_TIMEOUT_S", 30.0)
    eps, _, port = endpoint
    idle = [
        socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(f"127.0.1.{i}", 0)
        )
        for i in range(1, 5)
    ]
    try:
        assert settled(eps, 4) == 4
        status, _, _ = parsed(exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n", "127.0.0.2"))
        assert status == 503
    finally:
        for s in idle:
            s.close()


def test_connections_are_capped_per_session(endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fb, "MAX_PER_SESSION", 3)
    monkeypatch.setattr(fb, "IDLE_TIMEOUT_S", 30.0)
    eps, _, port = endpoint
    other = listener()
    eps.serve("other", [other])
    idle = [
        socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(f"127.0.2.{i}", 0)
        )
        for i in range(1, 4)
    ]
    try:
        assert settled(eps, 3) == 3
        assert parsed(exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n", "127.0.0.2"))[0] == 503
        # The other session's endpoint is still served.
        assert (
            parsed(exchange(other.getsockname()[1], b"GET /v1/feedback HTTP/1.0\r\n\r\n"))[0] == 200
        )
    finally:
        for s in idle:
            s.close()


def test_close_frees_the_port_and_the_connections(endpoint: Any) -> None:
    eps, _, port = endpoint
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert settled(eps, 1) == 1
        eps.close("lab")
        assert eps.sessions() == [] and eps.connections() == 0
        assert idle.recv(10) == b""  # closed by the endpoint
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        idle.close()


def test_the_source_budget_refills_at_its_rate() -> None:
    budget = SourceBudget(rate=2.0, burst=2)
    assert [budget.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert budget.take("b", 0.0) == 0.0  # its own bucket
    assert budget.take("a", 0.5) == 0.0  # one token back after 0.5 s
    assert budget.take("a", 0.5) == pytest.approx(0.5)


def test_a_failing_decision_is_a_500_and_the_endpoint_goes_on(endpoint: Any) -> None:
    _, decider, port = endpoint

    def broken(*_args: Any) -> tuple[int, dict[str, Any]]:
        raise RuntimeError("boom")

    decider.feedback = broken
    status, _, body = parsed(exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n"))
    assert status == 500 and "boom" not in json.dumps(body)
    decider.feedback = Decider().feedback
    assert parsed(exchange(port, b"GET /v1/feedback HTTP/1.0\r\n\r\n"))[0] == 200


def test_an_ipv6_listener_knows_the_vm_by_its_address() -> None:
    eps = fb.FeedbackEndpoints(lambda _s, ip: {"::1": "six"}.get(ip))
    eps.attach(Decider())
    sock = socket.socket(socket.AF_INET6)
    sock.bind(("::1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]
    eps.serve("lab6", [sock])
    try:
        with socket.create_connection(("::1", port), timeout=10) as s:
            s.sendall(b"GET /v1/feedback HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = parsed(read_all(s))
        assert (status, body["vm"]) == (200, "six")
    finally:
        eps.close_all()


def test_the_docs_state_the_endpoint_bounds() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "dynamic.md").read_text()
    text = " ".join(text.split())
    for said in (
        f"at most {fh.MAX_BODY // 1024} KiB",
        f"at most {fh.MAX_HEAD // 1024} KiB and {fh.MAX_HEADERS} header lines",
        f"at most {fh.MAX_DEPTH} deep with strings of at most {fh.MAX_STRING} characters",
        f"complete within {fb.REQUEST_DEADLINE_S:g} s and never silent for {fb.IDLE_TIMEOUT_S:g} s",
        f"{fh.SOURCE_BURST:g} at once, then {fh.SOURCE_RATE:g} a second",
        f"at most {fb.MAX_PER_SOURCE} connections from one address, {fb.MAX_PER_SESSION} from "
        f"one session and {fb.MAX_CONNECTIONS} in all",
        f"a pool of {fb.WORKERS} workers",
    ):
        assert said in text, said


def test_a_head_split_anywhere_is_found_once_complete() -> None:
    head = b"GET /v1/feedback HTTP/1.1\r\nHost: x\r\n\r\n"
    for cut in range(1, len(head)):
        assert fh.head_end(head[:cut]) == -1
        assert fh.head_end(head, cut) == len(head), cut


def test_a_request_sent_a_byte_at_a_time_is_answered(endpoint: Any) -> None:
    _, decider, port = endpoint
    raw = post(b'{"profile": "lan"}')
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(raw)):
            s.sendall(raw[i : i + 1])
        status, _, _ = parsed(read_all(s))
    assert status == 200 and decider.calls[-1][3] == {"profile": "lan"}
