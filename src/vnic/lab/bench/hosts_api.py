"""The API calls of ``vnic bench hosts``, made from inside the host bed's manager host
(the only place the manager's address is reached: the underlay joins nothing else).

``python -m vnic.lab.bench.hosts_api`` reads one JSON document on stdin: ``url``,
``token``, ``ca`` (a PEM file), ``parallel`` (calls at once, default 4) and ``calls``
(each ``{"method", "path", "json"}``); it writes on stdout, per call in order,
``{"t0", "t1", "status", "error"}``: wall-clock seconds (``time.time()``, comparable with
the database's timestamps on this machine) just before the request and after its answer,
the HTTP status (0: no answer) and the answer's text when it is not 2xx (at most 500
characters). Each call may take up to ``timeout`` seconds (default 120); a 429 (the
manager's admission: too many writes in flight) is tried again after its
``Retry-After``, up to :data:`RETRIES` times.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

#: Times one call is tried while the manager answers 429.
RETRIES = 60


def call_all(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Make ``doc``'s calls, ``parallel`` at once; one result per call, in order."""
    client = httpx.Client(
        base_url=doc["url"],
        verify=doc.get("ca") or True,
        timeout=float(doc.get("timeout", 120)),
        headers={"Authorization": f"Bearer {doc['token']}"},
    )

    def one(c: dict[str, Any]) -> dict[str, Any]:
        t0 = time.time()
        try:
            for _ in range(RETRIES):
                answer = client.request(c["method"], c["path"], json=c.get("json"))
                if answer.status_code != 429:
                    break
                # Admission said busy: wait as it asks, then again (t0 stays the first try).
                time.sleep(float(answer.headers.get("Retry-After", "1")))
        except httpx.HTTPError as exc:
            return {"t0": t0, "t1": time.time(), "status": 0, "error": str(exc)[:500]}
        error = None if answer.is_success else answer.text[:500]
        return {"t0": t0, "t1": time.time(), "status": answer.status_code, "error": error}

    with client, ThreadPoolExecutor(max(1, int(doc.get("parallel", 4)))) as pool:
        return list(pool.map(one, doc["calls"]))


def main() -> None:
    print(json.dumps(call_all(json.load(sys.stdin))))


if __name__ == "__main__":
    main()
