"""The command line, called in-process."""

from __future__ import annotations

import pytest

from somp_ref.cli import main


def test_demo_ranks_planted_heads_first(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "planted heads ranked first: yes" in out
    table = out.splitlines()[1:4]
    assert all(" yes " in line for line in table), table


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit, match="0"):
        main(["--help"])
    assert "demo" in capsys.readouterr().out
