"""The profiles pages' endpoints on the in-memory driver: YAML import read by the CLI's
code (same documents, same errors, all or nothing, admin only) and the YAML export
that imports again unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.unit.api_fixtures import Api, make_api
from vnic.errors import InvalidInput
from vnic.model.documents import parse_documents, read_documents

ROOT = Path(__file__).resolve().parents[2]
TWO = "name: dsl\negress: {rate: 8Mbit}\n---\n- {name: lte, ingress: {delay: 40ms}}\n"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path)


def names(api: Api) -> list[str]:
    return [p["name"] for p in api.call("reader", "GET", "/v1/profiles").json()]


def test_yaml_import_creates_then_keeps_unchanged_profiles(api: Api) -> None:
    r = api.call("admin", "POST", "/v1/import/profiles/yaml", content=TWO)
    assert r.status_code == 200, r.text
    assert [(p["name"], p["action"], p["revision"]) for p in r.json()] == [
        ("dsl", "created", 1),
        ("lte", "created", 1),
    ]
    again = api.call("admin", "POST", "/v1/import/profiles/yaml", content=TWO).json()
    assert [p["action"] for p in again] == ["unchanged", "unchanged"]


def test_yaml_import_refuses_like_the_cli_and_stores_nothing(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "name: ok\negress: {rate: 1Mbit}\n---\nname: bad\negress: {burst: 1kB, rate: 1Mbit}\n"
    r = api.call("admin", "POST", "/v1/import/profiles/yaml", content=text)
    assert r.status_code == 422
    body = r.json()
    assert body["fields"] == [
        {"field": "egress.burst", "value": "1kB", "expected": "at least the MTU 1500B"}
    ]
    assert "(profile 'bad')" in body["message"]
    monkeypatch.chdir(tmp_path)
    Path("upload").write_text(text)  # what `vnic profile apply -f upload` says
    with pytest.raises(InvalidInput) as cli:
        parse_documents(read_documents(["upload"]))
    assert str(cli.value) == body["message"]
    assert names(api) == []
    broken = api.call("admin", "POST", "/v1/import/profiles/yaml", content="name: [")
    assert broken.status_code == 422 and broken.json()["fields"][0]["field"] == "file"
    empty = api.call("admin", "POST", "/v1/import/profiles/yaml", content="")
    assert empty.status_code == 422


def test_yaml_import_is_for_admins(api: Api) -> None:
    for who in ("reader", "alice"):
        r = api.call(who, "POST", "/v1/import/profiles/yaml", content=TWO)
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert names(api) == []


def test_yaml_export_imports_again_unchanged(api: Api) -> None:
    examples = ROOT / "examples" / "profiles"
    for file in sorted(examples.glob("*.y*ml")):
        r = api.call("admin", "POST", "/v1/import/profiles/yaml", content=file.read_text())
        assert r.status_code == 200, r.text
    one = api.call("reader", "GET", "/v1/export/profiles.yaml", params={"name": "lan"})
    assert one.status_code == 200 and one.headers["content-type"] == "application/yaml"
    assert 'filename="lan.yaml"' in one.headers["content-disposition"]
    assert yaml.safe_load(one.text)["name"] == "lan"
    every = api.call("reader", "GET", "/v1/export/profiles.yaml")
    again = api.call("admin", "POST", "/v1/import/profiles/yaml", content=every.text).json()
    assert {p["action"] for p in again} == {"unchanged"}
    missing = api.call("reader", "GET", "/v1/export/profiles.yaml", params={"name": "nope"})
    assert missing.status_code == 404
