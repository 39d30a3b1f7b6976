"""`vnic bench api`: the control plane's speed, through real HTTP.

- ``explain`` and profile-list latency with 1000 VM records and 100 profiles
  (SQLite file, a real uvicorn server on localhost, httpx as the client);
- 100 concurrent launch requests against the netns driver (root), per-launch
  latency and errors;
- ``/metrics`` with 1000 vNICs: rendering of 1000 samples, and a real scrape
  of the vNICs launched above.
"""

from __future__ import annotations

import concurrent.futures
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

from vnic.drivers.registry import get_driver
from vnic.lab.bench.metrics import render_benchmark
from vnic.lab.stats import quantile
from vnic.manager.auth import Tokens
from vnic.manager.results import VmRequest
from vnic.manager.service import Service
from vnic.model.profile import parse_profile_document
from vnic.store.db import Database


def _ms(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {
        "p50_ms": round(quantile(ms, 0.5), 2),
        "p99_ms": round(quantile(ms, 0.99), 2),
        "max_ms": round(ms[-1], 2),
        "n": len(ms),
    }


@contextmanager
def _server(
    work: Path, database: str, *args: str, info: dict[str, int] | None = None
) -> Iterator[str]:
    """``vnic serve`` on ``database`` as its own process (as deployed: the client's
    work does not share its interpreter), on a free localhost port; ``info`` gets its
    ``pid``."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VNIC_HOME": str(work), "VNIC_DATABASE_URL": database}
    log = open(work / f"serve-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "vnic.cli.app", "serve", "--port", str(port), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    if info is not None:
        info["pid"] = proc.pid
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / f"serve-{port}.log").read_text())
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _timed(client: httpx.Client, path: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        r = client.get(path)
        out.append(time.perf_counter() - start)
        r.raise_for_status()
    return out


def records(work: Path, vms: int = 1000, profiles: int = 100, repeats: int = 200) -> dict[str, Any]:
    """explain and profile list through HTTP on ``vms`` VM records and ``profiles`` profiles."""
    (work / "records").mkdir()
    db = Database(f"sqlite:///{work / 'records.db'}")
    svc = Service(db)
    svc.apply_profiles(
        [
            parse_profile_document(
                {"name": f"p{i}", "egress": {"rate": f"{i + 1}Mbit"}, "ingress": {"delay": "1ms"}}
            )
            for i in range(profiles)
        ]
    )
    per_session = 200
    for s in range((vms + per_session - 1) // per_session):
        svc.create_session(f"s{s}", default_profile=f"p{s}")
        for i in range(min(per_session, vms - s * per_session)):
            svc.add_vm(VmRequest(f"s{s}", f"vm{i}", profile=f"p{i % profiles}"))
    _, secret = Tokens(db).create("bench", "reader")
    with (
        _server(work / "records", db.url, "--driver", "fake") as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}) as client,
    ):
        paths = [f"/v1/sessions/s{i % 5}/vms/vm{(i * 37) % 200}/explain" for i in range(repeats)]
        explain: list[float] = []
        for path in paths:
            explain += _timed(client, path, 1)
        listing = _timed(client, "/v1/profiles", max(20, repeats // 10))
    db.dispose()
    return {
        "vms": vms,
        "profiles": profiles,
        "explain": _ms(explain),
        "profile_list": _ms(listing),
        "targets": {"explain_p99_ms": 20, "profile_list_ms": 50},
    }


def launches(work: Path, count: int = 100) -> dict[str, Any]:
    """``count`` launch requests at once against the netns driver (needs root)."""
    (work / "launch").mkdir()
    db = Database(f"sqlite:///{work / 'launch.db'}")
    svc = Service(db)
    svc.apply_profiles([parse_profile_document({"name": "b", "egress": {"rate": "100Mbit"}})])
    session = f"bench{int(time.time()) % 100000}"
    svc.create_session(session, default_profile="b")
    for i in range(count):
        svc.add_vm(VmRequest(session, f"vm{i}"))
    _, secret = Tokens(db).create("bench", "admin")
    errors: list[str] = []
    try:
        with (
            # It measures launches side by side: let them all in (admission has its bench).
            _server(
                work / "launch", db.url, "--max-writes", str(count), "--queue-wait", "60"
            ) as url,
            httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=600
            ) as client,
        ):

            def launch(i: int) -> float:
                start = time.perf_counter()
                r = client.post(f"/v1/sessions/{session}/vms/vm{i}/launch")
                if r.status_code != 200:
                    errors.append(f"vm{i}: {r.status_code} {r.text[:200]}")
                return time.perf_counter() - start

            wall = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                times = list(pool.map(launch, range(count)))
            wall = time.perf_counter() - wall
            scrape = _timed(client, "/metrics", 10)
            down = client.post(f"/v1/sessions/{session}/down")
            down.raise_for_status()
    finally:
        get_driver("netns").teardown_session(session)  # whatever a failure left
        db.dispose()
    return {
        "concurrent_requests": count,
        "errors": errors,
        "wall_seconds": round(wall, 2),
        "per_launch": _ms(times),
        "metrics_scrape": {"vnics": count, **_ms(scrape)},
    }


def run(*, launch: bool = True, quick: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vnic-bench-api-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {
            "records": records(work, repeats=50 if quick else 200),
            "metrics_render": render_benchmark(),
        }
        if launch:
            result["launch"] = launches(work, 20 if quick else 100)
    return result


# ----------------------------------------------------------------------------- load


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


#: A separate process that times GET /v1/health (no admission) every 0.2 s: how long the
#: server takes to answer at all, apart from the load client's own scheduling.
_PROBE = """
import http.client, json, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    start = time.perf_counter()
    try:
        c = http.client.HTTPConnection(host, port, timeout=60)
        c.request("GET", "/v1/health")
        c.getresponse().read()
        c.close()
        out.append(time.perf_counter() - start)
    except OSError:
        out.append(-1.0)
    time.sleep(0.2)
print(json.dumps(out))
"""


class _Http1:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams, one connection each.

    httpx's pool serializes its bookkeeping across connections: with 220 callers
    at once the client, not the server, was the bottleneck it then measured.
    """

    def __init__(self, reader: Any, writer: Any, host: str, token: str) -> None:
        self.reader, self.writer, self.host, self.token = reader, writer, host, token

    @classmethod
    async def open(cls, url: str, token: str) -> _Http1:
        import asyncio
        from urllib.parse import urlsplit

        where = urlsplit(url)
        reader, writer = await asyncio.open_connection(where.hostname, where.port)
        return cls(reader, writer, f"{where.hostname}:{where.port}", token)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str]]:
        """Send, read the whole answer; its status and headers (lower-case names)."""
        payload = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Length: {len(payload)}\r\n"
            + ("Content-Type: application/json\r\n" if body is not None else "")
            + "\r\n"
        )
        self.writer.write(head.encode() + payload)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if length:
            await self.reader.readexactly(length)
        return status, headers

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


def load(
    work: Path,
    *,
    readers: int = 200,
    writers: int = 20,
    seconds: float = 30.0,
    sessions: int = 2,
    vms: int = 5,
    serve_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``readers`` + ``writers`` clients for ``seconds`` against ``vnic serve`` on
    127.0.0.1 with ``sessions`` × ``vms`` running netns VMs (root).

    Readers cycle through the VM list, one VM, its explanation and the profile
    list; writers PATCH a VM's override (a live change of its tc classes), each on
    its own VM in turn. Every client sends its next request when the last one is
    answered, so the load is closed-loop: what the server refuses comes back at
    once. Reported: p50/p99 per kind (of the 2xx answers, and of all), counts by
    status (``error:<Type>`` for a request that got no answer), and the server's
    RSS before and after.
    """
    import asyncio

    (work / "load").mkdir()
    db = Database(f"sqlite:///{work / 'load.db'}")
    svc = Service(db)
    svc.apply_profiles([parse_profile_document({"name": "lb", "egress": {"rate": "50Mbit"}})])
    stamp = int(time.time()) % 100000
    names = [f"ld{stamp}s{i}" for i in range(sessions)]
    for name in names:
        svc.create_session(name, default_profile="lb")
        for i in range(vms):
            svc.add_vm(VmRequest(name, f"vm{i}"))
    _, admin = Tokens(db).create("bench-admin", "admin")
    _, reader = Tokens(db).create("bench-reader", "reader")
    targets = [(s, f"vm{i}") for s in names for i in range(vms)]
    info: dict[str, int] = {}
    samples: dict[str, list[tuple[int | str, float]]] = {"read": [], "write": []}
    try:
        with _server(work / "load", db.url, *serve_args, info=info) as url:
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=600
            ) as setup:
                for s, vm in targets:
                    setup.post(f"/v1/sessions/{s}/vms/{vm}/launch").raise_for_status()
                for _ in range(3):  # warm: routes, caches, connections
                    setup.get("/v1/profiles").raise_for_status()
            rss_before = _rss_kib(info["pid"])

            async def client(kind: str, n: int, end: float) -> None:
                token = reader if kind == "read" else admin
                conn: _Http1 | None = None
                i = n  # this client's step: which VM, which read
                while time.monotonic() < end:
                    i += 1
                    s, vm = targets[i % len(targets)]
                    start = time.perf_counter()
                    status: int | str
                    retry = 1.0
                    try:
                        if conn is None:
                            conn = await _Http1.open(url, token)
                        if kind == "read":
                            path = (
                                f"/v1/sessions/{s}/vms",
                                f"/v1/sessions/{s}/vms/{vm}",
                                f"/v1/sessions/{s}/vms/{vm}/explain",
                                "/v1/profiles",
                            )[i % 4]
                            status, headers = await conn.request("GET", path)
                        else:
                            body = {"patch": {"egress": {"rate": f"{10 + (i % 7)}Mbit"}}}
                            status, headers = await conn.request(
                                "PATCH", f"/v1/sessions/{s}/vms/{vm}", body
                            )
                        retry = float(headers.get("retry-after", "1"))
                        if headers.get("connection") == "close":
                            await conn.close()
                            conn = None
                    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                        status = f"error:{type(exc).__name__}"
                        if conn is not None:
                            await conn.close()
                        conn = None
                    samples[kind].append((status, time.perf_counter() - start))
                    if status == 429:  # as a client should: wait Retry-After
                        await asyncio.sleep(min(retry, max(0.0, end - time.monotonic())))
                if conn is not None:
                    await conn.close()

            async def everyone() -> None:
                end = time.monotonic() + seconds
                await asyncio.gather(
                    *(client("read", n, end) for n in range(readers)),
                    *(client("write", n, end) for n in range(writers)),
                )

            import subprocess
            import sys
            from urllib.parse import urlsplit

            where = urlsplit(url)
            probe = subprocess.Popen(
                [sys.executable, "-c", _PROBE, str(where.hostname), str(where.port), str(seconds)],
                stdout=subprocess.PIPE,
            )
            wall = time.perf_counter()
            asyncio.run(everyone())
            wall = time.perf_counter() - wall
            probe_out, _ = probe.communicate(timeout=seconds + 120)
            health = [float(t) for t in json.loads(probe_out or b"[]")]
            rss_after = _rss_kib(info["pid"])
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=600
            ) as setup:
                for name in names:
                    setup.post(f"/v1/sessions/{name}/down").raise_for_status()
    finally:
        for name in names:
            get_driver("netns").teardown_session(name)  # whatever a failure left
        db.dispose()

    def kind_report(rows: list[tuple[int | str, float]]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for status, _ in rows:
            counts[str(status)] = counts.get(str(status), 0) + 1
        ok = [t for status, t in rows if isinstance(status, int) and 200 <= status < 300]
        answered = [t for status, t in rows if isinstance(status, int)]
        refused = [t for status, t in rows if status == 429]
        return {
            "by_status": dict(sorted(counts.items())),
            "ok": _ms(ok) if ok else None,
            "all_answered": _ms(answered) if answered else None,
            "refused_429": _ms(refused) if refused else None,
            "per_second_ok": round(len(ok) / wall, 1),
        }

    reads, writes = kind_report(samples["read"]), kind_report(samples["write"])
    bad = {
        status: n
        for rep in (reads, writes)
        for status, n in rep["by_status"].items()
        if status != "429" and not status.startswith("2")
    }
    return {
        "readers": readers,
        "writers": writers,
        "seconds": seconds,
        "vms": len(targets),
        "sessions": names,
        "serve_args": list(serve_args),
        "wall_seconds": round(wall, 2),
        "read": reads,
        "write": writes,
        "errors_other_than_429": bad,
        "rss_kib": {"before": rss_before, "after": rss_after},
        "health_probe": {
            **(_ms([t for t in health if t >= 0]) if any(t >= 0 for t in health) else {}),
            "failed": sum(1 for t in health if t < 0),
        },
        "targets": {"read_p99_ms": 1000, "errors_other_than_429": 0},
    }


def run_load(**kw: Any) -> dict[str, Any]:
    """:func:`load` in a temporary directory of its own."""
    with tempfile.TemporaryDirectory(prefix="vnic-bench-load-") as tmp:
        return load(Path(tmp), **kw)
