"""The ``vnic`` command, run as a real process against a SQLite file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VNIC = [sys.executable, "-m", "vnic.cli.app"]


class Vnic:
    """Runs the CLI in a subprocess with its own database."""

    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "VNIC_HOME": str(home), "COLUMNS": "200"}
        self.env.pop("VNIC_DATABASE_URL", None)

    def __call__(
        self, *args: str, ok: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*VNIC, *args], env=self.env, input=stdin, capture_output=True, text=True, timeout=60
        )
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture
def vnic(tmp_path: Path) -> Vnic:
    return Vnic(tmp_path / "home")


BAD_BURST = """\
name: tight
egress: {rate: 10Mbit, burst: 1000B}
"""


def test_burst_below_mtu_exits_2_names_the_field_and_writes_nothing(
    vnic: Vnic, tmp_path: Path, examples_dir: Path
) -> None:
    vnic("profile", "apply", "-f", str(examples_dir))
    before = vnic.json("profile", "list")
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_BURST)
    proc = vnic("profile", "apply", "-f", str(bad), ok=False)
    assert proc.returncode == 2
    assert "egress.burst" in proc.stderr
    assert "got 1kB" in proc.stderr and "at least the MTU 1500B" in proc.stderr
    assert proc.stdout == ""
    assert vnic.json("profile", "list") == before


def test_one_bad_document_in_many_applies_none(vnic: Vnic, tmp_path: Path) -> None:
    many = tmp_path / "many.yaml"
    many.write_text(
        "- {name: good, egress: {rate: 1Mbit}}\n- {name: worse, ingress: {delay: 10parsecs}}\n"
    )
    proc = vnic("profile", "apply", "-f", str(many), ok=False)
    assert proc.returncode == 2
    assert "[1] (profile 'worse'): ingress.delay" in proc.stderr
    assert vnic.json("profile", "list") == []


def test_apply_is_idempotent_and_revisions_are_kept(
    vnic: Vnic, tmp_path: Path, examples_dir: Path
) -> None:
    out = vnic("profile", "apply", "-f", str(examples_dir)).stdout
    assert "profile wan-dsl: created (revision 1)" in out
    out = vnic("profile", "apply", "-f", str(examples_dir)).stdout
    assert "profile wan-dsl: unchanged (revision 1)" in out
    changed = tmp_path / "dsl.json"
    changed.write_text(json.dumps({"name": "wan-dsl", "egress": {"rate": "2Mbit"}}))
    assert "updated (revision 2)" in vnic("profile", "apply", "-f", str(changed)).stdout
    history = vnic.json("profile", "history", "wan-dsl")
    assert [h["revision"] for h in history] == [1, 2]
    old = vnic.json("profile", "show", "wan-dsl", "--revision", "1")
    assert old["document"]["egress"]["rate"] == "1Mbit"


def test_export_round_trips_through_stdin(vnic: Vnic, examples_dir: Path) -> None:
    vnic("profile", "apply", "-f", str(examples_dir))
    exported = vnic("profile", "export").stdout
    out = vnic("profile", "apply", "-f", "-", stdin=exported).stdout
    assert out.count("unchanged") == 4


def test_session_rules_overrides_and_explain(vnic: Vnic, examples_dir: Path) -> None:
    vnic("profile", "apply", "-f", str(examples_dir))
    vnic(
        "session",
        "create",
        "lab",
        "--default-profile",
        "wan-dsl",
        "--rule",
        "profile=lan,role=server",
    )
    vnic("vm", "add", "lab", "web", "--role", "server")
    vnic("vm", "add", "lab", "pc", "--set", "egress.delay=80ms", "--set", "tcp.window_scaling=off")
    web = vnic.json("vm", "explain", "lab", "web")
    assert web["effective"]["fields"]["egress.rate"] == {
        "value": "1Gbit",
        "source": {"layer": "rule", "detail": "#1 role=server -> lan r1"},
    }
    pc = vnic.json("vm", "explain", "lab", "pc")
    fields = pc["effective"]["fields"]
    assert fields["egress.delay"]["value"] == "80ms"
    assert fields["egress.delay"]["source"]["layer"] == "vm-patch"
    assert fields["tcp.window_scaling"]["value"] is False
    assert fields["egress.rate"]["source"]["layer"] == "session-default"
    assert pc["vm"]["mac"] == "02:00:00:10:00:00"
    text = vnic("vm", "explain", "lab", "pc").stdout
    assert "vm-patch (override)" in text and "session-default (wan-dsl r1)" in text
    session = vnic.json("session", "show", "lab")
    assert [v["name"] for v in session["vms"]] == ["pc", "web"]


def test_errors_name_field_value_and_expectation(vnic: Vnic, examples_dir: Path) -> None:
    vnic("profile", "apply", "-f", str(examples_dir))
    vnic("session", "create", "lab", "--default-profile", "wan-dsl")
    proc = vnic("vm", "add", "lab", "x", "--set", "egress.rate=fast", ok=False)
    assert proc.returncode == 2
    assert "egress.rate: got 'fast'; expected a rate such as 10Mbit" in proc.stderr
    proc = vnic("profile", "delete", "wan-dsl", ok=False)
    assert proc.returncode == 2 and "session lab (default profile)" in proc.stderr
    proc = vnic("session", "create", "other", "--rule", "profile=ghost", ok=False)
    assert proc.returncode == 2 and "rules[0].profile" in proc.stderr
    proc = vnic("vm", "explain", "lab", "nobody", ok=False)
    assert proc.returncode == 2 and "'nobody' does not exist" in proc.stderr
    assert vnic.json("session", "list")[0]["vms"] == []


def test_fields_lists_every_profile_field(vnic: Vnic) -> None:
    fields = vnic.json("profile", "fields")
    paths = {f["field"] for f in fields}
    assert {
        "egress.rate",
        "ingress.loss",
        "qos.egress",
        "mac_range",
        "tcp.congestion_control",
    } <= paths


def test_bench_options_are_checked_before_anything_runs(vnic: Vnic) -> None:
    proc = vnic("bench", "fidelity", "--part", "impairments", "--cells", "delay,warp", ok=False)
    assert proc.returncode == 2
    assert "--cells: got 'delay,warp'" in proc.stderr and "delay, jitter, order" in proc.stderr
    proc = vnic("bench", "fidelity", "--part", "everything", ok=False)
    assert proc.returncode == 2 and "--part: got 'everything'" in proc.stderr


def test_a_profile_seed_must_be_a_non_negative_integer(vnic: Vnic) -> None:
    proc = vnic("profile", "apply", "-f", "-", stdin="name: s\nseed: -3\n", ok=False)
    assert proc.returncode == 2 and "seed: got -3" in proc.stderr
    vnic("profile", "apply", "-f", "-", stdin="name: s\nseed: 7\negress: {loss: 1%}\n")
    assert vnic.json("profile", "show", "s")["document"]["seed"] == 7


def test_vm_link_and_exec_name_a_bad_state_and_a_vm_that_does_not_run(vnic: Vnic) -> None:
    bad = vnic("vm", "link", "lab", "g", "sideways", ok=False)
    assert bad.returncode == 2
    assert "state: got 'sideways'; expected up or down" in bad.stderr
    # The VM must exist and run (a running netns VM is refused naming it: tests/e2e).
    none = vnic("vm", "link", "lab", "g", "down", ok=False)
    assert none.returncode == 2 and "session 'lab' does not exist" in none.stderr
    vnic("session", "create", "lab")
    vnic("vm", "add", "lab", "g")
    idle = vnic("vm", "link", "lab", "g", "down", ok=False)
    assert idle.returncode == 2 and "VM lab/g is not running" in idle.stderr
    idle = vnic("vm", "exec", "lab", "g", "--", "true", ok=False)
    assert idle.returncode == 2 and "VM lab/g is not running" in idle.stderr
