"""`scripts/hosts.sh` refuses bad arguments before touching anything."""

from __future__ import annotations

import pytest

from vnic.lab.hostbed_main import main


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "usage"),
        (["up"], "usage"),
        (["sideways", "3"], "usage"),
        (["up", "three"], "N: got 'three'; expected a number of hosts"),
        (["up", "3", "Bad-Tag"], "tag: got 'Bad-Tag'; expected 1 to 8 lower-case"),
        (["up", "0", "t"], "count: got 0; expected a whole number of hosts from 1 to 99"),
        (["down", "Bad"], "TAG: got 'Bad'; expected 1 to 8 lower-case"),
    ],
)
def test_bad_arguments(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert says in capsys.readouterr().err
