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


def test_rank_writes_csv_json_and_prints_the_table(tmp_path, capsys):
    from stores import write_planted_store

    from somp_ref.heads import HeadScores

    store = write_planted_store(tmp_path / "store")
    words = tmp_path / "concept.txt"
    words.write_text("red\ngreen\nblue\nyellow\npurple\nmauve\n")
    out, js = tmp_path / "scores.csv", tmp_path / "scores.json"
    status = main(
        [
            "rank",
            str(store.path),
            "--concept",
            str(words),
            "--atoms",
            "5",
            "--out",
            str(out),
            "--json",
            str(js),
            "--show",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0
    assert "5 words -> 5 tokens; dropped 1 (no single-token form): mauve" in captured.err
    assert set(top_heads_of(HeadScores.from_csv(out))) == {(1, 2), (2, 0)}
    assert HeadScores.from_json(js).params["n_atoms"] == 5
    assert captured.out.splitlines()[1].split()[1] in {"1.2", "2.0"}


def top_heads_of(scores):
    from somp_ref.heads import top_heads

    return top_heads(scores, 2)


def test_inspect_summary_and_signature(tmp_path, capsys):
    from stores import write_planted_store

    store = write_planted_store(tmp_path / "store")
    assert main(["inspect", str(store.path)]) == 0
    assert "3 layers x 4 heads, d_head 6, d_model 24" in capsys.readouterr().out
    assert main(["inspect", str(store.path), "--head", "1.2", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("'red'", "'green'", "'blue'"))


def test_cli_reports_bad_stores_without_traceback(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "somp-ref inspect: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "--head", "12"])
    assert "a head is LAYER.HEAD" in capsys.readouterr().err


def test_adapter_commands_answer_with_the_install_line_without_torch(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert main(["export", "--prompts", "builtin:colors", "--out", "x"]) == 2
    assert "pip install torch==2.13.0 'somp-ref[hf]'" in capsys.readouterr().err


def test_experiment_help_teaches_the_options(capsys):
    with pytest.raises(SystemExit, match="0"):
        main(["experiment", "--help"])
    out = capsys.readouterr().out
    for word in ("--rank", "specificity", "--exclude-layers", "--seeds", "countries"):
        assert word in out
