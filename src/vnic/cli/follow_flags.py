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

if TYPE_CHECKING:
    from vnic.agent.metrics_http import MetricsServer
    from vnic.agent.upstream import HostInfo, HttpSource

#: vNICs a host offers when ``--vnics`` is not given.
VNICS_DEFAULT = 64
#: A host's name, a label's key and its value (DNS-label-like, as placement shows them).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
LABEL_VALUE = re.compile(r"[A-Za-z0-9._-]{0,63}")
#: Bytes: the longest host token read (a token is a line, not a file's worth).
TOKEN_MAX = 4096


@dataclass(frozen=True)
class FollowFlags:
    """The checked flags: the manager, the host's token and what the host registers."""

    manager: str
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

    if not manager.startswith(("https://", "http://")) or len(manager) > 2000:
        bad("--manager", manager, "an https:// or http:// URL")
    elif ca is not None and not manager.startswith("https://"):
        bad("--ca", str(ca), "a CA for an https:// --manager (this one is plain HTTP)")
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
    name = host or ""
    if not NAME.fullmatch(name):
        bad("--host", host, "this host's name: letters, digits, '.', '_', '-' (1 to 63)")
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
            bad("--label", text, "KEY=VALUE (key: letters, digits, '._/-'; value: '._-' too)")
        elif key in parsed:
            bad("--label", text, f"one value per key ({key} is given twice)")
        else:
            parsed[key] = value
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
        manager=manager,
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
