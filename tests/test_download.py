"""Downloads from the (loopback) Hugging Face Hub and torchvision URLs: checks, cache, offline, fallback."""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import pytest
import torch

import densenet_efficient as de
from densenet_efficient import pretrained as W
from densenet_efficient.pretrained.download import fetch_hub_bytes, fetch_url_bytes
from tests.weights_helpers import (
    REPO_ROOT,
    cache_files,
    hub_entry,
    legacy_torchvision_state_dict,
    logits,
    randomise_batch_norm,
    saved_files,
    small_model,
    write_manifest,
)


def fetch_hub_file(*args, **kwargs) -> str:
    return fetch_hub_bytes(*args, **kwargs)[0]


def fetch_url_file(*args, **kwargs) -> str:
    return fetch_url_bytes(*args, **kwargs)[0]


# ---------------------------------------------------------------------------------------------------------------
# The Hub (loopback) and torchvision URLs


@pytest.fixture
def published(loopback_hub, tmp_path):
    """A small model published on the loopback hub as org/small; returns (model, files, commit)."""
    model = randomise_batch_norm(small_model())
    files = saved_files(model, tmp_path / "export")
    commit = loopback_hub.commit("org/small", files)
    return model, files, commit


def test_download_then_cache_hit_without_a_request(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    options = dict(cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    first = de.densenet_40_k12(pretrained=True, **options)
    assert first.config == model.config
    torch.testing.assert_close(logits(first), logits(model), rtol=0, atol=0)
    assert ("GET", f"/lfs/{hashlib.sha256(files['model.safetensors']).hexdigest()}") in loopback_hub.requests
    loopback_hub.requests.clear()
    second = de.create_model("densenet_40_k12", weights="test", **options)
    assert loopback_hub.requests == []
    torch.testing.assert_close(logits(second), logits(model), rtol=0, atol=0)


def test_pinned_revision_loads_that_commit(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    newer = saved_files(randomise_batch_norm(small_model()), tmp_path / "newer")
    loopback_hub.commit("org/small", newer)  # main moves on; the manifest still pins the first commit
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    loaded = de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert all(f"/resolve/{commit}/" in path for _, path in loopback_hub.requests_for("/resolve/"))


def test_hub_reference_with_and_without_revision(loopback_hub, published, tmp_path):
    model, files, commit = published
    newer_model = randomise_batch_norm(small_model(num_classes=5))
    newer = loopback_hub.commit("org/small", saved_files(newer_model, tmp_path / "newer"))
    options = dict(cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    pinned = de.create_model("densenet_40_k12", weights=f"hf-hub:org/small@{commit}", **options)
    latest = de.create_model("densenet_40_k12", weights="hf-hub:org/small", **options)
    torch.testing.assert_close(logits(pinned), logits(model), rtol=0, atol=0)
    assert latest.classifier.out_features == 5  # num_classes from the repo's config.json
    # the weights come from the commit that config.json came from, even if main moves in between
    assert ("HEAD", f"/org/small/resolve/{newer}/model.safetensors") in loopback_hub.requests
    torch.testing.assert_close(logits(latest), logits(newer_model), rtol=0, atol=0)


def test_invalid_hub_reference():
    with pytest.raises(W.UnknownWeightsError, match="expected 'hf-hub:org/name\\[@revision\\]'"):
        de.create_model("densenet_40_k12", weights="hf-hub:just-a-name")


@pytest.mark.filterwarnings("ignore:densenet_40_k12.test is not pinned")
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_tampered_download_is_refused_and_removed(loopback_hub, published, tmp_path, monkeypatch, pinned):
    model, files, commit = published
    cache = tmp_path / "cache"
    good = fetch_hub_file("org/small", "config.json", cache_dir=cache, endpoint=loopback_hub.endpoint)
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(None, files, pinned=pinned))
    loopback_hub.faults["model.safetensors"] = "tamper"
    expected = hashlib.sha256(files["model.safetensors"]).hexdigest()
    tampered = bytearray(files["model.safetensors"])
    tampered[0] ^= 0xFF
    actual = hashlib.sha256(tampered).hexdigest()
    with pytest.raises(
        W.ChecksumMismatchError,
        match=f"org/small/model.safetensors@main: .*{actual}.*{expected}",
    ):
        de.densenet_40_k12(pretrained=True, cache_dir=cache, endpoint=loopback_hub.endpoint)
    remaining = cache_files(cache)
    assert not any(expected in name or name.endswith("model.safetensors") for name in remaining)
    assert Path(good).read_bytes() == files["config.json"]  # the good cached file is left alone
    loopback_hub.faults.clear()  # the next try downloads a good copy
    loaded = de.densenet_40_k12(pretrained=True, cache_dir=cache, endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_unpinned_entry_warns_and_checks_the_hubs_sha256(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files, pinned=False))
    with pytest.warns(UserWarning, match="densenet_40_k12.test is not pinned: .*Hub's own LFS sha256"):
        loaded = de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_corrupted_cache_hit_is_caught(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    cache = tmp_path / "cache"
    path = Path(
        fetch_hub_file(
            "org/small", "model.safetensors", revision=commit, cache_dir=cache, endpoint=loopback_hub.endpoint
        )
    )
    blob = path.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01  # a flipped data byte: safetensors would load it silently
    blob.write_bytes(bytes(data))
    loopback_hub.requests.clear()
    with pytest.raises(W.ChecksumMismatchError, match=hashlib.sha256(data).hexdigest()):
        de.densenet_40_k12(pretrained=True, cache_dir=cache, endpoint=loopback_hub.endpoint)
    assert loopback_hub.requests == [] and not blob.exists() and not path.is_symlink()


@pytest.mark.parametrize("content", ["truncated", "empty"])
def test_truncated_or_empty_file_on_the_hub(loopback_hub, tmp_path, monkeypatch, content):
    files = saved_files(small_model(), tmp_path / "export")
    good = files["model.safetensors"]
    bad = good[: len(good) // 2] if content == "truncated" else b""
    loopback_hub.commit("org/small", {**files, "model.safetensors": bad})
    options = dict(cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    # Pinned: the sha256 refuses it. Unpinned (hf-hub:): it matches the Hub's hash, and safetensors refuses it.
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(None, files))
    with pytest.raises(W.ChecksumMismatchError, match=f"expected {hashlib.sha256(good).hexdigest()}"):
        de.densenet_40_k12(pretrained=True, **options)
    with pytest.raises(W.InvalidWeightsFileError, match="not a readable weights file"):
        de.create_model("densenet_40_k12", weights="hf-hub:org/small", **options)


@pytest.mark.slow
def test_transfer_cut_short_is_not_cached(loopback_hub, published, tmp_path):
    loopback_hub.faults["model.safetensors"] = "truncate"
    cache = tmp_path / "cache"
    with pytest.raises(W.WeightsNotAvailableError, match="IncompleteRead"):
        fetch_hub_file("org/small", "model.safetensors", cache_dir=cache, endpoint=loopback_hub.endpoint)
    assert cache_files(cache) == set()


@pytest.mark.parametrize(
    "reference, reason",
    [
        ("hf-hub:org/missing", "404"),
        ("hf-hub:org/small@v9", "404"),
    ],
)
def test_missing_repo_or_revision(loopback_hub, published, tmp_path, reference, reason):
    with pytest.raises(W.WeightsNotAvailableError, match=re.escape(reason)):
        de.create_model("densenet_40_k12", weights=reference, cache_dir=tmp_path, endpoint=loopback_hub.endpoint)


def test_missing_file_and_server_error(loopback_hub, published, tmp_path):
    options = dict(cache_dir=tmp_path, endpoint=loopback_hub.endpoint)
    with pytest.raises(
        W.WeightsNotAvailableError,
        match="Cannot get other.safetensors of Hub repo org/small .*404",
    ):
        fetch_hub_file("org/small", "other.safetensors", **options)
    loopback_hub.faults["model.safetensors"] = "error500"
    started = time.monotonic()
    with pytest.raises(W.WeightsNotAvailableError, match="500"):
        fetch_hub_file("org/small", "model.safetensors", **options)
    assert time.monotonic() - started < 3  # no retry loop


def test_offline_with_cache_makes_no_request(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(None, files))
    options = dict(cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    de.densenet_40_k12(pretrained=True, **options)  # online once: cached under refs/main
    loopback_hub.requests.clear()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = de.densenet_40_k12(pretrained=True, **options)
    assert loopback_hub.requests == []
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_offline_without_cache_says_how_to_get_the_file(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(W.WeightsNotAvailableError) as error:
        de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    message = str(error.value)
    assert f"model.safetensors of Hub repo org/small (revision {commit})" in message
    assert "HF_HUB_OFFLINE is set" in message and str(tmp_path / "cache") in message
    assert "HF_HUB_CACHE" in message and "'path/to/model.safetensors'" in message
    assert loopback_hub.requests == []


def test_unreachable_hub_fails_at_once(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    loopback_hub.close()
    started = time.monotonic()
    with pytest.raises(W.WeightsNotAvailableError, match="Connection refused|ConnectError"):
        de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    assert time.monotonic() - started < 3  # the client alone would retry for about 20 s


@pytest.fixture
def torchvision_file(loopback_hub, tmp_path, monkeypatch):
    """A torchvision-style legacy .pth served by the loopback hub at /models/<name>-<sha256[:8]>.pth."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = randomise_batch_norm(small_model())
    buffer = io.BytesIO()
    torch.save(legacy_torchvision_state_dict(model), buffer)
    data = buffer.getvalue()
    prefix = hashlib.sha256(data).hexdigest()[:8]
    path = f"/models/densenet-{prefix}.pth"
    loopback_hub.url_files[path] = data
    return model, f"{loopback_hub.endpoint}{path}", prefix


def manifest_with_only_the_torchvision_copy(tmp_path, monkeypatch, url: str, prefix: str) -> None:
    """A manifest whose entry's Hub repo is gone and whose torchvision .pth is served at ``url``."""
    hub = {"repo_id": "org/gone", "revision": None, "filename": "model.safetensors", "sha256": "0" * 64, "size": None}
    write_manifest(
        tmp_path / "manifest.json",
        monkeypatch,
        hub,
        {"url": url, "sha256_prefix": prefix, "sha256": None, "size": None},
    )


def test_torchvision_fallback_when_the_hub_copy_is_missing(loopback_hub, torchvision_file, tmp_path, monkeypatch):
    model, url, prefix = torchvision_file
    manifest_with_only_the_torchvision_copy(tmp_path, monkeypatch, url, prefix)
    with pytest.warns(UserWarning, match=f"the Hub copy is not available, loaded {url}"):
        loaded = de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    assert hashlib.sha256(cached.read_bytes()).hexdigest().startswith(prefix)


def test_torchvision_url_hash_prefix_is_checked(loopback_hub, torchvision_file, tmp_path):
    model, url, prefix = torchvision_file
    directory = tmp_path / "checkpoints"
    loopback_hub.faults[urlparse(url).path] = "tamper"
    with pytest.raises(W.ChecksumMismatchError, match=f"does not start with {prefix}"):
        fetch_url_file(url, prefix, directory)
    assert not directory.exists() or list(directory.iterdir()) == []
    loopback_hub.faults.clear()
    path = Path(fetch_url_file(url, prefix, directory))
    path.write_bytes(path.read_bytes()[:-1])  # a damaged cached copy is re-checked and removed
    with pytest.raises(W.ChecksumMismatchError, match=f"does not start with {prefix}"):
        fetch_url_file(url, prefix, directory)
    assert not path.exists()


def test_no_source_reachable_lists_every_source(loopback_hub, torchvision_file, tmp_path, monkeypatch):
    model, url, prefix = torchvision_file
    manifest_with_only_the_torchvision_copy(tmp_path, monkeypatch, url, prefix)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        W.WeightsNotAvailableError,
        match=r"No source of densenet_40_k12.test is available:\n"
        r"- Cannot get model.safetensors of Hub repo org/gone.*\n"
        rf"- Cannot download {url}",
    ):
        de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    assert loopback_hub.requests == []


def test_torch_hub_entrypoint_with_pretrained(loopback_hub, published, tmp_path, monkeypatch):
    model, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    loaded = torch.hub.load(
        str(REPO_ROOT),
        "densenet_40_k12",
        source="local",
        pretrained=True,
        cache_dir=str(tmp_path / "cache"),
        endpoint=loopback_hub.endpoint,
    )
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    by_reference = torch.hub.load(
        str(REPO_ROOT),
        "densenet_40_k12",
        source="local",
        weights=f"hf-hub:org/small@{commit}",
        cache_dir=str(tmp_path / "cache"),
        endpoint=loopback_hub.endpoint,
    )
    torch.testing.assert_close(logits(by_reference), logits(model), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Time limits, floating revisions, progress


def test_a_network_that_never_answers_fails_within_the_timeout_on_every_source(tmp_path, monkeypatch):
    """A server that accepts connections but never replies: the Hub probe and the .pth download each give up after
    TIMEOUT_S, and the error lists both sources (torch.hub's download had no timeout at all)."""
    from densenet_efficient.pretrained import download
    from tests.loopback_hub import SilentServer

    monkeypatch.setattr(download, "TIMEOUT_S", 0.5, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    silent = SilentServer()
    url = f"{silent.endpoint}/models/densenet-0123abcd.pth"
    hub = {"repo_id": "org/small", "revision": None, "filename": "model.safetensors", "sha256": "0" * 64, "size": None}
    write_manifest(
        tmp_path / "manifest.json",
        monkeypatch,
        hub,
        {"url": url, "sha256_prefix": "0123abcd", "sha256": None, "size": None},
    )
    outcome: list[Exception] = []

    def load() -> None:
        try:
            de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=silent.endpoint)
        except Exception as error:  # handed to the test thread
            outcome.append(error)

    worker = threading.Thread(target=load, daemon=True)
    started = time.monotonic()
    try:
        worker.start()
        worker.join(timeout=20)
        hung = worker.is_alive()
    finally:
        silent.close()  # resets the waiting connections: the thread ends even on a client without timeouts
        worker.join(timeout=5)
    assert not hung, "the download hung"
    assert time.monotonic() - started < 10
    [error] = outcome
    assert isinstance(error, W.WeightsNotAvailableError)
    message = str(error)
    assert "No source of densenet_40_k12.test is available" in message
    assert "Cannot get model.safetensors of Hub repo org/small" in message and "Timeout" in message
    assert f"Cannot download {url}: TimeoutError: timed out" in message
    assert not any((tmp_path / "torch").rglob("*.part"))  # nothing half-written


def test_a_moved_branch_falls_back_to_the_url_without_downloading(
    loopback_hub, torchvision_file, tmp_path, monkeypatch
):
    """An entry pinned by sha256 at a branch (revision None = main) whose file has changed: the Hub copy is not
    downloaded again and again, the torchvision .pth is loaded, and the warning says what happened."""
    tv_model, url, prefix = torchvision_file
    first = saved_files(small_model(), tmp_path / "first")
    loopback_hub.commit("org/small", first)
    loopback_hub.commit("org/small", saved_files(randomise_batch_norm(small_model()), tmp_path / "second"))
    write_manifest(
        tmp_path / "manifest.json",
        monkeypatch,
        hub_entry(None, first),
        {"url": url, "sha256_prefix": prefix, "sha256": None, "size": None},
    )
    for _ in range(2):
        with pytest.warns(
            UserWarning,
            match=rf"(?s)densenet_40_k12.test: the Hub copy does not match the pinned "
            rf"sha256 .*'main' is a branch, not a commit.*loaded {re.escape(url)}",
        ):
            loaded = de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
        torch.testing.assert_close(logits(loaded), logits(tv_model), rtol=0, atol=0)
    assert not [path for method, path in loopback_hub.requests if method == "GET" and "safetensors" in path]


def test_a_changed_file_at_a_pinned_commit_is_refused_without_fallback(
    loopback_hub, torchvision_file, published, tmp_path, monkeypatch
):
    _, files, commit = published
    _, url, prefix = torchvision_file
    hub = {**hub_entry(commit, files), "sha256": "0" * 64}
    write_manifest(
        tmp_path / "manifest.json",
        monkeypatch,
        hub,
        {"url": url, "sha256_prefix": prefix, "sha256": None, "size": None},
    )
    with pytest.raises(W.ChecksumMismatchError, match=f"expected {'0' * 64}; nothing was downloaded"):
        de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_download_progress_on_a_terminal_only(loopback_hub, torchvision_file, tmp_path, monkeypatch, capsys):
    _, url, prefix = torchvision_file
    fetch_url_file(url, prefix, tmp_path / "quiet")
    assert capsys.readouterr().err == ""  # not a terminal (CI logs): no progress bar
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    fetch_url_file(url, prefix, tmp_path / "terminal")
    assert f"{Path(url).name}:" in terminal.getvalue() and "B/s" in terminal.getvalue()


def test_url_transfer_cut_short_leaves_nothing(loopback_hub, torchvision_file, tmp_path):
    _, url, prefix = torchvision_file
    loopback_hub.faults[urlparse(url).path] = "truncate"
    directory = tmp_path / "checkpoints"
    with pytest.raises(W.WeightsNotAvailableError, match=f"Cannot download {re.escape(url)}: IncompleteRead"):
        fetch_url_file(url, prefix, directory)
    assert list(directory.iterdir()) == []


def test_hub_download_is_quiet_when_not_a_terminal(loopback_hub, published, tmp_path, capsys):
    fetch_hub_file("org/small", "model.safetensors", cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------------------------
# A cache that is not trusted: links out of the cache, files no hash can verify (issue 17)


def _cached(loopback_hub, cache: Path, commit: str) -> tuple[Path, Path]:
    """Download org/small's weights at ``commit`` into ``cache``: (snapshot link, blob)."""
    path = Path(
        fetch_hub_file(
            "org/small", "model.safetensors", revision=commit, cache_dir=cache, endpoint=loopback_hub.endpoint
        )
    )
    return path, Path(os.path.normpath(path.parent / os.readlink(path)))


@pytest.mark.parametrize("relinked", ["blob", "snapshot"])
def test_a_mismatch_never_deletes_through_a_link(loopback_hub, published, tmp_path, monkeypatch, relinked):
    """A cache entry relinked to a user's file outside the cache: the checksum refuses it and only the cache's
    own entries go; the user's file is untouched."""
    _, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    cache = tmp_path / "cache"
    snapshot, blob = _cached(loopback_hub, cache, commit)
    users_file = tmp_path / "thesis.safetensors"
    users_file.write_bytes(b"the user's own file, not weights")
    link = blob if relinked == "blob" else snapshot
    link.unlink()
    link.symlink_to(users_file)
    with pytest.raises(W.ChecksumMismatchError, match="nothing outside it"):
        de.densenet_40_k12(pretrained=True, cache_dir=cache, endpoint=loopback_hub.endpoint)
    assert users_file.read_bytes() == b"the user's own file, not weights"
    assert not snapshot.is_symlink() and not link.is_symlink()


def test_a_snapshot_relinked_to_any_file_is_refused_at_a_pinned_commit(loopback_hub, published, tmp_path, monkeypatch):
    """hf-hub: at a commit costs no request once cached, so the cache blob's name is the only hash there is: a
    snapshot linked to another file is refused unless the user opts in, naming the opt-in."""
    _, files, commit = published
    cache = tmp_path / "cache"
    reference = f"hf-hub:org/small@{commit}"
    de.create_model("densenet_40_k12", weights=reference, cache_dir=cache, endpoint=loopback_hub.endpoint)
    snapshot, _ = _cached(loopback_hub, cache, commit)
    other = randomise_batch_norm(small_model())
    replacement = tmp_path / "other.safetensors"
    W.save_pretrained(other, tmp_path / "other")
    replacement.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    snapshot.unlink()
    snapshot.symlink_to(replacement)
    loopback_hub.requests.clear()
    with pytest.raises(W.UnverifiedWeightsError, match="DENSENET_EFFICIENT_ALLOW_UNVERIFIED=1"):
        de.create_model("densenet_40_k12", weights=reference, cache_dir=cache, endpoint=loopback_hub.endpoint)
    assert replacement.is_file() and snapshot.is_symlink()  # refused, nothing deleted
    monkeypatch.setenv("DENSENET_EFFICIENT_ALLOW_UNVERIFIED", "1")
    with pytest.warns(UserWarning, match="loading it unverified because DENSENET_EFFICIENT_ALLOW_UNVERIFIED"):
        loaded = de.create_model("densenet_40_k12", weights=reference, cache_dir=cache, endpoint=loopback_hub.endpoint)
    torch.testing.assert_close(logits(loaded), logits(other), rtol=0, atol=0)
    assert loopback_hub.requests == []


def test_a_full_sha256_of_a_url_source_is_checked_not_only_its_prefix(loopback_hub, torchvision_file, tmp_path):
    _, url, prefix = torchvision_file
    full = hashlib.sha256(loopback_hub.url_files[urlparse(url).path]).hexdigest()
    other = prefix + ("0" if full[8] != "0" else "1") + full[9:]  # shares the name's prefix, not the file's hash
    fetch_url_file(url, full, tmp_path / "cached")  # the whole hash passes
    for directory in (tmp_path / "fresh", tmp_path / "cached"):  # a download, then a cache hit
        with pytest.raises(W.ChecksumMismatchError, match=f"does not start with {other}"):
            fetch_url_file(url, other, directory)


def test_the_hub_bytes_hashed_are_the_bytes_loaded(loopback_hub, published, tmp_path):
    """hf-hub: the weights are verified when the reference is resolved; a cache file changed before the tensors
    are read must not be what is loaded."""
    from densenet_efficient.pretrained.loading import resolve_weights

    model, _, commit = published
    cache = tmp_path / "cache"
    weights = resolve_weights(
        "densenet_40_k12", f"hf-hub:org/small@{commit}", cache_dir=cache, endpoint=loopback_hub.endpoint
    )
    snapshot, blob = _cached(loopback_hub, cache, commit)
    other = randomise_batch_norm(small_model())
    W.save_pretrained(other, tmp_path / "other")
    blob.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())  # swapped after the check
    state = weights.read()
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# Bounded, fail-closed input and output (issue 22): every case ends in bounded time, with its error, leaving nothing


@pytest.mark.parametrize("path", ["hub", "url"])
def test_a_dripping_server_is_cut_off_at_the_minimum_rate(
    loopback_hub, published, torchvision_file, tmp_path, monkeypatch, path
):
    from densenet_efficient.pretrained import download

    monkeypatch.setattr(download, "GRACE_S", 0.3)
    started = time.monotonic()
    if path == "hub":
        _, files, commit = published
        loopback_hub.faults["model.safetensors"] = "drip"
        write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
        with pytest.raises(W.WeightsNotAvailableError, match="minimum rate"):
            de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
        assert cache_files(tmp_path / "cache") == set()
    else:
        _, url, prefix = torchvision_file
        loopback_hub.faults[urlparse(url).path] = "drip"
        with pytest.raises(W.WeightsNotAvailableError, match="minimum rate"):
            fetch_url_file(url, prefix, tmp_path / "checkpoints")
        assert list((tmp_path / "checkpoints").iterdir()) == []
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("path", ["hub", "url"])
def test_a_body_past_the_pinned_size_is_never_written(
    loopback_hub, published, torchvision_file, tmp_path, monkeypatch, path
):
    """No Content-Length and a gzip-encoded body on the Hub, no Content-Length and no end on a URL: the transfer
    stops at the pinned size."""
    started = time.monotonic()
    if path == "hub":
        _, files, commit = published
        loopback_hub.faults["model.safetensors"] = "gzip"
        write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
        with pytest.raises(
            W.WeightsNotAvailableError, match=f"more than the file's {len(files['model.safetensors']):,}"
        ):
            de.densenet_40_k12(pretrained=True, cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
        assert cache_files(tmp_path / "cache") == set()
    else:
        _, url, prefix = torchvision_file
        size = len(loopback_hub.url_files[urlparse(url).path])
        loopback_hub.faults[urlparse(url).path] = "endless"
        with pytest.raises(W.WeightsNotAvailableError, match=f"more than the file's {size:,} bytes"):
            fetch_url_file(url, prefix, tmp_path / "checkpoints", size=size)
        assert list((tmp_path / "checkpoints").iterdir()) == []
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("value", ["1", "true", "YES", "on", "", "0", "false", "no", "Off"])
def test_env_flag_is_strict(monkeypatch, value):
    from densenet_efficient.pretrained.files import env_flag

    monkeypatch.setenv("SWITCH", value)
    assert env_flag("SWITCH") is (value.lower() in ("1", "true", "yes", "on"))


@pytest.mark.parametrize("value", ["false", "no", "off", "0", "maybe", "2"])
def test_allow_unverified_turns_on_only_when_on(loopback_hub, published, tmp_path, monkeypatch, value):
    _, files, commit = published
    cache = tmp_path / "cache"
    reference = f"hf-hub:org/small@{commit}"
    snapshot, _ = _cached(loopback_hub, cache, commit)
    replacement = tmp_path / "other.safetensors"
    replacement.write_bytes(files["model.safetensors"])
    snapshot.unlink()
    snapshot.symlink_to(replacement)  # no cache blob names its hash: it cannot be verified
    monkeypatch.setenv("DENSENET_EFFICIENT_ALLOW_UNVERIFIED", value)
    if value in ("maybe", "2"):
        with pytest.raises(ValueError, match=f"DENSENET_EFFICIENT_ALLOW_UNVERIFIED='{value}'.*1, true, yes, on"):
            de.create_model("densenet_40_k12", weights=reference, cache_dir=cache, endpoint=loopback_hub.endpoint)
    else:
        with pytest.raises(W.UnverifiedWeightsError, match="ALLOW_UNVERIFIED"):
            de.create_model("densenet_40_k12", weights=reference, cache_dir=cache, endpoint=loopback_hub.endpoint)
    assert replacement.is_file() and snapshot.is_symlink()


def test_a_corrupt_file_in_a_read_only_cache_gives_the_checksum_error(loopback_hub, published, tmp_path, monkeypatch):
    import errno

    _, files, commit = published
    write_manifest(tmp_path / "manifest.json", monkeypatch, hub_entry(commit, files))
    cache = tmp_path / "cache"
    _, blob = _cached(loopback_hub, cache, commit)
    blob.write_bytes(b"x" + blob.read_bytes()[1:])

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)  # as root, chmod cannot make a folder read-only
    with pytest.raises(W.ChecksumMismatchError, match="could not be removed .*Read-only file system"):
        de.densenet_40_k12(pretrained=True, cache_dir=cache, endpoint=loopback_hub.endpoint)
    monkeypatch.undo()
    assert blob.is_file()


@pytest.mark.parametrize("kind", ["FIFO", "folder"])
def test_a_config_json_that_is_no_regular_file_is_refused(tmp_path, kind):
    folder = tmp_path / "saved"
    W.save_pretrained(small_model(), folder)
    (folder / "config.json").unlink()
    if kind == "FIFO":
        os.mkfifo(folder / "config.json")  # opening it to read would wait for a writer forever
    else:
        (folder / "config.json").mkdir()
    started = time.monotonic()
    with pytest.raises(W.InvalidConfigError, match=f"config.json is a {kind}, not a regular file"):
        de.create_model("densenet_40_k12", weights=folder)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("reference", ["folder", "file"])
def test_a_huge_sparse_weights_file_is_refused_by_its_size(tmp_path, reference):
    folder = tmp_path / "saved"
    W.save_pretrained(small_model(), folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(16 * 2**30)  # sparse: 16 GiB that cost no disk
    started = time.monotonic()
    with pytest.raises(W.InvalidWeightsFileError, match="17,179,869,184 bytes, more than"):
        de.create_model("densenet_40_k12", weights=folder if reference == "folder" else weights)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("repo_id", ["../evil", "org/na..me", "org/-x"])
def test_an_invalid_hub_repo_id_is_the_projects_error(loopback_hub, tmp_path, repo_id):
    with pytest.raises(W.UnknownWeightsError, match=f"Invalid Hub repo id '{re.escape(repo_id)}'.*'org/name'"):
        de.create_model(
            "densenet_40_k12", weights=f"hf-hub:{repo_id}", cache_dir=tmp_path, endpoint=loopback_hub.endpoint
        )
    assert loopback_hub.requests == [] and not any(tmp_path.iterdir())


def test_a_hub_config_json_is_bounded_before_it_is_downloaded(loopback_hub, published, tmp_path, monkeypatch):
    from densenet_efficient.pretrained import loading

    monkeypatch.setattr(loading, "_MAX_CONFIG_BYTES", 64)
    with pytest.raises(W.ChecksumMismatchError, match="config.json@main: the Hub serves .* more than the 64"):
        de.create_model(
            "densenet_40_k12", weights="hf-hub:org/small", cache_dir=tmp_path, endpoint=loopback_hub.endpoint
        )
    assert cache_files(tmp_path) == set() and [method for method, _ in loopback_hub.requests] == ["HEAD"]
