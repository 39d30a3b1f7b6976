"""Admission (reads and writes in flight, 429 + Retry-After) and the last-resort error body.

The lanes are driven through a small ASGI app whose handlers block until the test
releases them, so "in flight" is a fact the test controls, not a timing guess.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.unit.api_fixtures import Api, make_api
from vnic.edge.admission import Admission, LastResort, Limits
from vnic.errors import InvalidInput, NoSpace, storage_error

DEADLINE = 10.0  # seconds any wait in these tests may take before it fails


def blocking_app(limits: Limits) -> tuple[Starlette, asyncio.Event, dict[str, int]]:
    """/work answers when ``release`` is set; ``started`` counts handlers entered."""
    release = asyncio.Event()
    started = {"GET": 0, "POST": 0}

    async def work(request: Request) -> JSONResponse:
        started[request.method] += 1
        await release.wait()
        return JSONResponse({"ok": True})

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/work", work, methods=["GET", "POST"]),
            Route("/v1/health", health),
        ]
    )
    app.add_middleware(Admission, limits=limits)
    return app, release, started


async def until(check: Callable[[], bool]) -> None:
    """Poll ``check`` until true, failing past DEADLINE."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not check():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), DEADLINE * 3))


def test_writes_past_their_limit_get_429_and_reads_still_pass() -> None:
    async def scenario() -> None:
        app, release, started = blocking_app(Limits(max_reads=2, max_writes=1, queue=0))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            writer = asyncio.create_task(c.post("/work"))
            await until(lambda: started["POST"] == 1)
            refused = await c.post("/work")  # the write slot is taken, no queue
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            body = refused.json()
            assert body["error"] == "busy" and "writes" in body["message"]
            # Reads have their own slots: two go in while the writer holds its one.
            readers = [asyncio.create_task(c.get("/work")) for _ in range(2)]
            await until(lambda: started["GET"] == 2)
            third = await c.get("/work")
            assert third.status_code == 429 and "reads" in third.json()["message"]
            assert (await c.get("/v1/health")).status_code == 200  # never admitted
            release.set()
            answers = await asyncio.gather(writer, *readers)
            assert [r.status_code for r in answers] == [200, 200, 200]
            assert started == {"GET": 2, "POST": 1}  # the refused never ran

    run(scenario)


def test_a_waiting_request_gets_the_slot_freed_before_its_wait_ends() -> None:
    async def scenario() -> None:
        app, release, started = blocking_app(Limits(max_writes=1, queue=4, wait=30))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = asyncio.create_task(c.post("/work"))
            await until(lambda: started["POST"] == 1)
            second = asyncio.create_task(c.post("/work"))
            await asyncio.sleep(0)  # let it queue; it must not start while the first runs
            assert started["POST"] == 1
            release.set()
            assert (await first).status_code == 200
            assert (await second).status_code == 200
            assert started["POST"] == 2

    run(scenario)


def test_a_waiter_past_its_wait_is_refused_and_leaves_the_queue() -> None:
    async def scenario() -> None:
        limits = Limits(max_writes=1, queue=1, wait=0.05)
        app, release, started = blocking_app(limits)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = asyncio.create_task(c.post("/work"))
            await until(lambda: started["POST"] == 1)
            for _ in range(3):  # each waits its 50 ms, gives up, frees its queue place
                r = await c.post("/work")
                assert r.status_code == 429, r.text
            release.set()
            assert (await first).status_code == 200
            assert (await c.post("/work")).status_code == 200  # nothing stuck in the lane
            assert started["POST"] == 2

    run(scenario)


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("max_reads", 0, "--max-reads"),
        ("max_writes", -1, "--max-writes"),
        ("queue", 1.5, "--queue"),
        ("wait", float("nan"), "--queue-wait"),
        ("wait", 61, "--queue-wait"),
    ],
)
def test_bad_limits_name_the_option(field: str, value: Any, option: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        Limits(**{field: value})
    assert caught.value.paths == [option]


def test_full_disk_is_recognised_through_wrapping() -> None:
    import sqlalchemy.exc

    os_full = OSError(errno.ENOSPC, "No space left on device", "/x/desired.json")
    found = storage_error(os_full)
    assert isinstance(found, NoSpace) and "/x/desired.json" in str(found)
    wrapped = sqlalchemy.exc.OperationalError(
        "INSERT", {}, sqlite3.OperationalError("database or disk is full")
    )
    try:
        raise wrapped from wrapped.orig
    except sqlalchemy.exc.OperationalError as exc:
        found = storage_error(exc, "/x/vnic.db")
    assert found is not None and "/x/vnic.db" in str(found) and "no space left" in str(found)
    assert storage_error(OSError(errno.EACCES, "Permission denied", "/x")) is None
    assert storage_error(ValueError("no")) is None


# ----------------------------------------------------------------------------- last resort


@pytest.fixture
def api(tmp_path: Path) -> Any:
    yield from make_api(tmp_path)


def test_an_unexpected_error_leaves_as_the_json_body_and_is_logged_once(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> list[Any]:
        raise RuntimeError("secret internals /etc/vnic")

    monkeypatch.setattr(api.manager.service, "list_profiles", broken)
    with caplog.at_level(logging.ERROR, logger="vnic.manager"):
        r = api.call("reader", "GET", "/v1/profiles")
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal"
    assert "secret" not in body["message"]  # the caller learns a reference, not internals
    ref = body["message"].split()[2].rstrip(":")
    logged = [rec for rec in caplog.records if ref in rec.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "RuntimeError" in caplog.text
    assert api.call("reader", "GET", "/v1/sessions").status_code == 200  # still serving


def test_a_full_disk_answers_507_naming_the_file(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_: Any, **__: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", "/srv/vnic/agent/desired.json")

    monkeypatch.setattr(api.manager.service, "list_sessions", full)
    r = api.call("reader", "GET", "/v1/sessions")
    assert r.status_code == 507
    assert r.json()["error"] == "no_space"
    assert "/srv/vnic/agent/desired.json" in r.json()["message"]


def test_last_resort_after_the_response_started_only_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def half(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("mid-stream")

    async def scenario() -> None:
        sent: list[dict[str, Any]] = []

        async def send(message: Any) -> None:
            sent.append(message)

        async def receive() -> Any:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
        with caplog.at_level(logging.ERROR, logger="vnic.manager"):
            await LastResort(half)(scope, receive, send)
        assert [m["type"] for m in sent] == ["http.response.start"]  # no second start

    run(scenario)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_live_streams_have_their_own_lane_and_a_profile_named_live_is_a_read() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        started: list[str] = []

        async def hold(request: Request) -> JSONResponse:
            started.append(request.url.path)
            await release.wait()
            return JSONResponse({})

        app = Starlette(
            routes=[
                Route("/v1/sessions/{s}/live", hold),
                Route("/v1/profiles/{name}", hold),
            ]
        )
        app.add_middleware(Admission, limits=Limits(max_reads=1, max_streams=1, queue=0))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            stream = asyncio.create_task(c.get("/v1/sessions/a/live"))
            await until(lambda: len(started) == 1)
            second = await c.get("/v1/sessions/b/live")  # the one stream slot is taken
            assert second.status_code == 429 and "streams" in second.json()["message"]
            read = asyncio.create_task(c.get("/v1/profiles/live"))  # a read: its own slot
            await until(lambda: len(started) == 2)
            again = await c.get("/v1/profiles/other")
            assert again.status_code == 429 and "reads" in again.json()["message"]
            release.set()
            assert [(await t).status_code for t in (stream, read)] == [200, 200]

    run(scenario)


async def _call(app: Any, method: str, receive: Any) -> list[dict[str, Any]]:
    """Send one request to ``app`` through raw ASGI; the messages it answered with."""
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": "/work",
        "raw_path": b"/work",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
        "root_path": "",
    }
    await app(scope, receive, send)
    return sent


def test_a_write_whose_body_never_arrives_holds_no_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """An anonymous POST that stops sending its body must not keep the one write slot
    (which the login needs too): its body is read before it takes the slot, and it gets
    408 when the body's deadline passes."""
    import vnic.edge.admission as adm

    app, release, started = blocking_app(Limits(max_writes=1, queue=0, wait=0))
    release.set()
    stalled = asyncio.Event()  # never set: a client that sent a head and went quiet

    async def silent() -> dict[str, Any]:
        await stalled.wait()
        return {"type": "http.disconnect"}

    async def whole() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def go() -> None:
        slow = asyncio.create_task(_call(app, "POST", silent))
        await asyncio.sleep(0)  # let it start reading
        for _ in range(3):
            answer = await _call(app, "POST", whole)
            assert answer[0]["status"] == 200, answer
        assert started["POST"] == 3 and not slow.done()
        slow.cancel()
        monkeypatch.setattr(adm, "BODY_DEADLINE_S", 0.05)
        answer = await _call(app, "POST", silent)
        assert answer[0]["status"] == 408, answer
        assert b'"field":"body"' in answer[1]["body"]

    run(go)


def test_a_client_gone_before_its_body_gets_no_answer_and_no_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, release, started = blocking_app(Limits())
    release.set()
    outer = LastResort(app)

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def go() -> None:
        with caplog.at_level(logging.WARNING, logger="vnic.manager"):
            assert await _call(outer, "POST", gone) == []
        assert started["POST"] == 0 and not caplog.records

    run(go)


def test_the_client_waits_out_429s_as_retry_after_says() -> None:
    """A 429 is refused before anything ran: ``vnic --server`` asks again after each
    ``Retry-After`` within its budget, then reports the manager busy (exit 3)."""
    from vnic.agent.client import call
    from vnic.errors import Busy

    answers = iter([429, 429, 200])
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content.decode())
        status = next(answers)
        body = {"ok": True} if status == 200 else {"error": "busy", "message": "busy"}
        return httpx.Response(status, json=body, headers={"Retry-After": "0"})

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://127.0.0.1")
    got = call(http, "manager", "POST", "/v1/x", busy_budget=30, json={"a": 1})
    assert got.json() == {"ok": True} and seen == ['{"a":1}'] * 3

    always = httpx.Client(
        transport=httpx.MockTransport(
            lambda _r: httpx.Response(429, json={"error": "busy", "message": "too many"})
        ),
        base_url="http://127.0.0.1",
    )
    with pytest.raises(Busy):
        call(always, "manager", "GET", "/v1/x")  # no budget: the first 429 is the answer
