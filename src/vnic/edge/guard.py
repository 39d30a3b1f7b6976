"""Request guards at the HTTP edge of ``vnic serve`` and ``vnic agent`` (issue #15).

One pure ASGI middleware (:class:`HttpGuard`, put in place by :func:`install`) that
checks every request before any route sees it, and marks every answer:

* **Host** must name this server: a loopback name or address (``localhost``,
  ``127.0.0.0/8``, ``::1``), the address it is bound to, or a name given with
  ``--allowed-host``; bound to every address (``0.0.0.0``/``::``), any address
  literal too (a literal cannot be rebound). Anything else is a DNS-rebinding
  attempt: 421 naming ``Host``.
* **Cross-site writes** (POST, PUT, PATCH, DELETE): a browser on another origin
  never writes. ``Sec-Fetch-Site``, when sent, must be ``same-origin`` (or
  ``none``); ``Origin`` (or, lacking it, ``Referer``) must be this server's own
  origin; a request the UI's cookie authenticates must carry one of them. Else
  403 naming the header. A bearer header alone is no ambient credential, so the
  CLI (which sends neither) is unaffected.
* **Content types** of writes: JSON (``application/json``, ``*/*+json``), and on
  the YAML import route also ``application/yaml`` (what the UI sends) or no type;
  a form post (``application/x-www-form-urlencoded``, ``multipart/form-data``,
  ``text/plain``), or a JSON route's body without a type, gets 415.
* **Body size**: :data:`DEFAULT_BODY_LIMIT` (1 MiB) per request, larger only on
  the routes given (the manager's two import routes: :data:`IMPORT_BODY_LIMIT`;
  the agent's whole-host ``/v1/sync`` and ``/v1/reconfigure``:
  :data:`AGENT_BATCH_LIMIT`). A ``Content-Length`` over it is refused before a
  byte is read; a chunked body is counted while it arrives and cut at the limit,
  never buffered whole. 413 naming the limit.
* **Security headers** on every answer: a Content-Security-Policy without inline
  script or style (``frame-ancestors 'none'``), ``X-Frame-Options: DENY``,
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin``,
  ``Cross-Origin-Resource-Policy`` and ``-Opener-Policy: same-origin``.

Refusals have the API's error body ``{error, message, fields: [{field, value,
expected}]}`` and change nothing: they happen before the route runs.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vnic.edge.errors import ErrorBody
from vnic.errors import FieldError, show_value

#: Bytes a request body may have unless its route says otherwise.
DEFAULT_BODY_LIMIT = 1 << 20
#: Bytes of the manager's import routes (JSON and YAML): thousands of profiles.
IMPORT_BODY_LIMIT = 8 << 20
#: Bytes of the agent's whole-host batches (every desired VM of the host at once).
AGENT_BATCH_LIMIT = 32 << 20
#: The manager's routes with a larger body limit than the default.
MANAGER_BODY_LIMITS: Mapping[str, int] = {
    "/v1/import/profiles": IMPORT_BODY_LIMIT,
    "/v1/import/profiles/yaml": IMPORT_BODY_LIMIT,
}
AGENT_BODY_LIMITS: Mapping[str, int] = {
    "/v1/sync": AGENT_BATCH_LIMIT,
    "/v1/reconfigure": AGENT_BATCH_LIMIT,
}
#: Routes that take YAML text besides JSON (the UI's import sends application/yaml).
YAML_ROUTES = frozenset({"/v1/import/profiles/yaml"})
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})

#: Every page and asset is our own file: no inline script or style, no frames.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
#: FastAPI's /docs and /redoc load Swagger UI / ReDoc from its CDN and start them with
#: an inline script; they show only our own OpenAPI document.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https:; "
    "worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})


def security_headers(path: str) -> list[tuple[bytes, bytes]]:
    """The headers every answer carries (the docs pages get their own CSP)."""
    csp = DOCS_CSP if path in DOCS_PATHS else CSP
    return [
        (b"content-security-policy", csp.encode()),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"cross-origin-resource-policy", b"same-origin"),
        (b"cross-origin-opener-policy", b"same-origin"),
    ]


#: What the guard answers, for the OpenAPI document of every route.
GUARD_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (413, "The request body is over the route's limit"),
        (415, "The body's Content-Type is not one this route reads (JSON)"),
        (421, "The Host header names no address this server answers on"),
    )
}


# ----------------------------------------------------------------------------- config


@dataclass
class GuardConfig:
    """What :class:`HttpGuard` checks. ``hosts`` are extra names (lower case) besides
    the loopback ones; ``any_address``: accept every address literal (wildcard bind)."""

    hosts: set[str] = field(default_factory=set)
    any_address: bool = False
    cookie: str | None = None
    default_limit: int = DEFAULT_BODY_LIMIT
    limits: Mapping[str, int] = field(default_factory=dict)
    yaml_routes: frozenset[str] = frozenset()

    def limit(self, path: str) -> int:
        """The body limit of ``path``, in bytes."""
        return self.limits.get(path, self.default_limit)

    def host_allowed(self, host: str) -> bool:
        if host in LOOPBACK_NAMES or host in self.hosts:
            return True
        address = _address(host)
        return address is not None and (address.is_loopback or self.any_address)

    def expected_hosts(self) -> str:
        names = [*sorted(LOOPBACK_NAMES | self.hosts), "127.0.0.0/8", "::1"]
        if self.any_address:
            names.append("any IP address")
        return "one of " + ", ".join(names) + " (vnic serve --allowed-host NAME adds one)"


def install(
    app: FastAPI,
    *,
    cookie: str | None = None,
    limits: Mapping[str, int] | None = None,
    yaml_routes: Iterable[str] = (),
) -> GuardConfig:
    """Guard every request to ``app`` and mark every answer (call before adding routes:
    the guard's answers then appear in every route's OpenAPI entry). ``cookie``: the
    name of a cookie that authenticates (then writes need the own ``Origin``)."""
    config = GuardConfig(
        cookie=cookie, limits=dict(limits or {}), yaml_routes=frozenset(yaml_routes)
    )
    app.state.http_guard = config
    app.router.responses = {**GUARD_RESPONSES, **(app.router.responses or {})}
    app.add_middleware(HttpGuard, config=config)
    return config


def guard_manager(app: FastAPI, cookie: str) -> GuardConfig:
    """The manager's guard: the UI's login ``cookie``, the import routes' larger limit."""
    return install(app, cookie=cookie, limits=MANAGER_BODY_LIMITS, yaml_routes=YAML_ROUTES)


def guard_agent(app: FastAPI) -> GuardConfig:
    """The agent's guard: bearer key only, whole-host batches get the larger limit."""
    return install(app, limits=AGENT_BODY_LIMITS)


def allow_hosts(app: FastAPI, bind: str, extra: Iterable[str] = ()) -> GuardConfig:
    """Accept the Host names of a server bound to ``bind``, and ``extra`` ones."""
    config: GuardConfig = app.state.http_guard
    bind = bind.strip("[]").lower()
    if bind in WILDCARD_BINDS:
        config.any_address = True
    else:
        config.hosts.add(_canonical_host(bind))
    config.hosts.update(_canonical_host(h.strip().lower()) for h in extra if h.strip())
    return config


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server reachable from this machine only."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_warning(program: str, host: str, tls: bool = False) -> str | None:
    """The warning to print when ``program`` binds beyond loopback (None if it does not);
    ``tls``: it serves HTTPS itself."""
    if is_loopback(host):
        return None
    plain = "" if tls else "it speaks plain HTTP (put TLS in front, or --tls-cert), and "
    return (
        f"{program}: WARNING: listening on {host}, beyond this machine: anyone who can reach "
        f"it may try tokens and keys; {plain}browsers must use a name given with --allowed-host"
    )


# Parsing an address costs tens of microseconds, and a server sees few distinct Host,
# Origin and Referer values: the pure helpers below remember their answers.
_CACHE = 1024


@functools.lru_cache(maxsize=_CACHE)
def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _canonical_host(host: str) -> str:
    address = _address(host)
    return host.rstrip(".") if address is None else str(address)


# ----------------------------------------------------------------------------- refusals


class Refusal(Exception):
    """A request the guard refuses: status, error kind and the one field at fault."""

    def __init__(self, status: int, kind: str, problem: FieldError, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.problem = problem

    def body(self) -> bytes:
        return json.dumps(
            {"error": self.kind, "message": str(self), "fields": [self.problem.to_dict()]}
        ).encode()


def _refuse(status: int, kind: str, name: str, value: str | None, expected: str) -> Refusal:
    shown = "missing" if value is None else show_value(value)
    problem = FieldError(name, shown, expected)
    return Refusal(status, kind, problem, f"{name}: got {shown}; expected {expected}")


def too_large(limit: int, got: str) -> Refusal:
    return _refuse(
        413, "too_large", "body", got, f"at most {limit} bytes ({_size(limit)}) on this route"
    )


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


class BodyTooLarge(Exception):
    """Raised from the guarded ``receive`` when a body passes its limit."""


# ----------------------------------------------------------------------------- middleware


class HttpGuard:
    """The guard itself: see the module's docstring."""

    def __init__(self, app: ASGIApp, config: GuardConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        extra = security_headers(path)

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *((k, v) for k, v in extra if k not in have),
                ]
            await send(message)

        headers = _headers(scope)
        try:
            limit = self.check(scope, headers)
        except Refusal as refusal:
            await _answer(marked, refusal)
            return
        await self._guarded(scope, receive, marked, limit)

    def check(self, scope: Scope, headers: dict[str, str]) -> int:
        """Refuse what must be refused before the route runs; the body limit in bytes."""
        config = self.config
        host, _ = _split_host(headers.get("host", ""))
        if not config.host_allowed(host):
            raise _refuse(421, "misdirected", "Host", headers.get("host"), config.expected_hosts())
        path = str(scope.get("path", ""))
        limit = config.limit(path)
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            raise too_large(limit, f"{length} bytes")
        if str(scope.get("method", "GET")).upper() in UNSAFE_METHODS:
            self._same_origin(scope, headers)
            self._content_type(path, headers, length)
        return limit

    def _same_origin(self, scope: Scope, headers: dict[str, str]) -> None:
        own = _origin(str(scope.get("scheme", "http")), headers.get("host", ""))
        expected = f"{own}, this server's own origin"
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise _refuse(403, "forbidden", "Sec-Fetch-Site", site, "same-origin")
        origin = headers.get("origin")
        if origin is not None:
            if _normal_origin(origin) != own:
                raise _refuse(403, "forbidden", "Origin", origin, expected)
            return
        referer = headers.get("referer")
        if referer is not None:
            if _normal_origin(referer) != own:
                raise _refuse(403, "forbidden", "Origin", f"(Referer) {referer}", expected)
            return
        cookie = self.config.cookie
        if cookie and "authorization" not in headers and cookie in _cookies(headers):
            raise _refuse(
                403, "forbidden", "Origin", None, expected + " (the login cookie needs it)"
            )

    def _content_type(self, path: str, headers: dict[str, str], length: str | None) -> None:
        given = headers.get("content-type")
        yaml = path in self.config.yaml_routes
        expected = "application/json" + (" or application/yaml" if yaml else "")
        if given is None:
            # No form sends a body without a type; YAML text without one is read as YAML
            # (``curl --data-binary`` aside, what the docs' examples do).
            has_body = (length is not None and length != "0") or "transfer-encoding" in headers
            if has_body and not yaml:
                raise _refuse(415, "unsupported_media_type", "Content-Type", None, expected)
            return
        media = given.split(";", 1)[0].strip().lower()
        if media == "application/json" or media.endswith("+json"):
            return
        if yaml and media in YAML_TYPES:
            return
        raise _refuse(415, "unsupported_media_type", "Content-Type", given, expected)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app with a ``receive`` that stops at ``limit`` bytes; past it, the app's
        own answer (whatever its error handling made of the exception) becomes the 413."""
        seen = 0
        over = False
        started = False

        async def bounded() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise BodyTooLarge
            return message

        async def replace(message: Message) -> None:
            nonlocal started
            if over:
                if not started:
                    started = True
                    await _answer(send, too_large(limit, f"more than {limit} bytes"))
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded, replace)
        except BodyTooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over and not started:
            await _answer(send, too_large(limit, f"more than {limit} bytes"))


async def _answer(send: Send, refusal: Refusal) -> None:
    body = refusal.body()
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the first of repeated ones)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


@functools.lru_cache(maxsize=_CACHE)
def _split_host(value: str) -> tuple[str, str]:
    """``(host, port)`` of a Host header value; the host lower case, canonical if an address."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host, rest = (value[1:end], value[end + 1 :]) if end > 0 else (value, "")
        return _canonical_host(host), rest.lstrip(":")
    if value.count(":") == 1:
        host, port = value.split(":")
        return _canonical_host(host), port
    return _canonical_host(value), ""


@functools.lru_cache(maxsize=_CACHE)
def _origin(scheme: str, host_header: str) -> str:
    host, port = _split_host(host_header)
    default = {"http": "80", "https": "443"}.get(scheme, "")
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" + (f":{port}" if port and port != default else "")


@functools.lru_cache(maxsize=_CACHE)
def _normal_origin(url: str) -> str:
    """The origin of ``url`` (an Origin or Referer value) as :func:`_origin` writes it."""
    try:
        parts = urlsplit(url.strip())
        netloc = parts.netloc.rsplit("@", 1)[-1]
    except ValueError:
        return ""
    if not parts.scheme or not netloc:
        return ""
    return _origin(parts.scheme.lower(), netloc)


def _cookies(headers: dict[str, str]) -> set[str]:
    """The names of the request's cookies."""
    parts = headers.get("cookie", "").split(";")
    return {part.split("=", 1)[0].strip() for part in parts if part.strip()}
