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
from somp_ref.errors import MissingExtraError
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
    grid = np.array([[0.5, 0.2, 0.1, 0.3], [0.4, 0.6, 0.7, 0.8]])  # 8 heads: --top's default
    scores = HeadScores(grid, {}, {}, "somp", {}, np.zeros(0, dtype=np.int64))
    scores.to_csv(root / "ranking.csv")
    (root / "negative.csv").write_text("layer,head,score\n0,-1,0.5\n")
    (root / "previous.csv").write_bytes(PREVIOUS)
    (root / "truncated.json").write_text('{"format": "somp_ref.head_scores", ')
    (root / "other.json").write_text('{"format": "something else"}')
    # The audit's cases (see the table): files that would hang, exhaust memory, or be read
    # as something they are not; output paths that would destroy a store or another output.
    os.mkfifo(root / "fifo")
    (root / "nomatch.txt").write_text("zebra\nquokka\n")
    (root / "w.txt").write_text("red\n")
    deep = "[" * 100_000 + "]" * 100_000
    (root / "nested.jsonl").write_text(deep + "\n")
    (root / "nested.json").write_text('{"format": "somp_ref.head_scores", "x": ' + deep + "}")
    (root / "emptyprompt.jsonl").write_text('{"prompt": "Describe a lemon."}\n{"prompt": ""}\n')
    (root / "blank.json").write_text('["Describe a lemon.", "   "]')
    (root / "array.json").write_text('["Describe a lemon.", {"prompt": "Describe the sky."}]')
    (root / "upper.JSONL").write_text('{"prompt": "Describe a lemon."}\n')
    (root / "prompts.csv").write_text("prompt\nDescribe a lemon.\n")
    (root / "object.json").write_text('{"prompt": "Describe a lemon."}')
    (root / "nan.csv").write_text("layer,head,score\n0,1,nan\n0,2,nan\n")
    os.symlink(root / "store", root / "storelink")
    os.symlink(root / "store" / "meta.json", root / "metalink.csv")
    write_planted_store(root / "foreign")
    (root / "foreign" / "notes.txt").write_text("mine")
    (root / "fakemeta").mkdir()
    (root / "fakemeta" / "meta.json").write_text("{}")
    (root / "fakemeta" / "thesis.tex").write_text("precious")
    write_planted_store(root / "narrow", d_model=12)  # a store that cannot merge with store
    write_planted_store(root / "liar")  # meta.json says 39 rows, the files hold 40
    liar = (root / "liar" / "meta.json").read_text().replace('"n_samples": 40', '"n_samples": 39')
    (root / "liar" / "meta.json").write_text(liar)
    (root / "badsyntax_port.py").write_text("def f(:\n")
    (root / "raising_port.py").write_text("raise RuntimeError('boom at import')\n")
    (root / "exiting_port.py").write_text("import sys\nsys.exit(3)\n")
    return {"root": root, "store": digest(root / "store")}


def digest(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` by name, with its bytes."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def argv(template: str, root: Path) -> list[str]:
    """``template`` split on spaces, with ``@name`` standing for ``root / name`` and ``''``
    for the empty string."""
    return [
        f"{root}/{word[1:]}" if word.startswith("@") else "" if word == "''" else word
        for word in template.split()
    ]


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
    # rank: the audit's cases. Outputs never inside the store read (data loss), never two
    # outputs in one file, never an empty name, a name ending in '/', a FIFO or a device.
    ("rank @store --concept @concept.txt --out @store/meta.json", "inside the store"),
    ("rank @store --concept @concept.txt --out @metalink.csv", "inside the store"),
    ("rank @store --concept @concept.txt --out @store", "is the store"),
    ("rank @store --concept @concept.txt --out @o.csv --json-out @store/s.json", "inside the"),
    ("rank @store --concept @concept.txt --out @o.csv --plot @store/p.png", "inside the store"),
    ("rank @storelink --concept @concept.txt --out @store/o.csv", "inside the store"),
    ("rank @store --concept @concept.txt --out @same --json-out @same", "are the same file"),
    ("rank @store --concept @concept.txt --out @o.png --plot @o.png", "are the same file"),
    ("rank @store --concept @concept.txt --out ''", "an empty output path"),
    ("rank @store --concept @concept.txt --out @o.csv --json-out ''", "an empty output path"),
    ("rank @store --concept @concept.txt --out @o.csv/", "ends with a '/'"),
    ("rank @store --concept @concept.txt --out @fifo", "fifo: exists and is not a regular"),
    ("rank @store --concept @concept.txt --out /dev/null", "null: exists and is not a regular"),
    # rank: user files that would hang (a FIFO) or never end (a device)
    ("rank @store --concept @fifo --out @o.csv", "fifo: not a regular file (a FIFO"),
    ("rank @store --concept /dev/zero --out @o.csv", "zero: not a regular file"),
    ("rank @store --concept /dev/urandom --out @o.csv", "urandom: not a regular file"),
    ("rank @store --concept @nomatch.txt --out @o.csv", "none of its 2 words (zebra, quokka)"),
    ("rank @store --concept @concept.txt --out @o.csv --exclude-layers 0-99999999999", "past"),
    ("rank @store --concept @concept.txt --out @o.csv --layers 0-99999999999", "numbered 0-4095"),
    ("rank @store --concept @concept.txt --out @o.csv --layers 4096", "numbered 0-4095"),
    ("rank @store --concept @concept.txt --out @o.csv --exclude-layers 0-2", "no layer left"),
    ("rank @store --concept @concept.txt --out @o.csv --layers 1 --exclude-layers 1", "no lay"),
    ("rank @liar --concept @concept.txt --out @o.csv", "liar/layer_000.safetensors: z has"),
    # inspect
    ("inspect @nowhere", "no such store directory"),
    ("inspect @liar", "z has shape (40, 4, 6), meta.json's shapes make it (39, 4, 6)"),
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
    # export: the audit's cases
    ("export --prompts @fifo --out @new", "fifo: not a regular file"),
    ("export --prompts /dev/zero --out @new", "zero: not a regular file"),
    ("export --prompts @nested.jsonl --out @new", "nested.jsonl:1: JSON too deeply nested"),
    ("export --prompts @nested.json --out @new", "nested.json: JSON too deeply nested"),
    ("export --prompts @emptyprompt.jsonl --out @new", "emptyprompt.jsonl:2: empty prompt"),
    ("export --prompts @blank.json --out @new", "blank.json: entry 1: empty prompt"),
    ("export --prompts @object.json --out @new", "an array of prompt strings"),
    ("export --prompts @prompts.csv --out @new", "unknown prompt file suffix '.csv'"),
    ("export --prompts @array.json --out @new --model @nowhere", "nowhere does not exist"),
    ("export --prompts @upper.JSONL --out @new --model @nowhere", "nowhere does not exist"),
    ("export --prompts @concept.txt --out @storelink --overwrite", "is a symbolic link"),
    ("export --prompts @concept.txt --out @foreign --overwrite", "holds 'notes.txt', which"),
    ("export --prompts @concept.txt --out @fakemeta --overwrite", "fakemeta exists and is not a"),
    ("export --prompts @concept.txt --out @store/.s.new-1-ab --overwrite", "a hidden copy"),
    ("export --prompts @w.txt --out @new --rank-concept @w.txt --rank-out @new", "is the store"),
    ("export --prompts @w.txt --out @new --rank-concept @w.txt --rank-out @new/r.csv", "inside"),
    ("export --prompts @w.txt --out @new --rank-concept @w.txt --rank-out ''", "an empty output"),
    ("export --prompts @concept.txt --out @new --layers 0-99999999999", "numbered 0-4095"),
    (
        "export --prompts @w.txt --out @new --rank-concept @w.txt --layers 1 --exclude-layers 1",
        "no layer left",
    ),
    ("export --prompts @concept.txt --out @new --device bogus:99", "unknown device type 'bogus'"),
    ("export --prompts @concept.txt --out @new --device cuda:01", "a device is TYPE or TYPE:IN"),
    ("export --prompts @concept.txt --out @new --model ~nouser_somp_ref/m", "cannot expand"),
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
    ("generate --heads @ranking.csv --alpha x hi", "--alpha: expected a number, got 'x'"),
    ("generate hi", "the following arguments are required: --heads"),
    ("generate --heads @ranking.csv --revision main hi", "applies to hub ids only"),
    # generate: the audit's cases
    ("generate --heads @fifo hi", "fifo: not a regular file"),
    ("generate --heads @nested.json hi", "nested.json: JSON too deeply nested"),
    ("generate --heads @nan.csv hi", "no head has a score"),
    ("generate --heads @ranking.csv --top 9 hi", "only 8 heads have a score"),
    ("generate --heads @ranking.csv --alpha nan hi", "--alpha: must be a finite number"),
    ("generate --heads @ranking.csv --alpha inf hi", "--alpha: must be a finite number"),
    ("generate --heads @ranking.csv --alpha=-inf hi", "--alpha: must be a finite number"),
    ("generate --heads @ranking.csv --device bogus:99 hi", "unknown device type 'bogus'"),
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
    ("experiment colors --random 0", "--random: must be >= 1"),
    ("experiment colors --seeds 3", "--seeds is now --random"),
    ("experiment colors --out @new --revision main", "applies to hub ids only"),
    ("experiment colors --null 1", "--null: must be >= 2"),
    ("experiment colors --exclude-layers 5-2", "'5-2' is empty"),
    ("experiment nothing", "invalid choice: 'nothing'"),
    ("experiment colors --out @new --model @nowhere", "nowhere does not exist"),
    ("experiment colors --exclude-layers 0-99999999999", "numbered 0-4095"),
    ("experiment colors --alpha nan", "--alpha: must be a finite number"),
    ("experiment colors --alpha inf", "--alpha: must be a finite number"),
    ("experiment colors --device bogus:99", "unknown device type 'bogus'"),
    # compare
    ("compare @nowhere @file", "nowhere: results.json of somp-ref experiment does not exist"),
    ("compare @folder @folder", "results.json of somp-ref experiment does not exist"),
    ("compare @file @file", "not valid JSON; not the results of somp-ref experiment"),
    ("compare @fifo @fifo", "not a regular file"),
    ("compare @nested.json @nested.json", "not valid JSON"),
    ("compare @other.json @other.json", "no 'experiments' list"),
    ("compare @store @store", "store/results.json: results.json"),
    # store merge: inputs that are not stores, an output inside (or equal to) an input (it
    # would become a file of the store it reads, or replace it), stores that cannot merge
    ("store merge @nowhere --out @merged", "nowhere: no such store directory"),
    ("store merge @store @nowhere --out @merged", "nowhere: no such store directory"),
    ("store merge @folder --out @merged", "folder/meta.json: missing; "),
    ("store merge @file --out @merged", "file: no such store directory"),
    ("store merge @badmeta --out @merged", "meta.json: unreadable"),
    ("store merge @store --out @store/sub", "/store/sub is inside the input store"),
    ("store merge @narrow @store --out @store/a/b", "/store/a/b is inside the input store"),
    ("store merge @store --out @storelink/sub", "/storelink/sub is inside the input store"),
    ("store merge @store --out @store --overwrite", "/store is the input store"),
    ("store merge @narrow @store --out @storelink --overwrite", "storelink is the input store"),
    ("store merge @store @narrow --out @merged", "narrow cannot merge with"),
    ("store merge @narrow @store --out @merged", "d_model 24 != 12"),
    # verify
    ("verify --port nocolon", "a port is 'package.module:function'"),
    ("verify --port badsyntax_port:f", "port module badsyntax_port has a syntax error"),
    ("verify --port raising_port:f", "failed while imported: RuntimeError: boom at import"),
    ("verify --port exiting_port:f", "exiting_port failed while imported: SystemExit: 3"),
    ("verify --model ~nouser_somp_ref/m", "cannot expand '~nouser_somp_ref'"),
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
def test_expected_failures_are_one_line(files, no_model, monkeypatch, capsys, template, message):
    root = files["root"]
    monkeypatch.syspath_prepend(str(root))  # the --port modules
    try:
        status = main(argv(template, root))
    except SystemExit as done:  # argparse's usage errors
        status = done.code
    err = capsys.readouterr().err
    assert status == 2, err
    words = template.split()
    command = " ".join(words[:2]) if words[0] == "store" else words[0]  # as the user typed it
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"somp-ref {command}: error: "), err
    assert message in err
    assert not (root / "new").exists()  # export and experiment failed before creating it
    assert not (root / "merged").exists()  # and store merge
    assert digest(root / "store") == files["store"]  # no output ever lands in the store


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
    "compare @file @fifo",
    # the audit's: no hang on a FIFO; stdout (a pipe here) is not a file to replace; the
    # concept's report no longer precedes the error on stderr
    "rank @store --concept @fifo --out @out.csv",
    "rank @store --concept @concept.txt --out /dev/stdout",
    "rank @store --concept @nomatch.txt --out @out.csv",
    "export --prompts @fifo --out @new",
    "generate --heads @fifo hi",
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
    # The ranking ran, then the write failed: that is the only line (the concept's report
    # is on stdout, and off a terminal there are no progress bars).
    assert err == f"somp-ref rank: error: {root / 'previous.csv'}: File too large\n"
    assert (root / "previous.csv").read_bytes() == PREVIOUS
    assert not [p for p in os.listdir(root) if p.startswith(".") and "previous" in p]  # temps


@pytest.mark.parametrize(
    ("limit", "where"),
    [(3000, "while writing the weights"), (8000, "while appending the second store's rows")],
)
def test_a_full_disk_during_store_merge_names_the_file_in_one_line(files, limit, where):
    """The row writer's files are open files: their OSError named no file ('File too
    large'), and closing them raised it a second time while the first was handled."""
    root = files["root"]
    out = root / f"fullmerge{limit}"

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    process = run_process(f"store merge @store @store --out {out}", root, preexec_fn=limited)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, (where, err)
    file = out / ".layer_000.safetensors.rows"
    assert err == f"somp-ref store merge: error: {file}: File too large\n", where


def test_a_full_disk_keeps_every_previous_output_of_a_command(files, tmp_path):
    """rank writes its CSV and JSON together: when the JSON does not fit, the CSV (which
    would have fitted) is not replaced either, so the two never come from different runs."""
    root = files["root"]
    template = (
        "rank @store --concept @concept.txt --method somp --out @{0}.csv --json-out @{0}.json"
    )
    assert main(argv(template.format("sizes"), root)) == 0
    csv_size, json_size = ((root / f"sizes.{kind}").stat().st_size for kind in ("csv", "json"))
    assert csv_size < json_size
    for kind in ("csv", "json"):
        (root / f"both.{kind}").write_bytes(PREVIOUS)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = (csv_size + json_size) // 2  # the CSV fits, the JSON does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    process = run_process(template.format("both"), root, preexec_fn=limit)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert err == f"somp-ref rank: error: {root / 'both.json'}: File too large\n"
    assert (root / "both.csv").read_bytes() == PREVIOUS
    assert (root / "both.json").read_bytes() == PREVIOUS
    assert not [name for name in os.listdir(root) if name.startswith(".") and "both" in name]


def test_an_error_found_while_ranking_is_the_only_line_on_stderr(files, tmp_path):
    """The store is checked layer by layer as it is ranked: a corrupt last layer is found
    after the others were ranked. Off a terminal no progress bar precedes the error."""
    import shutil

    from somp_ref.store import layer_file

    store = tmp_path / "store"
    shutil.copytree(files["root"] / "store", store)
    layer = store / layer_file(2)
    raw = bytearray(layer.read_bytes())
    raw[-8:] = b"\xff" * 8  # two NaNs at the end of the data, same size
    layer.write_bytes(bytes(raw))
    process = run_process(f"rank {store} --concept @concept.txt --out @corrupt.csv", files["root"])
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("somp-ref rank: error: "), err
    assert not (files["root"] / "corrupt.csv").exists()


def test_an_output_that_is_a_symlink_is_written_where_it_points(files, tmp_path):
    root = files["root"]
    target = tmp_path / "target.csv"
    target.write_bytes(PREVIOUS)
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert main(argv(f"rank @store --concept @concept.txt --method somp --out {link}", root)) == 0
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text().startswith("rank,layer,head,score")
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "target.csv"]


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    from somp_ref import demo

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "planted_heads_demo", interrupted)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err == "somp-ref demo: interrupted\n"


@pytest.mark.parametrize(
    "error, expected",
    [
        (ModuleNotFoundError("No module named 'matplotlib'"), True),  # not installed
        (MissingExtraError("plots need the plot extra: pip install 'somp-ref[plot]'"), True),
        (ImportError("cannot import name 'rescale' from 'somp_ref.factored'"), False),  # a bug
    ],
    ids=["module-not-found", "missing-extra", "broken-import"],
)
def test_a_missing_package_is_one_line_and_a_broken_import_a_traceback(
    monkeypatch, capsys, error, expected
):
    from somp_ref import demo

    def fails(**kwargs):
        raise error

    monkeypatch.setattr(demo, "planted_heads_demo", fails)
    if expected:
        assert main(["demo"]) == 2
        assert capsys.readouterr().err == f"somp-ref demo: error: {error}\n"
    else:
        with pytest.raises(ImportError, match="cannot import name"):
            main(["demo"])


def test_ctrl_c_of_a_running_process(tmp_path):
    """A real SIGINT, delivered while the command works."""
    # A shell that starts a job in the background (nohup, &) makes it ignore SIGINT, and
    # Python then keeps ignoring it: restore what a terminal's Ctrl-C meets.
    script = (
        "import signal\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import time, somp_ref.demo as demo\n"
        "def slow(**kwargs):\n"
        "    print('working', flush=True)\n"
        "    time.sleep(60)\n"
        "demo.planted_heads_demo = slow\n"
        "from somp_ref.cli import main\n"
        "raise SystemExit(main(['demo']))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "working\n"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err == "somp-ref demo: interrupted\n"


def test_running_out_of_memory_is_one_line(files, monkeypatch, capsys):
    from somp_ref import ranking

    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 2.38 GiB for an array with shape (20000000, 16)")

    monkeypatch.setattr(ranking, "rank_heads", too_big)
    assert main(argv("rank @store --concept @concept.txt --out @mem.csv", files["root"])) == 2
    assert capsys.readouterr().err == (
        "somp-ref rank: error: out of memory: Unable to allocate 2.38 GiB for an array with "
        "shape (20000000, 16)\n"
    )
    assert not (files["root"] / "mem.csv").exists()


def test_printing_never_fails_on_the_terminal_encoding(files, tmp_path):
    """PYTHONIOENCODING=ascii and a dropped word 'café' in the concept's report: printed
    escaped, after the CSV was written, instead of failing the command."""
    root = files["root"]
    (tmp_path / "accents.txt").write_text("red\ncafé\n", encoding="utf-8")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run(
        [sys.executable, "-m", "somp_ref", "rank", str(root / "store"), "--method", "somp"]
        + ["--concept", str(tmp_path / "accents.txt"), "--out", str(tmp_path / "o.csv")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "dropped 1 (no single-token form): caf\\xe9" in done.stdout
    assert (tmp_path / "o.csv").is_file()


def test_prompt_files_are_read_by_their_suffix_in_any_case(tmp_path):
    from somp_ref.adapters.prompts import read_prompts

    (tmp_path / "a.json").write_text('["Describe a lemon.", {"prompt": "Sky?", "label": 1}]')
    assert read_prompts(str(tmp_path / "a.json")) == [
        {"prompt": "Describe a lemon."},
        {"prompt": "Sky?", "label": 1},
    ]
    (tmp_path / "b.JSONL").write_text('{"prompt": "Describe a lemon."}\n\n{"prompt": "Sky?"}\n')
    assert read_prompts(str(tmp_path / "b.JSONL")) == [
        {"prompt": "Describe a lemon."},
        {"prompt": "Sky?"},
    ]
    (tmp_path / "c.TXT").write_text('  ["not JSON here"]  \n\nSky?\n')
    assert read_prompts(str(tmp_path / "c.TXT")) == [
        {"prompt": '["not JSON here"]'},
        {"prompt": "Sky?"},
    ]
    (tmp_path / "prompts").write_text("Describe a lemon.\n")
    assert read_prompts(str(tmp_path / "prompts")) == [{"prompt": "Describe a lemon."}]
    (tmp_path / "d.md").write_text("Describe a lemon.\n")
    unknown = r"d.md: unknown prompt file suffix '\.md'; use \.txt or none .*\.jsonl .*\.json"
    with pytest.raises(ValueError, match=unknown):
        read_prompts(str(tmp_path / "d.md"))


def test_the_device_exists_before_the_model_loads(monkeypatch):
    torch = pytest.importorskip("torch")
    from somp_ref.adapters.preflight import check_device

    check_device("cpu")
    check_device("meta")
    with pytest.raises(ValueError, match=r"--device 'privateuseone:x'"):
        check_device("privateuseone:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--device cuda: no cuda device is available"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda:0")
    with pytest.raises(ValueError, match=r"--device cuda:5: there is 1 cuda device here"):
        check_device("cuda:5")
