"""Progress bars: tqdm's on stderr when it is a terminal, nothing when switched off or when
stderr is a pipe or a file (where an error must be the only line), items passed through."""

from __future__ import annotations

import io
import sys

from somp_ref.progress import progress


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def on_a_terminal(monkeypatch) -> Terminal:
    """Make stderr a terminal, in the test itself (pytest's capture sets sys.stderr again
    between a fixture's setup and the test)."""
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_a_bar_goes_to_a_terminal_and_the_items_pass_through(monkeypatch, capsys):
    terminal = on_a_terminal(monkeypatch)
    assert list(progress(["a", "b", "c"], desc="rank (somp)")) == ["a", "b", "c"]
    assert capsys.readouterr().out == ""
    assert "rank (somp)" in terminal.getvalue() and "3/3" in terminal.getvalue()


def test_a_generator_counts_against_the_total_given(monkeypatch):
    terminal = on_a_terminal(monkeypatch)
    items = (i * i for i in range(4))
    assert list(progress(items, desc="export (batches)", total=4)) == [0, 1, 4, 9]
    assert "4/4" in terminal.getvalue()


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
    """Under capsys, stderr is not a terminal: as a pipe or a log file, it gets no bar."""
    assert list(progress(range(5), desc="piped")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr() == ("", "")


def test_a_disabled_bar_writes_nothing(monkeypatch, capsys):
    terminal = on_a_terminal(monkeypatch)
    assert list(progress(range(5), desc="quiet", enabled=False)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr() == ("", "")
    assert terminal.getvalue() == ""
