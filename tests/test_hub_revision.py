"""Hub ids are pinned to a commit through huggingface_hub, online or from the cache.

Nothing here reaches the network: ``HfApi`` is replaced by a stand-in, the Hugging Face
cache is a temporary folder laid out as the hub lays it out, and transformers is a stub
that records what it was asked to load.
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub import constants  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from somp_ref.adapters import models  # noqa: E402
from somp_ref.adapters.models import ModelLoadError, ModelSource  # noqa: E402

REPO = "owner/tiny-model"
SHA = "0123456789abcdef0123456789abcdef01234567"
CACHED_SHA = "fedcba9876543210fedcba9876543210fedcba98"


class Hub:
    """Stands in for ``HfApi``: answers ``model_info`` with ``sha`` or raises ``error``."""

    def __init__(self):
        self.asked: list[tuple[str, str | None]] = []
        self.sha: str | None = SHA
        self.error: Exception | None = None

    def __call__(self):  # HfApi()
        return self

    def model_info(self, repo_id: str, *, revision: str | None = None):
        self.asked.append((repo_id, revision))
        if self.error is not None:
            raise self.error
        return SimpleNamespace(sha=self.sha)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Online, with an empty Hugging Face cache under tmp_path."""
    fake = Hub()
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return fake


@pytest.fixture
def cached(tmp_path):
    """A snapshot of REPO in the cache, at CACHED_SHA, which "main" points to."""
    repo = tmp_path / "hub" / "models--owner--tiny-model"
    snapshot = repo / "snapshots" / CACHED_SHA
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(CACHED_SHA)
    return snapshot


def response_error(kind: type[Exception]) -> Exception:
    return kind("404 Client Error", response=SimpleNamespace(headers={}, request=None))


def test_a_hub_id_is_pinned_to_the_commit_its_revision_names(hub):
    assert models.resolve_model(REPO, "v1.0") == ModelSource(REPO, f"{REPO}@{SHA}", SHA)
    assert models.resolve_model(REPO) == ModelSource(REPO, f"{REPO}@{SHA}", SHA)
    assert hub.asked == [(REPO, "v1.0"), (REPO, None)]


def test_load_model_loads_the_pinned_commit_and_records_it(hub, monkeypatch):
    loaded = []

    class Loaded:
        pad_token, eos_token = None, "</s>"

        def to(self, device):
            return self

        def eval(self):
            return self

    class Auto:
        @staticmethod
        def from_pretrained(path, **options):
            loaded.append((path, options.get("revision")))
            return Loaded()

    stub = types.ModuleType("transformers")
    stub.AutoTokenizer = stub.AutoModelForCausalLM = Auto
    monkeypatch.setitem(sys.modules, "transformers", stub)
    model, tokenizer = models.load_model(REPO, revision="main")
    assert model.somp_ref_model_id == f"{REPO}@{SHA}"
    assert loaded == [(REPO, SHA), (REPO, SHA)]  # the tokenizer and the model, same commit
    assert tokenizer.pad_token == "</s>"


@pytest.mark.parametrize("revision", [None, "main", CACHED_SHA])
def test_offline_a_cached_snapshot_loads_with_its_commit(hub, cached, monkeypatch, revision):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = models.resolve_model(REPO, revision)
    assert source == ModelSource(str(cached), f"{REPO}@{CACHED_SHA}")
    assert hub.asked == []  # offline: the hub is not even asked


def test_an_unreachable_hub_falls_back_to_the_cache(hub, cached):
    hub.error = RuntimeError("connection refused")  # httpx's errors are no OSError
    assert models.resolve_model(REPO).model_id == f"{REPO}@{CACHED_SHA}"
    assert hub.asked == [(REPO, None)]


@pytest.mark.parametrize(
    "offline, error, reason",
    [
        (True, None, r"the hub is switched off \(HF_HUB_OFFLINE=1\)"),
        (False, ConnectionError("Name or service not known\nmore"), r"cannot be reached \(Name"),
    ],
)
def test_nothing_cached_and_no_hub_is_one_line(hub, cached, monkeypatch, offline, error, reason):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    hub.error = error
    with pytest.raises(ModelLoadError, match=reason) as caught:
        models.load_model(REPO, revision="v2")  # cached is main's commit, not v2's
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{REPO} at revision 'v2' is not in the Hugging Face cache")


@pytest.mark.parametrize(
    "error, match",
    [
        (RepositoryNotFoundError, rf"no model '{REPO}' on the Hugging Face hub"),
        (GatedRepoError, rf"{REPO} is gated: accept its terms"),
        (RevisionNotFoundError, rf"{REPO} has no revision 'v9' on the hub"),
    ],
)
def test_the_hub_s_refusals_are_one_line_errors(hub, cached, error, match):
    hub.error = response_error(error)
    with pytest.raises(ModelLoadError, match=match) as caught:
        models.resolve_model(REPO, "v9")  # even with a snapshot cached: the hub said no
    assert "\n" not in str(caught.value)


def test_a_revision_is_for_hub_ids_only(hub, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for name in ("default", str(tmp_path)):
        with pytest.raises(ModelLoadError, match="applies to hub ids only"):
            models.resolve_model(name, "main")
    assert hub.asked == []


def test_the_command_line_reports_an_uncached_offline_hub_id_in_one_line(
    hub, monkeypatch, tmp_path, capsys
):
    pytest.importorskip("torch")
    from somp_ref.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    argv = ["export", "--model", REPO, "--prompts", "builtin:colors", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"somp-ref export: error: {REPO} is not in the Hugging Face cache")
