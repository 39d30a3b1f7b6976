"""The flags of ``vnic agent --manager``, checked together before anything is touched: every
bad one is named with its value and what it takes (one error listing them all)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vnic.errors import FieldError, InvalidInput, show_value
from vnic.model.placement import HOST_NAME, HOST_NAME_EXPECTED, LABEL_KEY, LABEL_VALUE, MAX_LABELS

if TYPE_CHECKING:
    from vnic.agent.metrics_http import MetricsServer
    from vnic.agent.upstream import HostInfo, HttpSource

#: vNICs a host offers when ``--vnics`` is not given.
VNICS_DEFAULT = 64
#: A name in ``--metrics-listen HOST:PORT`` (DNS-label-like).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: Bytes: the longest host token read (a token is a line, not a file's worth).
TOKEN_MAX = 4096
#: Replicas ``--manager`` may list (as :data:`vnic.agent.upstream.MAX_REPLICAS`; that
#: module is not imported before a command needs it).
MAX_REPLICAS = 8


@dataclass(frozen=True)
class FollowFlags:
    """The checked flags: the manager, the host's token and what the host registers."""

    manager: tuple[str, ...]
    token: str
    host: str
    underlay: str
    vnics: int
    cpus: int
    labels: dict[str, str] = field(default_factory=dict)
    ca: Path | None = None
    metrics: tuple[str, int] | None = None

    def bind_metrics(
        self,
        text: Callable[[], str],
        stats: Callable[[str], list[dict[str, Any]]] | None = None,
    ) -> MetricsServer | None:
        """The ``GET /metrics`` (and ``/stats``) server, bound (not yet serving), if one
        was asked for."""
        if self.metrics is None:
            return None
        from vnic.agent.metrics_http import MetricsServer

        return MetricsServer(text, *self.metrics, stats=stats)

    def info(self, metrics: MetricsServer | None) -> HostInfo:
        """What the host registers; its metrics URL on the port ``metrics`` got, at the
        address it listens on (the underlay address when it listens on all)."""
        from vnic.agent.upstream import HostInfo

        url = None
        if metrics is not None and self.metrics is not None:
            where = self.metrics[0].strip("[]")
            if where in ("", "0.0.0.0", "::"):
                where = self.underlay
            shown = f"[{where}]" if ":" in where else where
            url = f"http://{shown}:{metrics.port}/metrics"
        return HostInfo(self.host, self.underlay, self.vnics, self.cpus, self.labels, url)

    def source(self) -> HttpSource:
        from vnic.agent.upstream import HttpSource

        return HttpSource(self.manager, self.token, ca_file=self.ca)


def follow_flags(
    manager: str,
    token_file: Path | None,
    host: str | None,
    underlay: str | None,
    vnics: int | None,
    cpus: int | None,
    labels: Sequence[str],
    ca: Path | None,
    metrics_listen: str | None,
) -> FollowFlags:
    """Check every flag; InvalidInput naming each bad one (flag, value, what it takes)."""
    errors: list[FieldError] = []

    def bad(flag: str, value: object, expected: str) -> None:
        errors.append(FieldError(flag, show_value(value), expected))

    urls = tuple(u.strip() for u in manager.split(",")) if len(manager) <= 2000 else ()
    if not urls or len(urls) > MAX_REPLICAS:
        bad("--manager", manager, f"URL[,URL...]: 1 to {MAX_REPLICAS} replicas' URLs")
    for url in urls:
        if not url.startswith(("https://", "http://")):
            bad("--manager", url, "an https:// or http:// URL (replicas: comma-separated)")
        elif ca is not None and not url.startswith("https://"):
            bad("--ca", str(ca), f"a CA for an https:// --manager ({url} is plain HTTP)")
    token = ""
    if token_file is None:
        bad("--host-token-file", None, "the file holding this host's token (required)")
    else:
        try:
            with open(token_file, "rb") as f:
                token = f.read(TOKEN_MAX + 1).decode("ascii", "replace").strip()
        except OSError as exc:
            bad("--host-token-file", str(token_file), f"a readable file ({exc.strerror})")
        else:
            if not token or len(token) > TOKEN_MAX or any(c.isspace() for c in token):
                bad("--host-token-file", str(token_file), "a file holding one token, one line")
    # The host's name and labels by the manager's own rules (vnic.model.placement): a
    # name or label the manager refuses would only fail at registration, retried forever.
    name = host or ""
    if not HOST_NAME.fullmatch(name):
        bad("--host", host, f"this host's name as it was added: {HOST_NAME_EXPECTED}")
    try:
        address = str(ipaddress.ip_address(underlay or ""))
    except ValueError:
        address = ""
        bad("--underlay", underlay, "this host's underlay IPv4 or IPv6 address")
    if vnics is not None and vnics < 1:
        bad("--vnics", vnics, "a count of vNICs >= 1")
    if cpus is not None and cpus < 1:
        bad("--cpus", cpus, "a count of CPUs >= 1")
    parsed: dict[str, str] = {}
    for text in labels:
        key, eq, value = text.partition("=")
        if not eq or not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
            bad(
                "--label",
                text,
                "KEY=VALUE (key: a-z, 0-9, '_.-', 1 to 63; value: letters, digits, '_.:/-', "
                "0 to 64)",
            )
        elif key in parsed:
            bad("--label", text, f"one value per key ({key} is given twice)")
        else:
            parsed[key] = value
    if len(parsed) > MAX_LABELS:
        bad("--label", f"{len(parsed)} labels", f"at most {MAX_LABELS} labels")
    if ca is not None and not os.access(ca, os.R_OK):
        bad("--ca", str(ca), "a readable CA bundle (PEM)")
    metrics = None
    if metrics_listen is not None:
        metrics = _listen(metrics_listen)
        if metrics is None:
            bad("--metrics-listen", metrics_listen, "HOST:PORT (port 0 to 65535; [v6]:PORT)")
    if errors:
        raise InvalidInput(errors)
    return FollowFlags(
        manager=urls,
        token=token,
        host=name,
        underlay=address,
        vnics=vnics if vnics is not None else VNICS_DEFAULT,
        cpus=cpus if cpus is not None else (os.cpu_count() or 1),
        labels=parsed,
        ca=ca,
        metrics=metrics,
    )


def _listen(text: str) -> tuple[str, int] | None:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        return None
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        host = host[1:-1]
    elif ":" in host:
        return None  # an IPv6 address without brackets: its port would be ambiguous
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not NAME.fullmatch(host):
            return None
    return host, int(port)
