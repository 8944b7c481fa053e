"""Every expected failure of every subcommand is one line on stderr and exit status 2.

The table runs in-process (``main``), where a bug would surface as an exception and fail
the test; a few cases per subcommand also run as real processes (``python -m somp_ref``)
to show that nothing else reaches stderr. No case loads a model: each fails on a cheap
check first, and loading is replaced by a tripwire. The full disk is simulated with the
file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored): writes past it fail with EFBIG, the way
writes to a full disk fail with ENOSPC, through the same code.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from stores import write_planted_store

from somp_ref.adapters import models
from somp_ref.cli import main
from somp_ref.heads import HeadScores

PREVIOUS = b"previous ranking\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and bad inputs in one folder (the working directory of the subprocesses)."""
    root = tmp_path_factory.mktemp("inputs")
    write_planted_store(root / "store")
    write_planted_store(root / "badmeta")
    (root / "badmeta" / "meta.json").write_text('{"format": "somp_ref.activation_store", ')
    (root / "folder").mkdir()
    (root / "folder" / "notes.txt").write_text("a folder that is not a store\n")
    (root / "file").write_text("not a folder\n")
    (root / "concept.txt").write_text("red\ngreen\nblue\n")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x01")
    (root / "prompts.jsonl").write_text('{"prompt": "Describe a lemon."}\n{"prompt": \n')
    scores = HeadScores(np.array([[0.5, 0.2]]), {}, {}, "somp", {}, np.zeros(0, dtype=np.int64))
    scores.to_csv(root / "ranking.csv")
    (root / "negative.csv").write_text("layer,head,score\n0,-1,0.5\n")
    (root / "previous.csv").write_bytes(PREVIOUS)
    (root / "truncated.json").write_text('{"format": "somp_ref.head_scores", ')
    (root / "other.json").write_text('{"format": "something else"}')
    return {"root": root}


def argv(template: str, root: Path) -> list[str]:
    """``template`` split on spaces, with ``@name`` standing for ``root / name``."""
    return [str(root / word[1:]) if word.startswith("@") else word for word in template.split()]


CASES = [
    # rank
    ("rank @nowhere --concept @concept.txt --out @out.csv", "no such store directory"),
    ("rank @file --concept @concept.txt --out @out.csv", "file: no such store directory"),
    ("rank @badmeta --concept @concept.txt --out @out.csv", "meta.json: unreadable"),
    ("rank @store --concept @folder --out @out.csv", "is a directory, expected a concept"),
    ("rank @store --concept @empty.txt --out @out.csv", "has no words"),
    ("rank @store --concept @binary.txt --out @out.csv", "not a UTF-8 text concept list"),
    ("rank @store --concept @concept.txt --out @folder", "folder: is a directory"),
    ("rank @store --concept @concept.txt --out @file/out.csv", "file is not a directory"),
    ("rank @store --concept @concept.txt --out @nowhere/o.csv", "nowhere does not exist"),
    ("rank @store --concept @concept.txt --out @o.csv --json-out @folder", "folder: is a dir"),
    ("rank @store --concept @concept.txt --out @o.csv --plot @p.xyz", "cannot write .xyz"),
    ("rank @store --concept nonsense --out @out.csv", "unknown concept 'nonsense'"),
    ("rank @store --concept @concept.txt --out @o.csv --atoms 0", "--atoms: must be >= 1"),
    ("rank @store --concept @concept.txt --out @o.csv --show 0", "--show: must be >= 1"),
    ("rank @store --concept @concept.txt --out @o.csv --exclude-layers 5-2", "'5-2' is empty"),
    ("rank @store --concept @concept.txt --out @o.csv --exclude-layers x", "ranges like 0,1"),
    ("rank @store --concept @concept.txt --out @o.csv --method x", "invalid choice: 'x'"),
    ("rank @store --concept @concept.txt --out @o.csv --method lens", "'somp', 'll', 'spec"),
    ("rank @store --concept @concept.txt --out @o.csv --criterion l3", "invalid choice: 'l3'"),
    ("rank @store --concept @concept.txt --out @o.csv --null 1", "--null: must be >= 2"),
    ("rank @store --concept @concept.txt --out @o.csv --seed -1", "--seed: must be >= 0"),
    ("rank @store --concept @concept.txt --out @o.csv --layers 2-1", "'2-1' is empty"),
    ("rank @store --concept @concept.txt --out @o.csv --layers 0-2,7", "layers 0-2, got 7"),
    ("rank @store --concept @concept.txt --out @o.csv --exclude-layers 3", "0-2, got 3"),
    ("rank @store --concept @concept.txt --out @o.csv --layers one", "ranges like 0,1"),
    # rank: renamed flags name their new spelling; flags are never abbreviated
    ("rank @store --concept @concept.txt --out @o.csv --json @o.json", "now --json-out"),
    ("rank @store --concept @concept.txt --out @o.csv --atom 3", "arguments: --atom 3"),
    # inspect
    ("inspect @nowhere", "no such store directory"),
    ("inspect @badmeta", "meta.json: unreadable"),
    ("inspect @store --atoms -1", "--atoms: must be >= 1, got -1"),
    ("inspect @store --head 1.2 --top 5", "--top is now --atoms"),
    ("inspect @store --head 1.x", "a head is LAYER.HEAD"),
    ("inspect @store --head 9.0", "layer must be in [0, 3), got 9"),
    # demo
    ("demo --atoms 0", "--atoms: must be >= 1"),
    ("demo --seed -1", "--seed: must be >= 0"),
    ("demo --atoms many", "expected an integer, got 'many'"),
    # export
    ("export --prompts @folder --out @new", "is a directory, expected a prompt file"),
    ("export --prompts @nowhere.txt --out @new", "prompt file (.txt"),
    ("export --prompts @binary.txt --out @new", "not a UTF-8 text prompt file"),
    ("export --prompts @prompts.jsonl --out @new", "prompts.jsonl:2: not a JSON record"),
    ("export --prompts builtin:none --out @new", "unknown built-in prompts 'none'"),
    ("export --prompts @concept.txt --out @store", "already exists (pass --overwrite"),
    ("export --prompts @concept.txt --out @file", "exists and is not a directory"),
    ("export --prompts @concept.txt --out @folder --overwrite", "is not a store: refusing"),
    ("export --prompts @concept.txt --out @new --batch-size 0", "--batch-size: must be >= 1"),
    ("export --prompts @concept.txt --out @new --model @nowhere", "nowhere does not exist"),
    ("export --prompts @concept.txt --out @new --model @folder", "no config.json"),
    ("export --prompts @concept.txt --out @new --rank-concept @empty.txt", "has no words"),
    ("export --prompts @concept.txt --out @new --rank-concept toxic --rank-out @folder", "a dir"),
    ("export --prompts @concept.txt --out @new --rank red", "--rank is now --rank-concept"),
    ("export --prompts @concept.txt --out @new --method x", "invalid choice: 'x'"),
    ("export --prompts @concept.txt --out @new --atoms 0", "--atoms: must be >= 1"),
    ("export --prompts @concept.txt --out @new --criterion x", "invalid choice: 'x'"),
    ("export --prompts @concept.txt --out @new --null 1", "--null: must be >= 2"),
    ("export --prompts @concept.txt --out @new --seed x", "expected an integer, got 'x'"),
    ("export --prompts @concept.txt --out @new --layers 3-1", "'3-1' is empty"),
    ("export --prompts @concept.txt --out @new --exclude-layers 0-", "ranges like 0,1"),
    ("export --prompts @concept.txt --out @new --dtype int8", "invalid choice: 'int8'"),
    ("export --prompts @concept.txt --out @new --revision v1", "hub ids only, not to 'default'"),
    ("export --prompts @concept.txt --out @new --revision", "expected one argument"),
    # generate
    ("generate --heads @folder hi", "is a directory, expected a ranking CSV"),
    ("generate --heads @nowhere.csv hi", "ranking CSV does not exist"),
    ("generate --heads @empty.txt hi", "no column layer, head, score"),
    ("generate --heads @binary.txt hi", "not a UTF-8 text ranking CSV"),
    ("generate --heads @negative.csv hi", "head must be an integer >= 0, got '-1'"),
    ("generate --heads @ranking.csv --top -1 hi", "--top: must be >= 1"),
    ("generate --heads @ranking.csv --max-new-tokens 0 hi", "--max-new-tokens: must be >= 1"),
    ("generate --heads @ranking.csv --model @nowhere hi", "nowhere does not exist"),
    ("generate --heads @nowhere.json hi", "ranking JSON file does not exist"),
    ("generate --heads @truncated.json hi", "truncated.json: not valid JSON"),
    ("generate --heads @other.json hi", "not a somp_ref head-scores JSON file"),
    ("generate --heads @ranking.csv --dtype half hi", "invalid choice: 'half'"),
    ("generate --heads @ranking.csv --alpha x hi", "invalid float value: 'x'"),
    ("generate hi", "the following arguments are required: --heads"),
    ("generate --heads @ranking.csv --revision main hi", "applies to hub ids only"),
    # experiment
    ("experiment colors --out @file", "file: exists and is not a directory"),
    ("experiment colors --out @file/sub", "file is not a directory"),
    ("experiment colors --k 3,x", "expected integers >= 1 like 3,8,16"),
    ("experiment colors --k 0", "expected integers >= 1 like 3,8,16"),
    ("experiment colors --heads 3,8", "--heads is now --k"),
    ("experiment colors --rank somp", "--rank is now --method"),
    ("experiment colors --method x", "invalid choice: 'x'"),
    ("experiment colors --atoms 0", "--atoms: must be >= 1"),
    ("experiment colors --exclude-layers 0,x", "ranges like 0,1"),
    ("experiment colors --dtype x", "invalid choice: 'x'"),
    ("experiment colors --seeds -1", "--seeds: must be >= 0"),
    ("experiment colors --out @new --revision main", "applies to hub ids only"),
    ("experiment colors --null 1", "--null: must be >= 2"),
    ("experiment colors --exclude-layers 5-2", "'5-2' is empty"),
    ("experiment nothing", "invalid choice: 'nothing'"),
    ("experiment colors --out @new --model @nowhere", "nowhere does not exist"),
    # verify
    ("verify --port nocolon", "a port is 'package.module:function'"),
    ("verify --port no_such_module:fn", "No module named 'no_such_module'"),
    ("verify --port somp_ref:no_such_function", "somp_ref has no attribute"),
    ("verify --model @nowhere", "nowhere does not exist"),
    ("verify --json yes", "unrecognized arguments: yes"),
]


def refuse_model_load(*args, **kwargs):
    raise AssertionError("a model load was attempted: the case should have failed earlier")


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SOMP_REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_model", refuse_model_load)
    monkeypatch.setattr(models, "default_checkpoint", refuse_model_load)


@pytest.mark.parametrize("template, message", CASES, ids=[case[0] for case in CASES])
def test_expected_failures_are_one_line(files, no_model, capsys, template, message):
    root = files["root"]
    try:
        status = main(argv(template, root))
    except SystemExit as done:  # argparse's usage errors
        status = done.code
    err = capsys.readouterr().err
    assert status == 2, err
    command = template.split()[0]
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"somp-ref {command}: error: "), err
    assert message in err
    assert not (root / "new").exists()  # export and experiment failed before creating it


def run_process(template: str, root: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SOMP_REF_CACHE": str(root / "cache")}
    return subprocess.Popen(
        [sys.executable, "-m", "somp_ref", *argv(template, root)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


PROCESS_CASES = [
    "demo --atoms 0",
    "rank @badmeta --concept @concept.txt --out @out.csv",
    "inspect @file",
    "export --prompts @concept.txt --out @new --model @nowhere",
    "generate --heads @binary.txt hi",
    "experiment colors --out @new --model ./no/such/model",
    "experiment colors --heads 3,8",
    "verify --port no_such_module:fn",
]


def test_each_subcommand_fails_in_one_line_as_a_process(files):
    root = files["root"]
    processes = [run_process(template, root) for template in PROCESS_CASES]  # in parallel
    for template, process in zip(PROCESS_CASES, processes, strict=True):
        out, err = process.communicate(timeout=120)
        assert process.returncode == 2, (template, err)
        assert "Traceback" not in out + err, (template, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("somp-ref "), (template, err)


def limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(files):
    root = files["root"]
    template = "rank @store --concept @concept.txt --method somp --out @previous.csv"
    process = run_process(template, root, preexec_fn=limit_file_size)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert "Traceback" not in out + err
    # The ranking ran (its concept line and progress precede), then the write failed.
    errors = [line for line in err.splitlines() if "error:" in line]
    assert (
        errors
        == [err.splitlines()[-1]]
        == [f"somp-ref rank: error: {root / 'previous.csv'}: File too large"]
    )
    assert (root / "previous.csv").read_bytes() == PREVIOUS
    assert not [p for p in os.listdir(root) if p.startswith(".previous.csv")]
