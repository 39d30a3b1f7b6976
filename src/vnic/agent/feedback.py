"""The feedback endpoint: where an application inside a VM asks for a different network.

Served by the agent at the session's own address (``.1`` of the session's
IPv4 subnet and ``::1`` of its IPv6 one, port 80), inside
the session namespace: only the session's VMs can reach it. A VM is known by
the address its request comes from, never by what the request says; the
port guard drops frames whose source address is not the sending VM's own
(see :mod:`vnic.dataplane.nft`), so the address cannot be forged.

``GET /v1/feedback`` tells the VM what it runs and what it may ask for;
``POST /v1/feedback`` with ``{"set": {...}}`` or ``{"profile": NAME}`` (and
optionally ``"duration": "60s"``) asks for a change, decided by the
session's feedback limits (:mod:`vnic.controller.feedback`); ``DELETE``
hands back what was asked. Answers are JSON; a refusal is 403 with a reason
naming the field, the value and the limit.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from vnic.dataplane import names
from vnic.dataplane import namespaces as nsops
from vnic.loading import loads_json

#: TCP port of the feedback endpoint, on the session's own addresses (plain HTTP's:
#: nothing else listens there, and a VM needs no port to remember).
FEEDBACK_PORT = 80
#: Largest request body read, in bytes.
MAX_BODY = 64 * 1024


class FeedbackDecider(Protocol):
    """What answers a VM's request: the manager (in-process with ``vnic serve``)."""

    def feedback(
        self, session: str, vm: str, method: str, body: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]: ...


def endpoint_addresses(
    network_id: int,
) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv6Interface]:
    """The session's own addresses, where the endpoint listens."""
    v4, v6 = names.session_ipv4(network_id), names.session_ipv6(network_id)
    return (
        ipaddress.IPv4Interface((int(v4.network_address) + 1, v4.prefixlen)),
        ipaddress.IPv6Interface((int(v6.network_address) + 1, v6.prefixlen)),
    )


def endpoint_url(network_id: int) -> str:
    """What a VM of the session calls: ``http://10.x.y.1/v1/feedback``."""
    return f"http://{endpoint_addresses(network_id)[0].ip}/v1/feedback"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.session = ""
        self.who: Callable[[str], str | None] = lambda _ip: None
        self.decider: FeedbackDecider | None = None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 5.0
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        return  # no access log on stderr; outcomes are audited by the manager

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_DELETE(self) -> None:
        self._answer("DELETE")

    def _answer(self, method: str) -> None:
        if self.path.rstrip("/") != "/v1/feedback":
            return self._send(404, {"error": "not_found", "message": "only /v1/feedback is here"})
        peer = self.client_address[0].removeprefix("::ffff:")
        vm = self.server.who(peer)
        if vm is None:
            return self._send(
                403,
                {"error": "forbidden", "message": f"{peer} is not a running VM of this session"},
            )
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._send(413, {"error": "invalid", "message": f"body over {MAX_BODY} bytes"})
        body: Any = {}
        if length:
            try:
                # Strict: a key twice or 64 KB of "[" is a 400, not a last-wins
                # or a RecursionError that kills the handler thread.
                body = loads_json(self.rfile.read(length))
            except ValueError as exc:
                return self._send(400, {"error": "invalid", "message": f"body is not JSON: {exc}"})
        if not isinstance(body, dict):
            return self._send(400, {"error": "invalid", "message": "body must be a JSON object"})
        decider = self.server.decider
        if decider is None:
            return self._send(503, {"error": "unavailable", "message": "no manager attached"})
        status, answer = decider.feedback(self.server.session, vm, method, body)
        self._send(status, answer)

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FeedbackEndpoints:
    """One endpoint per session with VMs on this host, started and stopped by the agent.

    ``who(session, ip)`` names the running VM with that address (None: none).
    """

    def __init__(self, who: Callable[[str, str], str | None]) -> None:
        self.who = who
        self.decider: FeedbackDecider | None = None
        self._servers: dict[str, list[_Server]] = {}
        self._lock = threading.Lock()

    def ensure(self, session: str, network_id: int) -> None:
        """Listen in the session's namespace (idempotent)."""
        with self._lock:
            if session in self._servers:
                return
            sockets = nsops.session_listener(
                names.session_netns(session), endpoint_addresses(network_id), FEEDBACK_PORT
            )
            servers = []
            for sock in sockets:
                server = _Server(sock, _Handler)
                server.session = session
                server.who = lambda ip, s=session: self.who(s, ip)  # type: ignore[misc]
                server.decider = self.decider
                threading.Thread(
                    target=server.serve_forever,
                    kwargs={"poll_interval": 0.5},
                    name=f"vnic-feedback-{session}",
                    daemon=True,
                ).start()
                servers.append(server)
            self._servers[session] = servers

    def attach(self, decider: FeedbackDecider) -> None:
        self.decider = decider
        with self._lock:
            for servers in self._servers.values():
                for server in servers:
                    server.decider = decider

    def close(self, session: str) -> None:
        with self._lock:
            servers = self._servers.pop(session, [])
        for server in servers:
            server.shutdown()
            server.server_close()

    def close_all(self) -> None:
        for session in list(self._servers):
            self.close(session)

    def sessions(self) -> list[str]:
        return sorted(self._servers)
