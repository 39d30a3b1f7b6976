"""The seam between an agent and the manager it follows: where the host's desired state
comes from (list, then watch), where its lease is kept and its VMs' status goes.

:class:`DesiredSource` is the one interface the follower (:mod:`vnic.agent.follow`)
uses; :class:`HttpSource` implements it over the manager's ``/v1/agent/*`` HTTP
endpoints (long poll for the watch), the agent dialling out with its host token.
A message bus (NATS JetStream: a stream per host, a durable consumer for the watch)
could implement the same five methods; nothing else would change.

What a source raises, and what the follower does about it:

- :class:`Relist`: the revision asked for is older than the change log holds (410), or
  the manager's revision went back: take a new snapshot;
- :class:`Fenced`: the epoch is no longer the host's (409), or its lease ran out:
  register again (a new epoch), then relist;
- :class:`Unreachable`: no answer, a 5xx or 429, or an answer that is not what the
  contract says (too large, not JSON, a field of the wrong type): back off, relist
  (:class:`Refused`, a connection refused, is retried sooner);
- a :class:`~vnic.errors.VnicError` (401 :class:`~vnic.errors.Unauthenticated`, 403,
  a 4xx refusal of the registration): the manager refuses this agent; back off.

A VM whose desired document does not parse is not an error of the answer: it comes
back in :attr:`Snapshot.invalid` or :attr:`Change.error`, for that VM's status. So do a
session's overlays (:mod:`vnic.plan.overlay`: the snapshot's ``overlays``, a change with
``vm ""``), in :attr:`Snapshot.overlay_errors` or :attr:`Change.error`.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from vnic.agent.port import DesiredVm, VmKey
from vnic.agent.wire import request_from_wire
from vnic.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    Unauthenticated,
    VnicError,
    shorten,
)
from vnic.plan.overlay import Overlay, overlays_from_wire

#: Bytes: the largest answer read from the manager (a hostile one must not exhaust memory).
MAX_BODY = 16 * 1024 * 1024
#: VMs in one snapshot, changes in one watch answer: more is refused as malformed.
MAX_ITEMS = 10_000
#: Seconds: the longest long poll the contract allows (``wait`` is cut to it).
MAX_WAIT = 30.0
#: Manager replicas one agent may be given (``--manager URL,URL,...``).
MAX_REPLICAS = 8
#: Seconds to wait for a connection to the manager.
CONNECT = 3.0


class Relist(Exception):
    """The watch cannot resume from the revision asked for: take a new snapshot."""


class Fenced(Exception):
    """This registration (epoch) is stale or its lease ran out: register again, relist."""


class Unreachable(Exception):
    """The manager did not answer, or not as the contract says: back off and retry."""


class Refused(Unreachable):
    """Nothing listens at the manager's address (the connection was refused: it is down
    or starting). Costs the manager nothing, so retried sooner than other failures."""


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by a refused connection (anywhere in its chain)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConnectionRefusedError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


@dataclass(frozen=True)
class HostInfo:
    """What an agent registers: its host's name, underlay address, capacity (vNICs and
    CPUs, counts), labels and the URL Prometheus scrapes it at (None: no metrics)."""

    host: str
    underlay: str
    vnics: int
    cpus: int
    labels: dict[str, str] = field(default_factory=dict)
    metrics_url: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "underlay": self.underlay,
            "capacity": {"vnics": self.vnics, "cpus": self.cpus},
            "labels": dict(self.labels),
            "metrics_url": self.metrics_url,
        }


@dataclass(frozen=True)
class Registration:
    """The manager's answer to a registration: the epoch it raised, the lease (seconds)
    and the change log's revision then."""

    host: str
    epoch: int
    lease_seconds: float
    revision: int


@dataclass(frozen=True)
class Snapshot:
    """Every VM the host must run, as of ``revision``; ``invalid``: VMs whose document
    did not parse (by key, the error), not in ``vms``; ``epoch``: the registration the
    manager answered for (None when it did not say)."""

    revision: int
    vms: list[DesiredVm]
    invalid: dict[VmKey, VnicError] = field(default_factory=dict)
    epoch: int | None = None
    #: Each session's overlays on this host (a session absent: none), and the sessions
    #: whose overlays did not parse (the error, for the session's status with ``vm ""``).
    overlays: dict[str, list[Overlay]] = field(default_factory=dict)
    overlay_errors: dict[str, VnicError] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """The state of one VM as of ``revision``: ``desired`` None means it must not run
    here. ``error``: its document did not parse (``desired`` is then None and means
    nothing: the follower leaves the VM as it is and reports the error).

    With ``vm`` ``""``, the change is the session's overlays instead: ``overlays`` (a
    list, maybe empty) are now exactly the session's on this host (None with ``error``:
    they did not parse)."""

    revision: int
    session: str
    vm: str
    desired: DesiredVm | None
    error: VnicError | None = None
    overlays: list[Overlay] | None = None

    @property
    def key(self) -> VmKey:
        return (self.session, self.vm)


@dataclass(frozen=True)
class VmStatus:
    """What applying a VM's desired state (as of ``revision``) did: ``error`` None or
    ``{"kind", "message", "fields"}``; ``changes``: one line per thing done to the kernel."""

    session: str
    vm: str
    revision: int
    error: dict[str, Any] | None = None
    changes: list[str] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "vm": self.vm,
            "revision": self.revision,
            "error": self.error,
            "changes": list(self.changes),
        }


def error_doc(exc: BaseException) -> dict[str, Any]:
    """``exc`` as a status's ``error``: ``{"kind", "message", "fields"}`` (fields: the
    paths an :class:`InvalidInput` names, empty otherwise)."""
    if isinstance(exc, VnicError):
        body = exc.to_dict()
        kind = str(body.get("error", exc.kind))
        fields = list(body.get("fields", []))
    else:  # a bug or an OS refusal the agent did not translate: still this VM's alone
        kind, fields = "error", []
    return {"kind": kind, "message": shorten(str(exc), 2000), "fields": fields}


class DesiredSource(Protocol):
    """Where one host's desired state comes from, and where its status goes."""

    def register(self, info: HostInfo) -> Registration:
        """Register the host (raises its epoch); the lease starts now."""

    def renew(self, epoch: int) -> float:
        """Renew the lease of registration ``epoch``; the lease's length (seconds).
        :class:`Fenced` when ``epoch`` is not current or the lease ran out."""

    def snapshot(self) -> Snapshot:
        """Every VM the host must run, and the revision that is as of."""

    def changes(self, after: int, wait: float) -> tuple[int, list[Change]]:
        """Changes after revision ``after``, in order, and the revision they bring the
        host to; waits up to ``wait`` seconds for one (then ``(after, [])``).
        :class:`Relist` when ``after`` is older than what the log holds."""

    def report(self, epoch: int, statuses: list[VmStatus]) -> None:
        """Tell the manager what applying its VMs did; :class:`Fenced` for a stale epoch."""


class HttpSource(DesiredSource):
    """The manager's ``/v1/agent/*`` endpoints at ``url`` (``https://`` or ``http://``),
    authenticated by the host's token. ``url`` may be a sequence of URLs, the replicas of
    one manager (one database): a call that gets no answer, a 5xx or a 429 from one
    makes the next call go to the next (in turn, wrapping round), so an agent follows
    another replica while one is down. The watch's revision and the registration's epoch
    are the database's, so the next replica resumes where the last one left off.

    ``ca_file``: the CA bundle (PEM) that verifies the manager's certificate (default:
    httpx's, certifi's bundle); an ``https://`` manager is always verified. ``timeout``: seconds to connect, and to wait for any answer beyond a
    long poll's own wait. ``max_body``: bytes an answer may have; ``max_items``: VMs or
    changes one answer may hold (defaults :data:`MAX_BODY`, :data:`MAX_ITEMS`).
    ``transport``: an httpx transport to use (tests).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: str,
        ca_file: str | Path | None = None,
        timeout: float = 10.0,
        *,
        max_body: int = MAX_BODY,
        max_items: int = MAX_ITEMS,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls or len(urls) > MAX_REPLICAS:
            raise InvalidInput.one("manager", urls, f"1 to {MAX_REPLICAS} URLs")
        for u in urls:
            if not isinstance(u, str) or not u.startswith(("http://", "https://")):
                raise InvalidInput.one("manager", u, "an http:// or https:// URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = timeout
        self.max_body = max_body
        self.max_items = max_items
        # The CA given, else httpx's default (certifi's bundle, or $SSL_CERT_FILE).
        verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self._clients = [
            httpx.Client(
                base_url=u,
                verify=verify,
                timeout=timeout,
                headers={"Authorization": f"Bearer {token}"},
                transport=transport,
                follow_redirects=False,  # the token goes to the manager named, nowhere else
            )
            for u in self.urls
        ]
        self._at = 0  # the replica calls go to (the lease thread and the main loop share it)

    @property
    def url(self) -> str:
        """The URL calls go to now."""
        return self.urls[self._at]

    def _next_replica(self, failed: int) -> None:
        """Calls go to the replica after ``failed`` (unless another thread moved on)."""
        if self._at == failed:
            self._at = (failed + 1) % len(self.urls)

    def close(self) -> None:
        for client in self._clients:
            client.close()

    # The contract's five calls.

    def register(self, info: HostInfo) -> Registration:
        doc = self._call("POST", "/v1/agent/register", "register", json=info.to_wire())
        return Registration(
            host=_field(doc, "host", str),
            epoch=_count(doc, "epoch"),
            lease_seconds=_seconds(doc, "lease_seconds"),
            revision=_count(doc, "revision"),
        )

    def renew(self, epoch: int) -> float:
        doc = self._call("POST", "/v1/agent/lease", "lease", json={"epoch": epoch})
        return _seconds(doc, "lease_seconds")

    def snapshot(self) -> Snapshot:
        doc = self._call("GET", "/v1/agent/desired", "desired")
        entries = _field(doc, "vms", list)
        if len(entries) > self.max_items:
            raise Unreachable(
                f"manager's desired state has {len(entries)} VMs; at most {self.max_items} read"
            )
        vms: list[DesiredVm] = []
        invalid: dict[VmKey, VnicError] = {}
        for entry in entries:
            key, vm, error = _entry(entry, entry.get("driver") if isinstance(entry, dict) else None)
            if key is None:
                continue  # no VM to pin it on (see _entry)
            if error is not None:
                invalid[key] = error
            elif vm is not None:
                vms.append(vm)
        epoch = doc.get("epoch")
        overlays, overlay_errors = self._overlays(doc.get("overlays", {}))
        return Snapshot(
            revision=_count(doc, "revision"),
            vms=vms,
            invalid=invalid,
            epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
            overlays=overlays,
            overlay_errors=overlay_errors,
        )

    def _overlays(self, doc: Any) -> tuple[dict[str, list[Overlay]], dict[str, VnicError]]:
        """The snapshot's ``overlays`` (session: list); a session whose list does not parse
        is in the errors; a key that is no session name is left out (no status to pin it
        on); not an object, or over :attr:`max_items` sessions: the answer is malformed."""
        if not isinstance(doc, dict) or len(doc) > self.max_items:
            raise Unreachable(
                f"manager's answer has overlays={shorten(repr(doc))}; expected an object of "
                f"at most {self.max_items} sessions"
            )
        out: dict[str, list[Overlay]] = {}
        errors: dict[str, VnicError] = {}
        for session, value in doc.items():
            if not isinstance(session, str) or not session:
                continue
            try:
                out[session] = overlays_from_wire(session, value)
            except InvalidInput as exc:
                errors[session] = exc
        return out, errors

    def changes(self, after: int, wait: float) -> tuple[int, list[Change]]:
        wait = max(0.0, min(wait, MAX_WAIT))
        doc = self._call(
            "GET",
            "/v1/agent/changes",
            "changes",
            params={"after": after, "wait": f"{wait:g}"},
            extra=wait,
        )
        revision = _count(doc, "revision")
        if revision < after:
            raise Relist(f"manager's revision went back from {after} to {revision}")
        items = _field(doc, "changes", list)
        if len(items) > self.max_items:
            raise Unreachable(
                f"manager sent {len(items)} changes in one answer; at most {self.max_items} read"
            )
        out: list[Change] = []
        for item in items:
            if not isinstance(item, dict):
                raise Unreachable(
                    f"manager sent a change that is not an object: {shorten(repr(item))}"
                )
            rev = _count(item, "revision")
            if item.get("vm") == "" and "overlays" in item:
                session = item.get("session")
                if isinstance(session, str) and session:
                    out.append(_overlay_change(rev, session, item["overlays"]))
                continue
            desired = item.get("desired")
            if desired is None:
                key, vm, error = _key(item), None, None
            elif isinstance(desired, dict):
                key, vm, error = _entry({**desired, **_names(item)}, desired.get("driver"))
            else:
                key, vm, error = _key(item), None, _invalid("desired", desired, "an object or null")
            if key is None:
                continue
            out.append(Change(rev, key[0], key[1], vm, error))
        return revision, out

    def report(self, epoch: int, statuses: list[VmStatus]) -> None:
        body = {"epoch": epoch, "results": [s.to_wire() for s in statuses]}
        self._call("POST", "/v1/agent/status", "status", json=body)

    # The transport.

    def _call(
        self, method: str, path: str, what: str, *, extra: float = 0.0, **kwargs: Any
    ) -> dict[str, Any]:
        """One request; the answer's JSON object. ``extra``: seconds the manager may hold
        the answer on purpose (a long poll), on top of :attr:`timeout`."""
        budget = self.timeout + extra
        # A connection is made in milliseconds or not at all (a partition drops the SYN):
        # waiting the whole timeout for it would hold the agent past a heal.
        timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, CONNECT), read=budget)
        at = self._at
        url, client = self.urls[at], self._clients[at]
        try:
            with client.stream(method, path, timeout=timeout, **kwargs) as response:
                body = self._read(response, what, time.monotonic() + budget)
        except httpx.HTTPError as exc:
            self._next_replica(at)
            failure = Refused if _refused(exc) else Unreachable
            raise failure(f"manager {url} did not answer {what}: {exc}") from None
        except Unreachable:
            self._next_replica(at)
            raise
        status = response.status_code
        if status >= 500 or status == 429:
            self._next_replica(at)
        if status == 200:
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):  # RecursionError: nesting a megabyte deep
                raise Unreachable(f"manager's answer to {what} is not JSON") from None
            if not isinstance(doc, dict):
                raise Unreachable(f"manager's answer to {what} is not a JSON object")
            return doc
        kind, message = _error_of(body, status)
        if status == 410:
            raise Relist(message)
        if status == 409 and what != "register":
            raise Fenced(message)
        if status == 401:
            raise Unauthenticated(f"manager {url} refused the host token: {message}")
        if status >= 500 or status == 429 or status < 400:
            raise Unreachable(f"manager answered {what} with {status}: {message}")
        if status == 403:
            raise Forbidden(f"manager {url} refused {what} to this host: {message}")
        raise Conflict(f"manager refused {what} ({status} {kind}): {message}")

    def _read(self, response: httpx.Response, what: str, deadline: float) -> bytes:
        """The body, refused past :attr:`max_body` bytes (by its length header, or as it
        arrives) or past ``deadline`` (a manager trickling bytes keeps no thread)."""
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise Unreachable(
                f"manager's answer to {what} has {int(length)} bytes; at most {self.max_body} read"
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self.max_body:
                raise Unreachable(
                    f"manager's answer to {what} is over {self.max_body} bytes; not read further"
                )
            if time.monotonic() > deadline:
                raise Unreachable(f"manager's answer to {what} took too long to arrive")
            chunks.append(chunk)
        return b"".join(chunks)


def _error_of(body: bytes, status: int) -> tuple[str, str]:
    """An error answer's kind and message (cut to a few hundred characters).

    The contract's ``{"error": {"kind", "message", ...}}``, and the flat
    ``{"error": kind, "message"}`` of vnic's other APIs alike."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    inner = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(inner, dict):
        kind, message = str(inner.get("kind", "error")), str(inner.get("message", ""))
    elif isinstance(doc, dict):
        kind, message = str(inner or "error"), str(doc.get("message", ""))
    else:
        kind, message = "error", body[:200].decode("utf-8", "replace")
    return shorten(kind, 40), shorten(message or f"HTTP {status}")


def _overlay_change(revision: int, session: str, value: Any) -> Change:
    """A change of ``session``'s overlays; a list that does not parse is its error."""
    try:
        return Change(revision, session, "", None, overlays=overlays_from_wire(session, value))
    except InvalidInput as exc:
        return Change(revision, session, "", None, error=exc)


def _names(item: dict[str, Any]) -> dict[str, Any]:
    return {k: item[k] for k in ("session", "vm") if k in item}


def _key(doc: dict[str, Any]) -> VmKey | None:
    """The VM a document names, or None (a document naming no VM cannot be reported on,
    so it is left out: the manager sees no status for it)."""
    session, vm = doc.get("session"), doc.get("vm")
    if isinstance(session, str) and isinstance(vm, str) and session and vm:
        return (session, vm)
    return None


def _entry(doc: Any, driver: Any) -> tuple[VmKey | None, DesiredVm | None, VnicError | None]:
    """One desired VM (``{session, vm, driver, request}``): its key and the parsed VM, or
    its key and why it does not parse."""
    if not isinstance(doc, dict):
        return None, None, None
    key = _key(doc)
    if key is None:
        return None, None, None
    if not isinstance(driver, str) or not driver:
        return key, None, _invalid("driver", driver, "a driver kind")
    try:
        request = request_from_wire(doc.get("request"))
    except InvalidInput as exc:
        # Paths inside the request go under it; "request" itself (the whole) stays.
        errors = [e if e.path == "request" else e.under("request") for e in exc.errors]
        return key, None, InvalidInput(errors)
    if (request.session, request.vm) != key:
        name = f"{request.session}/{request.vm}"
        return key, None, _invalid("request.vm", name, f"the VM {key[0]}/{key[1]} it is sent for")
    return key, DesiredVm(driver, request), None


def _invalid(path: str, value: Any, expected: str) -> InvalidInput:
    return InvalidInput.one(path, value, expected)


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind):
        raise Unreachable(
            f"manager's answer has {name}={shorten(repr(value))}; expected {kind.__name__}"
        )
    return value


def _count(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise Unreachable(
            f"manager's answer has {name}={shorten(repr(value))}; expected an integer >= 0"
        )
    return value


def _seconds(doc: dict[str, Any], name: str) -> float:
    value = doc.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.1 <= value <= 3600:
        raise Unreachable(
            f"manager's answer has {name}={shorten(repr(value))}; expected 0.1 to 3600 seconds"
        )
    return float(value)
