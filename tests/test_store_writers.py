"""One writer per store whatever path names it (a symlink to it, a symlinked parent, ``..``),
the hidden copies an overwrite makes are never written by another writer, and a full disk is
an OSError naming the file."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError
from stores import write_planted_store

import somp_ref.store.safetensors_files as safetensors_files
import somp_ref.store.writing as writing
from somp_ref.store import ActivationStore, StoreError, layer_file

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX links, locks and limits")
LOCKED = r"is being written by another writer \(lock .*/runs/\.s\.lock\)"

HOLDER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from somp_ref.store import ActivationStore
    store = ActivationStore.create(sys.argv[1], n_layers=2, n_heads=1, d_head=2, d_model=3)
    store.write_layer(0, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    print("writing", flush=True)
    sys.stdin.read()
    store.write_layer(1, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    store.write_unembed(np.ones((5, 3)))
    store.write_samples([{"prompt": str(i)} for i in range(4)])
    store.close()
    """
)


def create(path, **kwargs) -> ActivationStore:
    return ActivationStore.create(path, n_layers=2, n_heads=1, d_head=2, d_model=3, **kwargs)


@posix_only
def test_a_second_writer_cannot_get_in_through_another_path_to_the_store(tmp_path):
    """Writer A (another process) holds runs/s; B tries it through a symlink to the store,
    a symlinked parent and a path through ``..``: refused, and A's store is A's alone."""
    real = tmp_path / "runs" / "s"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "latest").symlink_to(real)
    (tmp_path / "runs_link").symlink_to(tmp_path / "runs")
    (tmp_path / "runs" / "deep").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "sub").symlink_to(tmp_path / "runs" / "deep")
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(real)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout.readline() == b"writing\n"
        with pytest.raises(StoreError, match=r"latest is a symbolic link: refusing to write"):
            ActivationStore.resume(tmp_path / "other" / "latest")
        with pytest.raises(StoreError, match=r"latest is a symbolic link: refusing to write"):
            ActivationStore.resume(f"{tmp_path / 'other' / 'latest'}/")
        with pytest.raises(StoreError, match=r"latest is a symbolic link: refusing to write"):
            create(tmp_path / "other" / "latest", overwrite=True)
        for alias in (tmp_path / "runs_link" / "s", tmp_path / "x" / "sub" / ".." / "s"):
            with pytest.raises(StoreError, match=LOCKED):
                ActivationStore.resume(alias)
            with pytest.raises(StoreError, match=LOCKED):
                create(alias, overwrite=True)
    finally:
        child.communicate(b"")
    assert child.returncode == 0
    done = ActivationStore.open(tmp_path / "other" / "latest")  # reading through it is fine
    done.verify()
    assert np.array_equal(done.layer(1)[0], np.ones((4, 1, 2)))
    assert sorted(p.name for p in tmp_path.rglob(".*.lock")) == [".s.lock"]


def test_a_store_written_through_a_symlinked_parent_is_locked_and_swapped_at_the_real_place(
    tmp_path,
):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs_link").symlink_to(tmp_path / "runs")
    write_planted_store(tmp_path / "runs" / "s")
    with create(tmp_path / "runs_link" / "s", overwrite=True) as store:
        with pytest.raises(StoreError, match=LOCKED):
            ActivationStore.resume(tmp_path / "runs" / "s")
        for layer in range(2):
            store.write_layer(layer, z=np.full((4, 1, 2), 2.0), o_proj=np.ones((3, 2)))
        store.write_unembed(np.ones((5, 3)))
        store.write_samples([{}] * 4)
    assert ActivationStore.open(tmp_path / "runs" / "s").n_layers == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".s.lock", "s"]


# ---------------------------------------------------------------------- hidden siblings


def test_the_hidden_copy_an_overwrite_builds_cannot_be_written_by_another_writer(tmp_path):
    old = write_planted_store(tmp_path / "s")
    writer = create(old.path, overwrite=True)
    (building,) = tmp_path.glob(".s.new-*")
    hidden = r"is a hidden copy beside the store 's' \(the new store an overwrite of it is "
    with pytest.raises(StoreError, match=hidden + r"building\), not a store to write"):
        ActivationStore.resume(building)
    with pytest.raises(StoreError, match=hidden):
        create(building, overwrite=True)
    writer.write_layer(0, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    writer.write_layer(1, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    writer.write_unembed(np.ones((5, 3)))
    writer.write_samples([{}] * 4)
    writer.close()
    ActivationStore.open(old.path).verify()


@pytest.mark.parametrize("name", [".s.old-123-0badcafe", ".s.new-7-ab"])
def test_a_hidden_copy_name_is_never_resumed_or_created(tmp_path, name):
    hidden = tmp_path / name
    incomplete = create(hidden.with_name("elsewhere"))  # an incomplete store, moved there
    incomplete._lock.release()
    hidden.with_name("elsewhere").rename(hidden)
    with pytest.raises(StoreError, match=r"hidden copy beside the store 's' .*refusing it"):
        ActivationStore.resume(hidden)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StoreError, match=r"hidden copy beside the store 's'"):
        create(tmp_path / "runs" / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made, not runs/


# ---------------------------------------------------------------------- a full disk

FULL_DISK = textwrap.dedent(
    """
    import os, resource, signal, sys
    import numpy as np
    from somp_ref.store import ActivationStore
    store = ActivationStore.create(sys.argv[1], n_layers=1, n_heads=4, d_head=64, d_model=256)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    try:
        store.write_layer(0, z=np.ones((64, 4, 64)), o_proj=np.ones((256, 256)))
    except OSError as err:
        print(type(err).__name__, err.errno, err.filename, sep="|")
    print(*sorted(os.listdir(sys.argv[1])))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE with SIGXFSZ ignored")
def test_a_layer_write_on_a_full_disk_is_an_os_error_naming_the_file(tmp_path):
    path = tmp_path / "s"
    child = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr
    error, listing = child.stdout.splitlines()
    assert error == f"OSError|{errno.EFBIG}|{path / layer_file(0)}"
    assert listing == "meta.json"  # no temporary file left behind
    assert ActivationStore.resume(path).missing()[0] == layer_file(0)


@pytest.mark.parametrize(
    ("message", "code", "match"),
    [
        ("Error while serializing: I/O error: No space left on device (os error 28)", 28, None),
        ("Error while serializing: I/O error: File too large (os error 27)", 27, None),
        ("Error while serializing: something else", None, r"cannot write the file \(Error"),
    ],
)
def test_a_safetensors_write_error_becomes_an_os_error_naming_the_file(
    tmp_path, monkeypatch, message, code, match
):
    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(message)

    monkeypatch.setattr(safetensors_files, "save_file", failing)
    store = create(tmp_path / "s")
    with pytest.raises(OSError) as caught:
        store.write_layer(0, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    assert caught.value.errno == code
    if code is None:
        assert re.search(match, str(caught.value)) and layer_file(0) in str(caught.value)
    else:
        assert caught.value.filename == str(tmp_path / "s" / layer_file(0))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["meta.json"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_create_that_cannot_write_its_meta_json_leaves_nothing_behind(
    tmp_path, monkeypatch, overwrite
):
    if overwrite:
        write_planted_store(tmp_path / "s")
    before = sorted(p.name for p in tmp_path.iterdir())

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writing, "write_bytes_atomically", full_disk)
    with pytest.raises(OSError, match=r"No space left on device"):
        create(tmp_path / "s", overwrite=overwrite)
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == sorted({*before, ".s.lock"})  # no store, no hidden sibling; the lock stays
    monkeypatch.undo()
    assert create(tmp_path / "s", overwrite=overwrite).missing()[0] == layer_file(0)  # unlocked


# ---------------------------------------------------------------------- killed writes


def test_what_a_write_killed_inside_safetensors_leaves_is_the_stores_own(tmp_path):
    """safetensors writes a file's data to ``.tmpXXXXXX`` beside it, then renames it: a
    writer killed meanwhile leaves one, which must not make the store (or the hidden copy an
    overwrite was building) foreign forever."""
    old = write_planted_store(tmp_path / "s")
    (old.path / ".tmpAb3xZ9").write_bytes(b"half a layer")  # as a killed export left it
    stale = tmp_path / ".s.new-99999-0badcafe"  # as a killed overwrite left it
    stale.mkdir()
    (stale / layer_file(0)).write_bytes(b"a layer")
    (stale / ".tmpQ1w2E3").write_bytes(b"half a layer")
    with create(old.path, overwrite=True) as store:
        for layer in range(2):
            store.write_layer(layer, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
        store.write_unembed(np.ones((5, 3)))
        store.write_samples([{}] * 4)
    ActivationStore.open(old.path).verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", "s"]
    assert sorted(p.name for p in old.path.iterdir()) == sorted(
        ["meta.json", layer_file(0), layer_file(1), "unembed.safetensors", "samples.jsonl"]
    )
