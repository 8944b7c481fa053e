"""Progress bars: tqdm's on stderr, nothing when switched off, items passed through."""

from __future__ import annotations

from somp_ref.progress import progress


def test_a_bar_goes_to_stderr_and_the_items_pass_through(capsys):
    assert list(progress(["a", "b", "c"], desc="rank (somp)")) == ["a", "b", "c"]
    out, err = capsys.readouterr()
    assert out == ""
    assert "rank (somp)" in err and "3/3" in err


def test_a_generator_counts_against_the_total_given(capsys):
    items = (i * i for i in range(4))
    assert list(progress(items, desc="export (batches)", total=4)) == [0, 1, 4, 9]
    assert "4/4" in capsys.readouterr().err


def test_a_disabled_bar_writes_nothing(capsys):
    assert list(progress(range(5), desc="quiet", enabled=False)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr() == ("", "")
