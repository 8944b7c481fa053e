"""Atomic outputs: a failed write leaves the previous file byte-identical, no temp file."""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest

from somp_ref import files, user_files
from somp_ref.files import (
    check_distinct_outputs,
    check_output_dir,
    check_output_file,
    check_outside,
    output_target,
    write_all_atomically,
    write_atomically,
    write_bytes_atomically,
    write_text_atomically,
)
from somp_ref.heads import HeadScores
from somp_ref.user_files import read_user_text

PREVIOUS = b"previous content\n"


@pytest.fixture
def previous(tmp_path):
    """A file with known bytes, alone in its directory."""
    path = tmp_path / "out.csv"
    path.write_bytes(PREVIOUS)
    return path


def assert_untouched(path):
    assert path.read_bytes() == PREVIOUS
    assert os.listdir(path.parent) == [path.name], "a temporary file was left behind"


def small_scores() -> HeadScores:
    ev = np.array([[0.5, np.nan], [0.9, 0.1]])
    supports = {(0, 0): np.array([3]), (1, 0): np.array([4, 5]), (1, 1): np.array([6])}
    increments = {key: np.full(ids.size, 0.1) for key, ids in supports.items()}
    return HeadScores(ev, supports, increments, "somp", {"n_atoms": 2}, np.array([3, 4, 5, 6]))


def test_writes_and_replaces_without_leftovers(previous):
    write_text_atomically(previous, "new, ünïcode\n")
    assert previous.read_bytes() == "new, ünïcode\n".encode()
    write_bytes_atomically(previous, b"\x00\x01")
    assert previous.read_bytes() == b"\x00\x01"
    assert os.listdir(previous.parent) == [previous.name]


def test_a_writer_that_fails_midway_leaves_the_previous_file(previous):
    def write(handle):
        handle.write(b"half of the new content")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        write_atomically(previous, write)
    assert_untouched(previous)


@pytest.mark.parametrize("method", ["to_csv", "to_json"])
def test_head_scores_writers_are_atomic(previous, monkeypatch, method):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"No space left on device.*out.csv"):
        getattr(small_scores(), method)(previous)
    assert_untouched(previous)


def test_plots_are_atomic(previous, monkeypatch):
    pytest.importorskip("matplotlib")
    from somp_ref.plots import head_heatmap

    image = previous.with_name("heat.png")
    head_heatmap(np.eye(3), image, title="first")
    before = image.read_bytes()
    assert before.startswith(b"\x89PNG")

    def failing_rename(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.os, "replace", failing_rename)
    with pytest.raises(OSError, match="heat.png"):
        head_heatmap(np.ones((3, 3)), image, title="second")
    assert image.read_bytes() == before
    assert sorted(os.listdir(image.parent)) == ["heat.png", "out.csv"]


def test_a_full_disk_leaves_the_previous_file(previous):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes writes past 4 KiB
    fail with EFBIG, as a full disk fails them with ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as caught:
            write_bytes_atomically(previous, b"x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert caught.value.errno == errno.EFBIG
    assert caught.value.filename == str(previous)  # the target, not the temporary file
    assert_untouched(previous)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_leaves_the_previous_file(previous):
    previous.parent.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            write_text_atomically(previous, "new")
    finally:
        previous.parent.chmod(0o755)
    assert_untouched(previous)


def test_refuses_directories_and_missing_folders(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory, expected a file name"):
        write_text_atomically(tmp_path / "folder", "x")
    assert list((tmp_path / "folder").iterdir()) == []
    with pytest.raises(FileNotFoundError, match=r"directory .*nowhere does not exist"):
        check_output_file(tmp_path / "nowhere" / "x.csv")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        check_output_file(tmp_path / "file" / "x.csv")


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"  # creatable
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        check_output_dir(tmp_path / "file" / "sub" / "dir")


def test_read_user_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfred\n")
    assert read_user_text(tmp_path / "bom.txt", "list") == "red\n"
    (tmp_path / "bin.txt").write_bytes(b"ok\n\x80")
    with pytest.raises(ValueError, match=r"bin.txt: not a UTF-8 text list \(byte 3 is 0x80\)"):
        read_user_text(tmp_path / "bin.txt", "list")
    with pytest.raises(IsADirectoryError, match="expected a list"):
        read_user_text(tmp_path, "list")
    with pytest.raises(FileNotFoundError, match="list does not exist"):
        read_user_text(tmp_path / "missing.txt", "list")


def test_read_user_text_refuses_what_is_not_a_regular_file(tmp_path):
    """A FIFO would block the reader (no writer) and a device never ends: both are refused
    before a byte is read, at once."""
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match=r"fifo: not a regular file \(a FIFO, device"):
        read_user_text(tmp_path / "fifo", "list")
    for device in ("/dev/zero", "/dev/urandom", "/dev/null"):
        with pytest.raises(ValueError, match=f"{device}: not a regular file"):
            read_user_text(device, "list")
    with pytest.raises(FileNotFoundError, match="an empty file name"):
        read_user_text("", "list")


def test_open_checked_closes_what_it_refuses_and_can_refuse_a_link(tmp_path):
    """The opened file is what is checked; a refused one leaves no descriptor open, and a
    symbolic link is refused on request (the store's reader) or followed (user files)."""
    (tmp_path / "file").write_bytes(b"data")
    os.symlink(tmp_path / "file", tmp_path / "link")
    open_before = len(os.listdir("/proc/self/fd"))

    def refuse(info: os.stat_result) -> None:
        raise ValueError(f"refused a file of {info.st_size} bytes")

    with pytest.raises(ValueError, match="refused a file of 4 bytes"):
        user_files.open_checked(tmp_path / "file", refuse)
    assert len(os.listdir("/proc/self/fd")) == open_before
    with pytest.raises(OSError, match="link") as caught:
        user_files.open_checked(tmp_path / "link", lambda info: None, follow_symlinks=False)
    assert caught.value.errno in (errno.ELOOP, errno.EMLINK)
    with user_files.open_checked(tmp_path / "link", lambda info: None) as handle:
        assert handle.read() == b"data"


def test_read_user_text_caps_the_size(tmp_path):
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 101)
    assert read_user_text(big, "list", max_bytes=101) == "x" * 101
    with pytest.raises(ValueError, match=r"big.txt: 101 bytes, more than the 100 a list"):
        read_user_text(big, "list", max_bytes=100)
    assert user_files.MAX_USER_FILE_BYTES == 64 << 20


def test_output_paths_that_are_not_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="an empty output path"):
        check_output_file("")
    with pytest.raises(IsADirectoryError, match="ends with a '/'"):
        check_output_file(f"{tmp_path}/o.csv/")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="fifo: exists and is not a regular file"):
        check_output_file(tmp_path / "fifo")
    with pytest.raises(ValueError, match="null: exists and is not a regular file"):
        check_output_file("/dev/null")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing" / "x.csv")
    with pytest.raises(FileNotFoundError, match=r"directory .*missing does not exist"):
        check_output_file(tmp_path / "dangling")


def test_an_output_symlink_resolves_to_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link.csv").symlink_to(tmp_path / "real" / "target.csv")
    assert output_target(tmp_path / "link.csv") == tmp_path / "real" / "target.csv"
    assert output_target(tmp_path / "plain.csv") == tmp_path / "plain.csv"


def test_outputs_inside_a_folder_or_twice_the_same_are_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    check_outside("--out", tmp_path / "o.csv", store, "the store")
    check_outside("--out", tmp_path / "store-colors.csv", store, "the store")  # a sibling
    with pytest.raises(ValueError, match=r"--out .*meta.json is inside the store"):
        check_outside("--out", store / "meta.json", store, "the store")
    with pytest.raises(ValueError, match=r"--out .*store is the store itself"):
        check_outside("--out", store, store, "the store")
    (tmp_path / "into").symlink_to(store / "meta.json")
    with pytest.raises(ValueError, match="is inside the store"):
        check_outside("--out", tmp_path / "into", store, "the store")
    check_distinct_outputs({"--out": tmp_path / "a", "--json-out": tmp_path / "b", "--plot": None})
    (tmp_path / "alias").symlink_to(tmp_path / "a")
    with pytest.raises(ValueError, match="--out and --json-out are the same file"):
        check_distinct_outputs({"--out": tmp_path / "a", "--json-out": tmp_path / "alias"})


def test_write_all_atomically_writes_every_file(tmp_path):
    (tmp_path / "target.csv").write_bytes(PREVIOUS)
    (tmp_path / "link.csv").symlink_to(tmp_path / "target.csv")
    seen = []

    def writer(data):
        def write(path):
            seen.append(path.name)
            write_bytes_atomically(path, data)

        return write

    written = write_all_atomically(
        [(tmp_path / "link.csv", writer(b"csv")), (tmp_path / "p.png", writer(b"png"))]
    )
    assert written == [tmp_path / "target.csv", tmp_path / "p.png"]
    assert (tmp_path / "link.csv").is_symlink()
    assert (tmp_path / "target.csv").read_bytes() == b"csv"
    assert (tmp_path / "p.png").read_bytes() == b"png"
    assert all(name.startswith(".") for name in seen)
    assert [name.rsplit(".", 1)[1] for name in seen] == ["csv", "png"]  # suffixes kept
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "p.png", "target.csv"]
    with pytest.raises(ValueError, match="are the same file"):
        write_all_atomically(
            [(tmp_path / "link.csv", writer(b"1")), (tmp_path / "target.csv", writer(b"2"))]
        )
    assert (tmp_path / "target.csv").read_bytes() == b"csv"


def test_a_full_disk_leaves_every_previous_file_of_a_group(tmp_path):
    """The first file fits under the file-size limit, the second does not: neither target
    is replaced, and no temporary file is left."""
    first, second = tmp_path / "first.csv", tmp_path / "second.json"
    first.write_bytes(PREVIOUS)
    second.write_bytes(PREVIOUS)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as caught:
            write_all_atomically(
                [
                    (first, lambda path: write_bytes_atomically(path, b"x" * 100)),
                    (second, lambda path: write_bytes_atomically(path, b"y" * 100_000)),
                ]
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert caught.value.errno == errno.EFBIG
    assert caught.value.filename == str(second)  # the target, not a temporary file
    assert first.read_bytes() == PREVIOUS and second.read_bytes() == PREVIOUS
    assert sorted(os.listdir(tmp_path)) == ["first.csv", "second.json"]


def test_a_writer_that_crashes_leaves_every_previous_file(tmp_path):
    first = tmp_path / "first.csv"
    first.write_bytes(PREVIOUS)

    def crash(path):
        path.write_bytes(b"half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash"):
        write_all_atomically(
            [(first, lambda path: path.write_bytes(b"new")), (tmp_path / "b", crash)]
        )
    assert_untouched(first)


@pytest.fixture
def name_events(monkeypatch):
    """Every rename, replace and mkdir (the directory it changes) and every fsync (what
    was synced), in order. Linux: the synced path is read from /proc/self/fd."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to see what an fsync synced")
    events: list[tuple[str, str]] = []
    real = {name: getattr(os, name) for name in ("replace", "rename", "mkdir", "fsync")}

    def changes(name):
        def call(src, dst=None, *args, **kwargs):
            result = real[name](src, *([dst] if dst is not None else []), *args, **kwargs)
            changed = dst if dst is not None else src
            events.append(("changes", os.path.dirname(os.path.abspath(changed))))
            return result

        return call

    def fsync(fd):
        events.append(("syncs", os.readlink(f"/proc/self/fd/{fd}")))
        return real["fsync"](fd)

    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, changes(name))
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: changes("mkdir")(path, None, *a, **k))
    monkeypatch.setattr(os, "fsync", fsync)
    return events


def unsynced(events: list[tuple[str, str]]) -> list[str]:
    """Directories changed by a name event that no later fsync of the directory covers."""
    left = []
    for number, (kind, directory) in enumerate(events):
        if kind == "changes" and ("syncs", directory) not in events[number + 1 :]:
            left.append(directory)
    return left


def test_every_new_name_is_synced_before_the_writer_returns(tmp_path, name_events):
    """A rename is durable only once its directory is synced: an output, a group of
    outputs, a new store, a store written batch by batch and an overwritten store."""
    from stores import write_planted_store

    from somp_ref.store import ActivationStore
    from somp_ref.store.row_appending import RowWriter

    write_text_atomically(tmp_path / "a.txt", "a")
    (tmp_path / "sub").mkdir()
    name_events.clear()
    write_all_atomically(
        [
            (tmp_path / "b.txt", lambda p: p.write_text("b")),
            (tmp_path / "sub" / "c.txt", lambda p: p.write_text("c")),
        ]
    )
    assert name_events and unsynced(name_events) == []
    name_events.clear()
    write_planted_store(tmp_path / "store")
    write_planted_store(tmp_path / "new" / "parents" / "store")  # made with its parents
    assert unsynced(name_events) == []
    name_events.clear()
    rng = np.random.default_rng(0)
    with ActivationStore.create(
        tmp_path / "rows", n_layers=1, n_heads=2, d_head=3, d_model=4
    ) as store:
        writer = RowWriter.start(store, lambda layer: (rng.standard_normal((4, 6)), None))
        writer.append([rng.standard_normal((5, 2, 3)).astype(np.float32)], [{}] * 5, {})
        writer.finish()
        store.write_unembed(rng.standard_normal((7, 4)))
    assert unsynced(name_events) == []
    name_events.clear()
    with ActivationStore.create(
        tmp_path / "store", n_layers=1, n_heads=1, d_head=2, d_model=3, overwrite=True
    ) as store:
        store.write_layer(0, z=rng.standard_normal((4, 1, 2)), o_proj=rng.standard_normal((3, 2)))
        store.write_unembed(rng.standard_normal((5, 3)))
        store.write_samples([{}] * 4)
    assert any(kind == "changes" for kind, _ in name_events)
    assert unsynced(name_events) == []


def test_a_directory_that_cannot_be_synced_is_no_error_but_a_disk_error_is(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell a directory's fsync from a file's")
    real_fsync = os.fsync

    def failing(code):
        def fsync(fd):
            if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(code, os.strerror(code))
            return real_fsync(fd)

        return fsync

    monkeypatch.setattr(os, "fsync", failing(errno.EINVAL))  # a file system without it
    write_text_atomically(tmp_path / "a.txt", "a")
    assert (tmp_path / "a.txt").read_text() == "a"
    monkeypatch.setattr(os, "fsync", failing(errno.EIO))  # the disk failed: say so
    with pytest.raises(OSError) as raised:
        write_text_atomically(tmp_path / "b.txt", "b")
    assert raised.value.errno == errno.EIO
    monkeypatch.setattr(os, "fsync", real_fsync)
    with pytest.raises(NotADirectoryError):  # a caller's mistake is not swallowed
        files.sync_directory(tmp_path / "a.txt")


@pytest.mark.parametrize("name", ["plot", ".hidden", "heat.png", "runs.v2.png", "a.tar.gz"])
def test_each_temporary_file_has_its_targets_suffix_and_no_other(tmp_path, name):
    seen = []

    def write(temporary: Path) -> None:
        seen.append(temporary)
        temporary.write_bytes(b"x")

    write_all_atomically([(tmp_path / name, write)])
    assert seen[0].suffix == Path(name).suffix and seen[0].parent == tmp_path
    assert sorted(os.listdir(tmp_path)) == [name]


def test_a_plot_named_without_an_extension_is_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    from somp_ref.plots import _pyplot, save_figure

    figure = _pyplot().figure()
    write_all_atomically(
        [(tmp_path / "plot", lambda temporary: save_figure(figure, temporary, dpi=20))]
    )
    assert (tmp_path / "plot").read_bytes().startswith(b"\x89PNG")
