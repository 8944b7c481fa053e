"""The store never loses or invents data: overwrite, one writer, schema, headers, finiteness."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stores import write_planted_store

from somp_ref.cli import main
from somp_ref.files import write_atomically
from somp_ref.store import META_FILE, UNEMBED_FILE, ActivationStore, StoreError, layer_file

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX files and signals")
LOCKED = r"is being written by another writer \(lock .*\.s\.lock\)"


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: a file's bytes, a symlink's target, or ``"<dir>"``."""
    found: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):  # does not descend into symlinked folders
        for name in dirs + files:
            entry = Path(folder) / name
            key = str(entry.relative_to(root))
            if entry.is_symlink():
                found[key] = f"-> {os.readlink(entry)}"
            else:
                found[key] = "<dir>" if entry.is_dir() else entry.read_bytes()
    return found


def create(path: Path, **kwargs) -> ActivationStore:
    """A 2-layer writer (1 head, d_head 2, d_model 3), unlike the 3-layer planted stores."""
    return ActivationStore.create(path, n_layers=2, n_heads=1, d_head=2, d_model=3, **kwargs)


def fill(store: ActivationStore, value: float = 1.0) -> None:
    """Write every part of a ``create`` store (4 samples)."""
    for layer in range(store.n_layers):
        store.write_layer(layer, z=np.full((4, 1, 2), value), o_proj=np.full((3, 2), value))
    store.write_unembed(np.full((5, 3), value), vocab=list("abcde"))
    store.write_samples([{"prompt": str(i)} for i in range(4)])


def listing(folder: Path) -> set[str]:
    return {entry.name for entry in folder.iterdir()}


# ---------------------------------------------------------------------- overwrite


@pytest.mark.parametrize(
    "files",
    [
        {"precious.txt": b"keep me"},
        {META_FILE: b'{"hello": "world"}', "precious.txt": b"keep me"},
        {META_FILE: b"not json at all"},
        {META_FILE: b'{"format": "somp_ref.activation_store", "format_version": 1}'},
    ],
    ids=["plain", "foreign-meta", "broken-meta", "meta-missing-keys"],
)
def test_overwrite_refuses_a_directory_that_is_not_a_store(tmp_path, files):
    target = tmp_path / "s"
    target.mkdir()
    for name, content in files.items():
        (target / name).write_bytes(content)
    before = snapshot(target)
    with pytest.raises(StoreError, match=r"exists and is not a store: refusing to overwrite"):
        create(target, overwrite=True)
    assert snapshot(target) == before
    assert listing(tmp_path) == {"s", ".s.lock"}  # the lock beside it is all that was made


@pytest.mark.parametrize(
    "make",
    [
        lambda path: (path / "notes.txt").write_text("mine"),
        lambda path: (path / "sub").mkdir(),
        lambda path: (path / "layer_000.safetensors.bak").write_text("mine"),
        lambda path: (path / "layer_003.safetensors").write_text("a 4th layer of a 3-layer store"),
        lambda path: os.symlink("/etc/hostname", path / "link"),
    ],
    ids=["file", "folder", "near-name", "layer-out-of-range", "symlink"],
)
def test_overwrite_refuses_a_store_holding_a_foreign_entry(tmp_path, make):
    store = write_planted_store(tmp_path / "s")
    make(store.path)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match=r"holds '.+', which is not part of a store: refusing"):
        create(store.path, overwrite=True)
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_file_and_a_symlinked_store(tmp_path):
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(StoreError, match=r"is not a directory: refusing to overwrite"):
        create(tmp_path / "file", overwrite=True)
    write_planted_store(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    before = snapshot(tmp_path / "real")
    for overwrite in (True, False):
        with pytest.raises(StoreError, match=r"link is a symbolic link: refusing"):
            create(tmp_path / "link", overwrite=overwrite)
    assert snapshot(tmp_path / "real") == before
    assert (tmp_path / "link").is_symlink()


def test_overwrite_swaps_the_new_store_in_at_close_and_deletes_only_the_old_ones_files(tmp_path):
    old = write_planted_store(tmp_path / "s")
    outside = tmp_path / "outside.safetensors"
    (old.path / layer_file(0)).rename(outside)  # the old store links out of itself
    (old.path / layer_file(0)).symlink_to(outside)
    kept = outside.read_bytes()
    writer = create(old.path, overwrite=True)
    fill(writer)
    assert json.loads((old.path / META_FILE).read_text())["n_layers"] == 3  # until close
    writer.close()
    new = ActivationStore.open(old.path)
    new.verify()
    assert new.n_layers == 2 and np.array_equal(new.layer(1)[0], np.ones((4, 1, 2)))
    assert outside.read_bytes() == kept  # the link was unlinked, not its target
    assert listing(tmp_path) == {"s", ".s.lock", "outside.safetensors"}


def test_an_empty_directory_is_used_in_place(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(StoreError, match=r"already exists \(pass overwrite=True"):
        create(tmp_path / "s")
    with create(tmp_path / "s", overwrite=True) as store:
        fill(store)
    ActivationStore.open(tmp_path / "s").verify()
    assert listing(tmp_path) == {"s", ".s.lock"}


@pytest.mark.parametrize("fail", ["raise", "missing-parts"])
def test_a_failed_overwrite_leaves_the_old_store_as_it_was(tmp_path, fail):
    old = write_planted_store(tmp_path / "s")
    before = snapshot(tmp_path)
    with pytest.raises((RuntimeError, StoreError), match=r"boom|cannot complete the store"):
        with create(old.path, overwrite=True) as store:
            store.write_layer(0, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
            if fail == "raise":
                raise RuntimeError("boom")
    assert snapshot(tmp_path) == before  # the half-built store beside it is gone too
    ActivationStore.open(old.path).verify()
    with create(old.path, overwrite=True) as store:  # the lock was released
        fill(store)
    assert ActivationStore.open(old.path).n_layers == 2


def test_close_refusing_missing_parts_keeps_the_writer_and_the_old_store(tmp_path):
    old = write_planted_store(tmp_path / "s")
    before = snapshot(old.path)
    store = create(old.path, overwrite=True)
    store.write_layer(0, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    with pytest.raises(StoreError, match=r"missing \['layer_001"):
        store.close()
    assert snapshot(old.path) == before
    fill(store)
    store.close()
    assert ActivationStore.open(old.path).n_layers == 2


def test_files_added_to_the_old_store_while_it_is_replaced_are_kept(tmp_path):
    old = write_planted_store(tmp_path / "s")
    store = create(old.path, overwrite=True)
    fill(store)
    (old.path / "notes.txt").write_text("written meanwhile")
    with pytest.warns(UserWarning, match=r"kept .*\.s\.old-.*: it holds files that are not"):
        store.close()
    ActivationStore.open(old.path).verify()
    (kept,) = tmp_path.glob(".s.old-*")
    assert listing(kept) == {"notes.txt"}  # the old store's own files went, the note stayed
    assert (kept / "notes.txt").read_text() == "written meanwhile"


def test_what_a_killed_write_leaves_is_the_stores_own_only_for_its_parts(tmp_path):
    """A write killed between creating its temporary file and renaming it leaves the file:
    the overwrite check counts one of a part or meta.json as the store's own (the swap
    deletes it with the old store), and one of any other name as foreign."""
    old = write_planted_store(tmp_path / "s")

    def leave_temporary(name: str) -> str:
        left = []

        def killed(handle):
            left.append(Path(handle.name).name)
            raise RuntimeError("killed")

        with pytest.raises(RuntimeError, match="killed"):
            write_atomically(old.path / name, killed)
        (old.path / left[0]).write_bytes(b"half written")  # as the killed writer left it
        return left[0]

    foreign = leave_temporary("notes.txt")
    with pytest.raises(StoreError, match=rf"holds '{re.escape(foreign)}', which is not part"):
        create(old.path, overwrite=True)
    (old.path / foreign).unlink()
    own = {leave_temporary(name) for name in (META_FILE, layer_file(2), "samples.jsonl")}
    assert own <= listing(old.path)
    with create(old.path, overwrite=True) as store:
        fill(store)
    ActivationStore.open(old.path).verify()
    assert listing(tmp_path) == {"s", ".s.lock"}  # the old store went, temporaries and all


OVERWRITER = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    import somp_ref.store.replacing as replacing
    from somp_ref.store import ActivationStore

    path, phase = sys.argv[1], sys.argv[2]
    die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    renames = []
    real_rename = os.rename

    def second_rename_dies(src, dst):
        renames.append(src)
        if len(renames) == 2:
            die()
        real_rename(src, dst)

    if phase == "before-swap":
        ActivationStore._swap_in = die
    elif phase == "between-renames":
        os.rename = second_rename_dies
    elif phase == "after-swap":
        replacing.remove_store_dir = die
    store = ActivationStore.create(path, n_layers=2, n_heads=1, d_head=2, d_model=3,
                                   overwrite=True)
    for layer in range(2):
        store.write_layer(layer, z=np.full((4, 1, 2), 2.0), o_proj=np.ones((3, 2)))
    store.write_unembed(np.ones((5, 3)))
    store.write_samples([{"prompt": str(i)} for i in range(4)])
    if phase == "writing":
        print("written", flush=True)
        time.sleep(60)
    store.close()
    """
)


@posix_only
def test_an_overwrite_killed_while_writing_leaves_the_old_store_and_no_stale_lock(tmp_path):
    old = write_planted_store(tmp_path / "s")
    before = snapshot(old.path)
    with subprocess.Popen(
        [sys.executable, "-c", OVERWRITER, str(old.path), "writing"],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout.readline() == "written\n"
            with pytest.raises(StoreError, match=LOCKED):
                create(old.path, overwrite=True)
        finally:
            child.send_signal(signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    assert snapshot(old.path) == before
    ActivationStore.open(old.path).verify()
    assert len(list(tmp_path.glob(".s.new-*"))) == 1  # what the killed writer left
    store = create(old.path, overwrite=True)  # the kernel dropped the dead writer's lock
    assert list(tmp_path.glob(".s.new-*")) == [store._dir]  # the stale one is gone
    fill(store)
    store.close()
    assert listing(tmp_path) == {"s", ".s.lock"}


@posix_only
@pytest.mark.parametrize("phase", ["before-swap", "between-renames", "after-swap"])
def test_an_overwrite_killed_while_swapping_loses_no_store(tmp_path, capsys, phase):
    old = write_planted_store(tmp_path / "s")
    before = snapshot(old.path)
    child = subprocess.run([sys.executable, "-c", OVERWRITER, str(old.path), phase])
    assert child.returncode == -signal.SIGKILL
    if phase == "between-renames":  # neither store is at the path; both are beside it
        assert not old.path.exists()
        (hidden_old,) = tmp_path.glob(".s.old-*")
        (hidden_new,) = tmp_path.glob(".s.new-*")
        assert hidden_old.name.replace(".old-", ".new-") == hidden_new.name  # one swap's
        assert snapshot(hidden_old) == before
        assert ActivationStore.open(hidden_new).n_layers == 2
        after = snapshot(hidden_new)
        copies = (
            rf"{re.escape(hidden_old.name)} holds the store that was there and "
            rf"{re.escape(hidden_new.name)} the store replacing it \(an overwrite stopped"
        )
        recover = r"Rename the one to keep to 's' to recover it"
        # Reading the path says where the stores are and how to recover one.
        for read in (ActivationStore.open, ActivationStore.resume):
            with pytest.raises(StoreError, match=rf"s: no such store directory; .*{copies}.*"):
                read(old.path)
        assert main(["inspect", str(old.path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(rf"{copies}.*{recover}", err), err
        # Writing the path is refused, whatever the writer asks, and every time: a new
        # store there would make the next overwrite delete both copies.
        for kwargs in ({}, {"overwrite": True}, {}, {"overwrite": True, "resumable": True}):
            with pytest.raises(StoreError, match=rf"refusing to write .*{copies}.*{recover}"):
                create(old.path, **kwargs)
        old.path.mkdir()  # a path made again by hand (or by an older somp_ref)
        with pytest.raises(StoreError, match=rf"s: an interrupted .* only copy .*: {copies}"):
            create(old.path, overwrite=True)
        old.path.rmdir()
        assert listing(tmp_path) == {hidden_old.name, hidden_new.name, ".s.lock"}
        assert snapshot(hidden_old) == before and snapshot(hidden_new) == after  # none lost
        return
    survivor = ActivationStore.open(old.path)
    survivor.verify()
    if phase == "before-swap":
        assert snapshot(old.path) == before
    else:
        assert survivor.n_layers == 2 and float(survivor.layer(0)[0][0, 0, 0]) == 2.0
    assert len(list(tmp_path.glob(".s.[no][el][wd]-*"))) == 1
    with create(old.path, overwrite=True) as store:
        fill(store)
    assert listing(tmp_path) == {"s", ".s.lock"}


@posix_only
@pytest.mark.parametrize("keep", ["old", "new"])
def test_either_copy_of_a_swap_stopped_between_its_renames_is_recovered_by_renaming_it(
    tmp_path, keep
):
    old = write_planted_store(tmp_path / "s")
    before = snapshot(old.path)
    child = subprocess.run([sys.executable, "-c", OVERWRITER, str(old.path), "between-renames"])
    assert child.returncode == -signal.SIGKILL
    (kept,) = tmp_path.glob(f".s.{keep}-*")
    (other,) = set(tmp_path.glob(".s.[no][el][wd]-*")) - {kept}
    kept.rename(old.path)  # what the error says to do
    survivor = ActivationStore.open(old.path)
    survivor.verify()
    if keep == "old":
        assert snapshot(old.path) == before
    else:
        assert survivor.n_layers == 2 and float(survivor.layer(0)[0][0, 0, 0]) == 2.0
    # The other copy is provably not the only one now: a replacement whose store is back in
    # place, or an old store whose replacement is in place. The next overwrite deletes it.
    assert listing(tmp_path) == {"s", ".s.lock", other.name}
    with create(old.path, overwrite=True) as store:
        fill(store)
    assert listing(tmp_path) == {"s", ".s.lock"}


def test_an_old_store_beside_a_path_that_holds_no_store_is_never_deleted(tmp_path):
    """A lone old copy (its replacement gone) is superseded only by a complete store at the
    path: beside a missing path, or an empty directory, it may be the only copy."""
    old = write_planted_store(tmp_path / "s")
    before = snapshot(old.path)
    hidden = tmp_path / ".s.old-1-0123abcd"
    old.path.rename(hidden)
    with pytest.raises(StoreError, match=r"s: no such store directory; .*\.s\.old-1-0123abcd"):
        ActivationStore.open(old.path)
    with pytest.raises(StoreError, match=r"it is missing; .*\.s\.old-1-0123abcd holds the"):
        create(old.path)
    old.path.mkdir()
    with pytest.raises(StoreError, match=r"may be the only copy of a store: \.s\.old-1-0123"):
        create(old.path, overwrite=True)
    assert snapshot(hidden) == before
    old.path.rmdir()
    hidden.rename(old.path)
    with create(old.path, overwrite=True) as store:
        fill(store)
    assert listing(tmp_path) == {"s", ".s.lock"}


# ---------------------------------------------------------------------- one writer

HOLDER = textwrap.dedent(
    """
    import sys
    from somp_ref.store import ActivationStore
    store = ActivationStore.create(sys.argv[1], n_layers=2, n_heads=1, d_head=2, d_model=3)
    print("locked", flush=True)
    sys.stdin.read()
    """
)


@posix_only
def test_a_second_writer_in_another_process_fails_at_once(tmp_path):
    path = tmp_path / "s"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(StoreError, match=LOCKED):
            create(path, overwrite=True)
        with pytest.raises(StoreError, match=LOCKED):
            ActivationStore.resume(path)
    finally:
        child.communicate("")
    assert child.returncode == 0
    store = ActivationStore.resume(path)  # the holder is gone: its store is resumable
    fill(store)
    store.close()
    ActivationStore.open(path).verify()


def test_a_second_writer_in_another_process_is_refused_while_this_one_writes(tmp_path):
    store = create(tmp_path / "s")
    child = subprocess.run(
        [sys.executable, "-c", HOLDER, str(tmp_path / "s")],
        input="",
        capture_output=True,
        text=True,
    )
    assert child.returncode != 0
    assert "is being written by another writer" in child.stderr
    fill(store)
    store.close()
    ActivationStore.open(tmp_path / "s").verify()


def test_two_writers_in_one_process_exclude_each_other(tmp_path):
    first = create(tmp_path / "s")
    with pytest.raises(StoreError, match=LOCKED):
        create(tmp_path / "s", overwrite=True)
    with pytest.raises(StoreError, match=LOCKED):
        ActivationStore.resume(tmp_path / "s")
    fill(first)
    first.close()  # releases the lock
    with create(tmp_path / "s", overwrite=True) as second:
        fill(second, 3.0)
    assert float(ActivationStore.open(tmp_path / "s").unembed()[0, 0]) == 3.0


# ---------------------------------------------------------------------- meta.json schema


def set_in(meta: dict, keys: tuple, value) -> dict:
    inner = meta
    for key in keys[:-1]:
        inner = inner[key]
    inner[keys[-1]] = value
    return meta


def drop(keys: tuple):
    def mutate(meta: dict) -> dict:
        inner = meta
        for key in keys[:-1]:
            inner = inner[key]
        del inner[keys[-1]]
        return meta

    return mutate


def setter(*keys_and_value):
    *keys, value = keys_and_value
    return lambda meta: set_in(meta, tuple(keys), value)


def add_file(name: str):
    return lambda meta: set_in(meta, ("files", name), meta["files"][layer_file(0)])


LAYER0 = layer_file(0)
SHAPES = r"must be an integer in \[1, \d+\]"
CORRUPT_META = [
    ("n_layers-huge", setter("n_layers", 10**12), r"n_layers " + SHAPES),
    ("n_layers-bool", setter("n_layers", True), r"n_layers " + SHAPES),
    ("n_layers-string", setter("n_layers", "3"), r"n_layers " + SHAPES),
    ("n_layers-zero", setter("n_layers", 0), r"n_layers " + SHAPES),
    ("n_heads-float", setter("n_heads", 4.0), r"n_heads " + SHAPES),
    ("d_head-negative", setter("d_head", -6), r"d_head " + SHAPES),
    ("d_model-huge", setter("d_model", 1 << 21), r"d_model " + SHAPES),
    ("n_samples-zero", setter("n_samples", 0), r"n_samples must be an integer"),
    ("n_samples-huge", setter("n_samples", 1 << 41), r"n_samples must be an integer"),
    ("n_samples-string", setter("n_samples", "40"), r"n_samples must be an integer"),
    ("n_samples-null", setter("n_samples", None), r"listed but n_samples is null"),
    ("dtype", setter("dtype", "int8"), r"dtype must be one of"),
    ("dtype-list", setter("dtype", ["float32"]), r"dtype must be one of"),
    ("complete-string", setter("complete", "yes"), r"complete must be true or false"),
    ("complete-int", setter("complete", 1), r"complete must be true or false"),
    ("files-list", setter("files", []), r"files must be an object"),
    ("name-dotdot", add_file("../layer_000.safetensors"), r"not a part of a 3-layer store"),
    ("name-absolute", add_file("/dev/zero"), r"not a part"),
    ("name-out-of-range", add_file(layer_file(3)), r"'layer_003.safetensors', not a part"),
    ("name-unpadded", add_file("layer_1.safetensors"), r"not a part"),
    ("name-overpadded", add_file("layer_0001.safetensors"), r"not a part"),
    ("name-unicode-digits", add_file("layer_\u0660\u0660\u0661.safetensors"), r"not a part"),
    ("name-meta", add_file(META_FILE), r"not a part"),
    ("bytes-negative", setter("files", LAYER0, "bytes", -1), r"bytes must be an integer"),
    ("bytes-bool", setter("files", LAYER0, "bytes", True), r"bytes must be an integer"),
    ("bytes-string", setter("files", LAYER0, "bytes", "9"), r"bytes must be an integer"),
    ("bytes-too-few", setter("files", LAYER0, "bytes", 100), r"its shapes need at least"),
    ("sha-not-hex", setter("files", LAYER0, "sha256", "x" * 64), r"sha256 must be 64 lowercase"),
    ("sha-upper", setter("files", LAYER0, "sha256", "A" * 64), r"sha256 must be 64 lowercase"),
    ("sha-missing", drop(("files", LAYER0, "sha256")), r"must be \{bytes, sha256\}"),
    ("entry-extra", setter("files", LAYER0, "mode", 1), r"must be \{bytes, sha256\}"),
    ("entry-number", setter("files", LAYER0, 5), r"must be \{bytes, sha256\}"),
    ("too-few-files", drop(("files", "samples.jsonl")), r"lists 5 files, this one 4"),
    ("key-missing", drop(("n_heads",)), r"missing keys \['n_heads'\]"),
    ("version-bool", setter("format_version", True), r"format version True"),
    ("version-string", setter("format_version", "1"), r"format version '1'"),
    ("format-missing", drop(("format",)), r"not a somp_ref.activation_store meta file"),
    ("model_id-number", setter("model_id", 5), r"model_id must be a string"),
    ("prompts_hash", setter("prompts_hash", "abc"), r"prompts_hash must be 64 lowercase hex"),
    ("chat_template", setter("chat_template", "yes"), r"chat_template must be true or false"),
]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [case[1:] for case in CORRUPT_META],
    ids=[case[0] for case in CORRUPT_META],
)
def test_a_meta_json_out_of_the_schema_is_refused(tmp_path, mutate, match):
    store = write_planted_store(tmp_path / "s")
    meta = json.loads((store.path / META_FILE).read_text())
    (store.path / META_FILE).write_text(json.dumps(mutate(meta)))
    with pytest.raises(StoreError, match=match):
        ActivationStore.open(store.path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{", r"unreadable"),
        (b"[]", r"not a somp_ref.activation_store meta file"),
        (b"[" * 100_000, r"unreadable"),  # nested past the recursion limit
        (b'{"n_layers": 1' + b"0" * 5000 + b"}", r"unreadable"),  # int past 4300 digits
        (b'{"format": "\xff"}', r"unreadable"),
    ],
    ids=["truncated", "list", "deep", "long-int", "not-utf8"],
)
def test_an_unreadable_meta_json_is_refused(tmp_path, content, match):
    store = write_planted_store(tmp_path / "s")
    (store.path / META_FILE).write_bytes(content)
    with pytest.raises(StoreError, match=match):
        ActivationStore.open(store.path)


def test_an_oversized_meta_json_is_refused_unread(tmp_path):
    store = write_planted_store(tmp_path / "s")
    with (store.path / META_FILE).open("r+b") as handle:  # sparse: 64 MiB cost nothing
        handle.seek(64 << 20)
        handle.write(b" ")
    with pytest.raises(StoreError, match=r"meta.json: over 67108864 bytes"):
        ActivationStore.open(store.path)


@posix_only
@pytest.mark.parametrize("name", [META_FILE, LAYER0, "samples.jsonl"])
@pytest.mark.parametrize("kind", ["symlink-to-copy", "symlink-to-device", "fifo", "folder"])
def test_store_files_must_be_regular_files(tmp_path, name, kind):
    store = write_planted_store(tmp_path / "s")
    target = store.path / name
    copy = tmp_path / "copy"
    target.rename(copy)
    if kind == "symlink-to-copy":  # same bytes and size: only the file type is wrong
        target.symlink_to(copy)
    elif kind == "symlink-to-device":
        target.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(target)  # reading it would block forever
    else:
        target.mkdir()
    with pytest.raises(StoreError, match=r"(a symbolic link|not a regular file); a store holds"):
        ActivationStore.open(store.path).samples()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_layers": 0}, r"n_layers must be an integer in \[1, 4096\], got 0"),
        ({"n_layers": 10**12}, r"n_layers must be an integer in \[1, 4096\]"),
        ({"n_heads": True}, r"n_heads must be an integer"),
        ({"d_head": 2.0}, r"d_head must be an integer"),
        ({"dtype": "bfloat16"}, r"dtype must be one of"),
        ({"meta": {"model_id": None}}, r"model_id must be a string, got None"),
    ],
)
def test_create_refuses_what_the_schema_refuses(tmp_path, kwargs, match):
    args = {"n_layers": 2, "n_heads": 1, "d_head": 2, "d_model": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        ActivationStore.create(tmp_path / "s", **args)
    assert not (tmp_path / "s").exists()


def test_create_keeps_the_store_keys_over_the_callers_facts(tmp_path):
    with ActivationStore.create(
        tmp_path / "s",
        n_layers=2,
        n_heads=1,
        d_head=2,
        d_model=3,
        meta={"format": "mine", "complete": True, "model_id": "m"},
    ) as store:
        fill(store)
    meta = ActivationStore.open(tmp_path / "s").meta
    assert meta["format"] == "somp_ref.activation_store" and meta["model_id"] == "m"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
META_PLACES = [
    (key,) for key in ("n_layers", "n_heads", "d_head", "d_model", "dtype", "n_samples", "complete")
] + [("files",), ("files", LAYER0), ("files", LAYER0, "bytes"), ("files", LAYER0, "sha256")]


def read_everything(path: Path) -> None:
    store = ActivationStore.open(path)
    store.verify()
    for layer in range(store.n_layers):
        store.layer(layer)
    store.vocab()
    store.final_norm()
    store.samples()


def test_any_meta_value_is_accepted_or_refused_with_a_store_error(tmp_path):
    store = write_planted_store(tmp_path / "s")
    good = (store.path / META_FILE).read_text()

    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(place=st.sampled_from(META_PLACES), value=JSON_VALUES)
    def check(place, value):
        (store.path / META_FILE).write_text(json.dumps(set_in(json.loads(good), place, value)))
        try:
            read_everything(store.path)
        except StoreError:
            pass

    check()


# ---------------------------------------------------------------------- safetensors headers


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(header: dict | list, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def replace_file(store_path: Path, name: str, content: bytes) -> None:
    """Put ``content`` in place of a part and record it in meta.json, as if written so."""
    (store_path / name).write_bytes(content)
    meta = json.loads((store_path / META_FILE).read_text())
    meta["files"][name] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (store_path / META_FILE).write_text(json.dumps(meta))


def tensor(header: dict, rank: int) -> dict:
    """The header entry of the ``rank``-th tensor by data offset."""
    entries = [info for name, info in header.items() if name != "__metadata__"]
    return sorted(entries, key=lambda info: info["data_offsets"])[rank]


def shift(info: dict, by: int) -> None:
    info["data_offsets"] = [offset + by for offset in info["data_offsets"]]


def edit(change):
    def mutate(header: dict, data: bytes) -> bytes:
        result = change(header, data)  # edits the header in place, or returns the file
        return result if isinstance(result, bytes) else join(header, data)

    return mutate


CORRUPT_HEADERS = [
    ("overlap", edit(lambda h, d: shift(tensor(h, 1), -8)), r"overlaps the tensor before it"),
    ("gap", edit(lambda h, d: shift(tensor(h, 1), 8)), r"leaves a gap"),
    ("past-the-end", edit(lambda h, d: join(h, d[:-8])), r"past the end of the file"),
    ("trailing-bytes", edit(lambda h, d: join(h, d + bytes(8))), r"with trailing bytes"),
    (
        "negative-offset",
        edit(lambda h, d: set_in(tensor(h, 0), ("data_offsets", 0), -4)),
        r"invalid data_offsets",
    ),
    (
        "start-after-end",
        edit(lambda h, d: tensor(h, 1)["data_offsets"].reverse()),
        r"invalid data_offsets",
    ),
    (
        "three-offsets",
        edit(lambda h, d: tensor(h, 0)["data_offsets"].append(0)),
        r"invalid data_offsets",
    ),
    (
        "shape-vs-bytes",
        edit(lambda h, d: set_in(tensor(h, 0), ("shape", 0), tensor(h, 0)["shape"][0] + 1)),
        r"bytes, its dtype and shape need",
    ),
    ("zero-dim", edit(lambda h, d: set_in(tensor(h, 0), ("shape", 0), 0)), r"invalid shape"),
    ("bool-dim", edit(lambda h, d: set_in(tensor(h, 0), ("shape", 0), True)), r"invalid shape"),
    ("float-dim", edit(lambda h, d: set_in(tensor(h, 0), ("shape", 0), 2.0)), r"invalid shape"),
    ("shape-string", edit(lambda h, d: set_in(tensor(h, 0), ("shape",), "3")), r"invalid shape"),
    ("bf16", edit(lambda h, d: set_in(tensor(h, 0), ("dtype",), "BF16")), r"unsupported dtype"),
    ("i64", edit(lambda h, d: set_in(tensor(h, 0), ("dtype",), "I64")), r"unsupported dtype"),
    ("dtype-list", edit(lambda h, d: set_in(tensor(h, 0), ("dtype",), ["F32"])), r"unsupported"),
    ("entry-number", edit(lambda h, d: set_in(h, ("z",), 5)), r"entry is not an object"),
    (
        "metadata-number",
        edit(lambda h, d: set_in(h, ("__metadata__", "layer"), 0)),
        r"__metadata__ is not all strings",
    ),
    ("header-list", edit(lambda h, d: join([h], d)), r"not a JSON object"),
    (
        "header-longer-than-file",
        edit(lambda h, d: struct.pack("<Q", len(join(h, d))) + join(h, d)[8:]),
        r"corrupt safetensors header \(length",
    ),
    (
        "header-not-utf8",
        edit(lambda h, d: struct.pack("<Q", 2) + b"\xff\xfe" + d),
        r"corrupt safetensors header",
    ),
    (
        "header-deep",
        edit(lambda h, d: struct.pack("<Q", 100_000) + b"[" * 100_000 + d),
        r"corrupt safetensors header",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [case[1:] for case in CORRUPT_HEADERS],
    ids=[case[0] for case in CORRUPT_HEADERS],
)
def test_a_corrupt_safetensors_header_is_refused_by_name(tmp_path, mutate, match):
    from somp_ref.store.safetensors_files import map_tensors

    store = write_planted_store(tmp_path / "s")
    header, data = split(store.path / LAYER0)
    replace_file(store.path, LAYER0, mutate(header, data))
    # Opening reads every header; mapping the file (a reader's later read) checks it again.
    with pytest.raises(StoreError, match=r"layer_000.safetensors: .*" + match):
        ActivationStore.open(store.path)
    with pytest.raises(StoreError, match=r"layer_000.safetensors: .*" + match):
        map_tensors(store.path / LAYER0)


def test_a_stored_z_of_another_dtype_than_meta_says_is_refused(tmp_path):
    store = write_planted_store(tmp_path / "s", dtype="float32")
    meta = json.loads((store.path / META_FILE).read_text())
    (store.path / META_FILE).write_text(json.dumps(meta | {"dtype": "float16"}))
    with pytest.raises(StoreError, match=r"z is float32, meta.json says float16"):
        ActivationStore.open(store.path).layer(0)


def test_any_header_byte_flip_is_read_or_refused_with_a_store_error(tmp_path):
    store = write_planted_store(tmp_path / "s")
    good = (store.path / LAYER0).read_bytes()
    (length,) = struct.unpack("<Q", good[:8])

    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(at=st.integers(0, 8 + length - 1), byte=st.integers(0, 255))
    def check(at, byte):  # recorded as if written so: the header checks are what is tested
        replace_file(store.path, LAYER0, good[:at] + bytes([byte]) + good[at + 1 :])
        try:
            z, o_proj = ActivationStore.open(store.path).layer(0)
            float(z.sum() + o_proj.sum())  # what was mapped can be read
        except StoreError:
            pass

    check()


@pytest.mark.parametrize(
    ("vocab", "match"),
    [
        (json.dumps(["a"] * 59), r"59 vocabulary strings for 60 unembedding rows"),
        (json.dumps(["a"] * 61), r"61 vocabulary strings for 60 unembedding rows"),
        (json.dumps([1] * 60), r"the vocabulary is not a list of strings"),
        (json.dumps({"a": 1}), r"the vocabulary is not a list of strings"),
        ("[", r"unreadable vocabulary"),
    ],
)
def test_the_vocabulary_has_one_string_per_unembedding_row(tmp_path, vocab, match):
    store = write_planted_store(tmp_path / "s")
    header, data = split(store.path / UNEMBED_FILE)
    header["__metadata__"]["vocab"] = vocab
    replace_file(store.path, UNEMBED_FILE, join(header, data))
    reopened = ActivationStore.open(store.path)
    assert reopened.unembed().shape == (60, 24)
    with pytest.raises(StoreError, match=r"unembed.safetensors: " + match):
        reopened.vocab()


# ---------------------------------------------------------------------- finite values


def test_a_non_finite_z_is_refused_naming_layer_sample_and_head(tmp_path):
    store = ActivationStore.create(tmp_path / "s", n_layers=4, n_heads=3, d_head=2, d_model=5)
    z = np.ones((20, 3, 2))
    z[17, 2, 1] = np.nan
    z[18, 0, 0] = np.inf  # later: the first one is named
    with pytest.raises(
        ValueError, match=r"^layer 3: z is not finite at sample 17, head 2 \(nan\)$"
    ):
        store.write_layer(3, z=z, o_proj=np.ones((5, 6)))
    assert layer_file(3) in store.missing() and not (store._dir / layer_file(3)).exists()


def test_a_value_that_overflows_the_store_dtype_is_refused(tmp_path):
    store = ActivationStore.create(
        tmp_path / "s", n_layers=1, n_heads=1, d_head=2, d_model=3, dtype="float16"
    )
    z = np.ones((4, 1, 2))
    z[2, 0, 1] = 1e6
    with pytest.raises(
        ValueError,
        match=r"layer 0: z is not finite at sample 2, head 0 "
        r"\(inf after conversion to float16 from 1000000\.0\)",
    ):
        store.write_layer(0, z=z, o_proj=np.ones((3, 2)))


@pytest.mark.parametrize(
    ("tensor_name", "index", "match"),
    [
        ("o_proj", (1, 4), r"layer 0: o_proj is not finite at row 1, column 4 \(-inf\)"),
        ("bias", (2,), r"layer 0: bias is not finite at row 2 \(-inf\)"),
        ("unembed", (3, 1), r"^unembed is not finite at row 3, column 1 \(-inf\)"),
        ("final_norm", (0,), r"^final_norm is not finite at row 0 \(-inf\)"),
    ],
)
def test_non_finite_weights_are_refused_naming_row_and_column(tmp_path, tensor_name, index, match):
    store = ActivationStore.create(tmp_path / "s", n_layers=1, n_heads=3, d_head=2, d_model=5)
    weights = {"o_proj": np.ones((5, 6)), "bias": np.ones(5)}
    weights |= {"unembed": np.ones((7, 5)), "final_norm": np.ones(5)}
    weights[tensor_name][index] = -np.inf
    with pytest.raises(ValueError, match=match):
        store.write_layer(0, z=np.ones((4, 3, 2)), o_proj=weights["o_proj"], bias=weights["bias"])
        store.write_unembed(weights["unembed"], final_norm=weights["final_norm"])
    assert store.missing()[-1] == "samples.jsonl" and "unembed.safetensors" in store.missing()
