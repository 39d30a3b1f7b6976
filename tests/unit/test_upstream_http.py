"""The HTTP source against a small real manager stand-in (``http.server`` in a thread on
127.0.0.1): registration, lease, snapshot, long poll, 410 / 409 / 401, bounded answers,
a bad VM document kept to that VM, and TLS verified with a CA made for the test."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.unit.test_follow import request
from vnic.agent.upstream import (
    Fenced,
    HostInfo,
    HttpSource,
    Refused,
    Relist,
    Unreachable,
    VmStatus,
)
from vnic.agent.wire import request_to_wire
from vnic.errors import InvalidInput, Unauthenticated

TOKEN = "host-token-hv1"
INFO = HostInfo("hv1", "10.250.0.11", 64, 2, {"rack": "a"}, "http://10.250.0.11:8472/metrics")


def stale() -> tuple[int, dict[str, Any]]:
    return 409, {"error": {"kind": "conflict", "message": "epoch is stale", "stale": True}}


@dataclass
class FakeManager:
    """The manager's side of the contract, in memory; ``raw`` answers a path with the
    given bytes and headers instead (hostile answers)."""

    epoch: int = 0
    revision: int = 0
    oldest: int = 0
    vms: list[dict[str, Any]] = field(default_factory=list)
    overlays: Any = None  # the snapshot's "overlays" (None: the key absent)
    log: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[tuple[str, Any]] = field(default_factory=list)
    raw: dict[str, tuple[bytes, bool]] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)
    polling: threading.Event = field(default_factory=threading.Event)

    def wait_for(self, check: Callable[[], bool], timeout: float = 60.0) -> bool:
        """Wait until ``check()`` holds after some request (a test's readiness)."""
        with self.cond:
            return self.cond.wait_for(check, timeout=timeout)

    def statuses(self) -> list[dict[str, Any]]:
        return [
            r for path, body in self.bodies if path == "/v1/agent/status" for r in body["results"]
        ]

    def put(self, change: dict[str, Any]) -> None:
        with self.cond:
            self.revision += 1
            self.log.append({"revision": self.revision, **change})
            self.cond.notify_all()

    def answer(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        with self.cond:
            self.bodies.append((path, body))
            self.cond.notify_all()
        if path == "/v1/agent/register":
            self.epoch += 1
            return 200, {"host": body["host"], "epoch": self.epoch, "lease_seconds": 10.0,
                         "revision": self.revision}  # fmt: skip
        if path in ("/v1/agent/lease", "/v1/agent/status"):
            if body.get("epoch") != self.epoch:
                return stale()
            return 200, ({"epoch": self.epoch, "lease_seconds": 10.0} if "lease" in path else {})
        if path == "/v1/agent/desired":
            doc = {"revision": self.revision, "epoch": self.epoch, "vms": self.vms}
            return 200, doc if self.overlays is None else {**doc, "overlays": self.overlays}
        if path == "/v1/agent/changes":
            after, wait = int(query["after"]), float(query["wait"])
            if after < self.oldest:
                return 410, {"error": {"kind": "gone", "message": "trimmed", "relist": True}}
            with self.cond:
                self.polling.set()
                self.cond.wait_for(lambda: self.revision > after, timeout=wait)
                news = [c for c in self.log if c["revision"] > after]
                return 200, {"revision": max(self.revision, after), "changes": news}
        return 404, {"error": {"kind": "not_found", "message": path}}


def serve(manager: FakeManager, tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            # The request's body is read first, always: closing a socket with unread data
            # in it sends a reset, which can reach the client before the whole answer
            # (seen as "connection reset by peer" on a loaded machine).
            length = int(self.headers.get("Content-Length") or 0)
            raw_body = self.rfile.read(length) if length else b""
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, {"error": {"kind": "unauthenticated", "message": "unknown token"}})
                return
            if url.path in manager.raw:
                data, with_length = manager.raw[url.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if with_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)  # without a length: the body ends with the connection
                return
            body = json.loads(raw_body) if raw_body else None
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            self._send(*manager.answer(method, url.path, query, body))

        def _send(self, status: int, doc: Any) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="fake-manager",
        daemon=True,
    ).start()
    return server


@pytest.fixture
def manager() -> Iterator[tuple[FakeManager, str]]:
    state = FakeManager()
    server = serve(state)
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        with state.cond:
            state.revision += 10**6  # wakes a long poll still waiting
            state.cond.notify_all()
        server.shutdown()
        server.server_close()


def vm_doc(vm: str, rate: str = "20Mbit") -> dict[str, Any]:
    return {
        "session": "lab",
        "vm": vm,
        "driver": "fake",
        "request": request_to_wire(request(vm, rate)),
    }


def test_register_renew_snapshot_and_report(manager: tuple[FakeManager, str]) -> None:
    state, url = manager
    source = HttpSource(url, TOKEN)
    reg = source.register(INFO)
    assert (reg.host, reg.epoch, reg.lease_seconds, reg.revision) == ("hv1", 1, 10.0, 0)
    assert state.bodies[-1] == ("/v1/agent/register", {
        "host": "hv1", "underlay": "10.250.0.11", "capacity": {"vnics": 64, "cpus": 2},
        "labels": {"rack": "a"}, "metrics_url": "http://10.250.0.11:8472/metrics",
    })  # fmt: skip
    assert source.renew(1) == 10.0
    state.vms = [vm_doc("a")]
    snap = source.snapshot()
    assert snap.revision == 0 and snap.epoch == 1 and snap.invalid == {}
    assert [(v.driver, v.request) for v in snap.vms] == [("fake", request("a"))]
    source.report(1, [VmStatus("lab", "a", 0, None, ["launched"])])
    assert state.bodies[-1][1] == {
        "epoch": 1,
        "results": [{"session": "lab", "vm": "a", "revision": 0, "error": None,
                     "changes": ["launched"]}],
    }  # fmt: skip


def test_a_stale_epoch_is_fenced(manager: tuple[FakeManager, str]) -> None:
    _, url = manager
    source = HttpSource(url, TOKEN)
    source.register(INFO)
    source.register(INFO)  # epoch 2: the first registration is stale now
    with pytest.raises(Fenced, match="stale"):
        source.renew(1)
    with pytest.raises(Fenced):
        source.report(1, [])
    assert source.renew(2) == 10.0


def test_the_long_poll_answers_when_a_change_comes(manager: tuple[FakeManager, str]) -> None:
    state, url = manager
    source = HttpSource(url, TOKEN)
    assert source.changes(0, 0) == (0, [])  # nothing after 0: an empty answer at once
    got: list[Any] = []
    poll = threading.Thread(target=lambda: got.append(source.changes(0, 20)))
    poll.start()
    assert state.polling.wait(10)  # the manager holds the poll
    state.put({"session": "lab", "vm": "a", "desired": {"driver": "fake",
               "request": request_to_wire(request("a"))}})  # fmt: skip
    state.put({"session": "lab", "vm": "b", "desired": None})
    poll.join(20)
    ((revision, changes),) = got
    assert revision >= 1
    assert changes[0].revision == 1 and changes[0].desired is not None
    assert changes[0].desired.request == request("a") and changes[0].error is None
    if len(changes) > 1:  # the poll may have answered before the second change
        assert (changes[1].key, changes[1].desired) == (("lab", "b"), None)
    assert source.changes(1, 5)[1][0].key == ("lab", "b")


def test_410_is_relist(manager: tuple[FakeManager, str]) -> None:
    state, url = manager
    state.oldest = 5
    with pytest.raises(Relist, match="trimmed"):
        HttpSource(url, TOKEN).changes(3, 1)


def test_a_bad_token_is_a_clear_error(manager: tuple[FakeManager, str]) -> None:
    _, url = manager
    with pytest.raises(Unauthenticated, match="refused the host token: unknown token"):
        HttpSource(url, "wrong").register(INFO)


def test_a_bad_vm_document_is_that_vms_error(manager: tuple[FakeManager, str]) -> None:
    state, url = manager
    broken = vm_doc("b")
    broken["request"]["nics"][0]["profile"] = {"egress": {"rate": "fast"}}
    other = vm_doc("c")
    other["vm"] = "d"  # says d, carries c
    state.vms = [vm_doc("a"), broken, other, {"no": "names"}]
    snap = HttpSource(url, TOKEN).snapshot()
    assert [v.request.vm for v in snap.vms] == ["a"]
    assert set(snap.invalid) == {("lab", "b"), ("lab", "d")}
    error = snap.invalid[("lab", "b")]
    assert isinstance(error, InvalidInput)
    assert error.paths == ["request.nics[0].profile.egress.rate"]
    assert snap.invalid[("lab", "d")].paths == ["request.vm"]  # type: ignore[attr-defined]
    state.put({"session": "lab", "vm": "b", "desired": {"driver": "fake", "request": "x"}})
    ((change,),) = [HttpSource(url, TOKEN).changes(0, 1)[1]]
    assert change.desired is None and isinstance(change.error, InvalidInput)


@pytest.mark.parametrize("with_length", [True, False])
def test_an_oversized_answer_is_refused(
    manager: tuple[FakeManager, str], with_length: bool
) -> None:
    state, url = manager
    state.raw["/v1/agent/desired"] = (b'{"vms": [' + b"0," * 600_000 + b"0]}", with_length)
    source = HttpSource(url, TOKEN, max_body=1_000_000)
    # Refused by its length header, or, without one, as the bytes pass the bound.
    why = r"has 1200012 bytes; at most 1000000" if with_length else r"over 1000000 bytes"
    with pytest.raises(Unreachable, match=why):
        source.snapshot()
    # Under the byte bound, but more VMs than one answer may hold.
    state.raw["/v1/agent/desired"] = (
        b'{"revision": 1, "vms": [' + b"0," * 20 + b"0]}",
        with_length,
    )
    with pytest.raises(Unreachable, match="21 VMs; at most 20"):
        HttpSource(url, TOKEN, max_items=20).snapshot()


def test_answers_that_break_the_contract_are_unreachable(manager: tuple[FakeManager, str]) -> None:
    state, url = manager
    source = HttpSource(url, TOKEN)
    for body, why in [
        (b"[" * 100_000, "not JSON"),  # nested past the parser's depth
        (b"[]", "not a JSON object"),
        (b'{"host": "hv1", "epoch": "7", "lease_seconds": 10, "revision": 1}', "epoch="),
        (b'{"host": "hv1", "epoch": 7, "lease_seconds": 1e9, "revision": 1}', "0.1 to 3600"),
    ]:
        state.raw["/v1/agent/register"] = (body, True)
        with pytest.raises(Unreachable, match=why):
            source.register(INFO)


def test_no_manager_is_unreachable() -> None:
    with pytest.raises(Unreachable, match="did not answer register"):
        HttpSource("http://127.0.0.1:9", TOKEN, timeout=2).register(INFO)
    with pytest.raises(InvalidInput, match="manager: got 'ftp://x'"):
        HttpSource("ftp://x", TOKEN)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls_manager(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A manager on HTTPS with a certificate for 127.0.0.1 from a CA made here."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=vnic test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=tmp_path)  # fmt: skip
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1",
            cwd=tmp_path)  # fmt: skip
    (tmp_path / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "srv.pem", "-days", "1", "-extfile", "ext.cnf",
            cwd=tmp_path)  # fmt: skip
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    state = FakeManager()
    server = serve(state, tls)
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", tmp_path / "ca.pem"
    finally:
        server.shutdown()
        server.server_close()


def test_tls_is_verified_with_the_ca_given(tls_manager: tuple[str, Path], tmp_path: Path) -> None:
    url, ca = tls_manager
    assert HttpSource(url, TOKEN, ca_file=ca).register(INFO).epoch == 1
    with pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
        HttpSource(url, TOKEN).register(INFO)  # the default bundle does not know this CA
    # Another CA, for the same name, is refused too.
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "other.key", "-out", "other.pem", "-days", "1",
            "-subj", "/CN=127.0.0.1", cwd=tmp_path)  # fmt: skip
    with pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
        HttpSource(url, TOKEN, ca_file=tmp_path / "other.pem").register(INFO)


def overlay_doc(vni: int = 7, **extra: Any) -> dict[str, Any]:
    return {
        "network": "default",
        "vni": vni,
        "peers": ["10.250.0.12", "10.250.0.13"],
        "macs": {"52:54:00:00:00:02": "10.250.0.12"},
        **extra,
    }


def test_overlays_in_the_snapshot_and_the_changes(manager: tuple[FakeManager, str]) -> None:
    state, url = manager
    source = HttpSource(url, TOKEN)
    assert source.snapshot().overlays == {}  # absent: none
    state.overlays = {
        "lab": [overlay_doc()],
        "bad": [overlay_doc(peers=["10.250.0.12", "not-an-address"])],
        "": [overlay_doc()],  # no session to pin it on: left out
    }
    snap = source.snapshot()
    (lab,) = snap.overlays["lab"]
    assert (lab.session, lab.network, lab.vni) == ("lab", "default", 7)
    assert [str(p) for p in lab.peers] == ["10.250.0.12", "10.250.0.13"]
    assert [(str(m), str(p)) for m, p in lab.macs] == [("52:54:00:00:00:02", "10.250.0.12")]
    assert set(snap.overlays) == {"lab"} and set(snap.overlay_errors) == {"bad"}
    assert snap.overlay_errors["bad"].paths == ["overlays[0].peers[1]"]  # type: ignore[attr-defined]
    state.put({"session": "lab", "vm": "", "overlays": [overlay_doc(8)]})
    state.put({"session": "lab", "vm": "", "overlays": []})
    state.put({"session": "lab", "vm": "", "overlays": [overlay_doc(0)]})
    _, changes = source.changes(0, 1)
    assert [c.vm for c in changes] == ["", "", ""]
    assert changes[0].overlays is not None and changes[0].overlays[0].vni == 8
    assert changes[1].overlays == [] and changes[1].error is None
    assert changes[2].overlays is None and isinstance(changes[2].error, InvalidInput)
    assert changes[2].error.paths == ["overlays[0].vni"]
    state.overlays = ["not", "an", "object"]
    with pytest.raises(Unreachable, match="overlays"):
        source.snapshot()


def test_a_replica_that_does_not_answer_hands_the_next_call_to_the_next(
    manager: tuple[FakeManager, str],
) -> None:
    """With replicas' URLs, a call no replica answered fails (the follower retries), and
    the next goes to the next replica, which resumes from the same database."""
    _, url = manager
    source = HttpSource(["http://127.0.0.1:9", url], TOKEN, timeout=2)
    with pytest.raises(Unreachable, match=r"127\.0\.0\.1:9"):
        source.register(INFO)
    assert source.url == url
    assert source.register(INFO).epoch == 1  # the second replica answers
    assert source.renew(1) > 0 and source.url == url  # answered: calls stay there
    with pytest.raises(InvalidInput) as err:
        HttpSource([url, "ftp://x"], TOKEN)
    assert err.value.paths == ["manager"] and "ftp://x" in str(err.value)
    with pytest.raises(InvalidInput):
        HttpSource([], TOKEN)


def test_a_port_nothing_listens_on_is_refused_not_just_unreachable() -> None:
    import socket

    with socket.socket() as sock:  # a port bound, never listened on: connections refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        source = HttpSource(f"http://127.0.0.1:{port}", "vnich_x")
        with pytest.raises(Refused, match="did not answer"):
            source.renew(1)
