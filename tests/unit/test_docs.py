"""The docs and examples stay true to the code."""

from __future__ import annotations

from pathlib import Path

import yaml

from vnic.model.documents import Document, parse_documents, read_documents
from vnic.model.fields import FIELDS

ROOT = Path(__file__).resolve().parents[2]


def test_every_profile_field_is_documented() -> None:
    text = (ROOT / "docs" / "profiles.md").read_text()
    missing = [path for path in FIELDS if f"`{path}`" not in text]
    assert missing == []


def test_the_issue_example_in_the_docs_parses() -> None:
    text = (ROOT / "docs" / "profiles.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (spec,) = parse_documents([Document("docs/profiles.md", yaml.safe_load(block))])
    assert spec.name == "wan-dsl"
    assert str(spec.values["ingress.burst"]) == "32kB"


def test_readme_opens_with_the_two_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_example_profile_is_valid() -> None:
    specs = parse_documents(read_documents([str(ROOT / "examples" / "profiles")]))
    assert {s.name for s in specs} == {"lan", "wan-dsl", "mobile-3g", "satellite"}
