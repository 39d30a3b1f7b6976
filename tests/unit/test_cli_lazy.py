"""The CLI's start: ``vnic --help`` lists every command without importing one, and every
command of that list loads and answers its own ``--help``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vnic.cli import app as cli_app

#: Runs the console script's main with argv, then prints which modules were imported.
PROBE = """
import json, sys
from vnic.cli.app import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after(*argv: str) -> tuple[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    *text, modules = proc.stdout.rstrip("\n").split("\n")
    return "\n".join(text), json.loads(modules)


def test_help_lists_every_command_and_imports_none_of_them() -> None:
    text, modules = _modules_after("--help")
    listed = [line.split()[0] for line in text.split("Commands:\n", 1)[1].splitlines()]
    assert listed == list(cli_app.COMMANDS)
    ours = sorted(m for m in modules if m.startswith("vnic"))
    assert ours == ["vnic", "vnic.cli", "vnic.cli.app", "vnic.cli.common"]
    heavy = ("rich", "sqlalchemy", "pydantic", "fastapi", "httpx", "pyroute2", "yaml")
    assert [m for m in modules if m.split(".")[0] in heavy] == []


def test_a_group_imports_its_own_module_only() -> None:
    text, modules = _modules_after("token", "--help")
    assert "create" in text and "revoke" in text
    cli_modules = {m for m in modules if m.startswith("vnic.cli.")}
    assert "vnic.cli.tokens" in cli_modules
    assert not cli_modules & {"vnic.cli.vm", "vnic.cli.bench", "vnic.cli.profile"}


@pytest.mark.parametrize("name", list(cli_app.COMMANDS))
def test_every_listed_command_loads_with_its_summary(name: str) -> None:
    command = cli_app.load_command(name)
    assert command.name == name
    assert command.short_help == cli_app.COMMANDS[name].summary
    assert command.help  # its own --help has the full text


def test_runtime_commands_are_registered_in_their_groups() -> None:
    assert "adjust" in cli_app.load_command("vm").commands  # type: ignore[attr-defined]
    assert "controller" in cli_app.load_command("session").commands  # type: ignore[attr-defined]


def test_an_unknown_command_is_refused_with_a_suggestion() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vnic.cli.app", "profil"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "No such command 'profil'" in proc.stderr and "'profile'" in proc.stderr
