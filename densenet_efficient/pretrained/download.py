"""Fetching weights files: from the Hugging Face Hub (``hf_hub_download``) or a plain URL (torchvision's ``.pth``).

Every file is checked before it is used, on download and on cache hits: against the sha256 the manifest pins,
else against the hash the Hub itself gives (an LFS file's sha256, which names its cache blob, or a small
file's git blob id). A file that fails is removed from the cache (other cached files stay) and
:class:`~.errors.ChecksumMismatchError` names the file and both hashes.

Offline (``HF_HUB_OFFLINE=1``) nothing is requested. A file that is neither cached nor reachable raises
:class:`~.errors.WeightsNotAvailableError` at once, saying where it was looked for and how
to get it, instead of the Hub client's retries.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)

from .errors import ChecksumMismatchError, WeightsNotAvailableError
from .files import file_sha256

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_BLOB_ID = re.compile(r"[0-9a-f]{40}")
_PROBE_TIMEOUT_S = 10


def fetch_hub_file(repo_id: str, filename: str, *, revision: str | None = None, sha256: str | None = None,
                   cache_dir: str | os.PathLike | None = None, endpoint: str | None = None) -> str:
    """Path of ``filename`` of Hub repo ``repo_id`` in the Hugging Face cache, downloaded if needed and verified.

    ``sha256``: the expected hash (from the manifest); without it the Hub's own hash is used. A full 40-hex
    ``revision`` makes a cache hit cost no request.
    """
    revision = revision or constants.DEFAULT_REVISION
    offline = constants.is_offline_mode()
    if not isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision), str):
        if offline:
            raise _hub_unavailable(repo_id, filename, revision, cache_dir, endpoint, "HF_HUB_OFFLINE is set")
        _check_reachable(repo_id, filename, revision, cache_dir, endpoint)
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                               local_files_only=offline)
    except Exception as error:  # HTTP errors, a transfer cut short after the client's resumes, ...
        raise _hub_unavailable(repo_id, filename, revision, cache_dir, endpoint, _reason(error)) from error
    _verify_cached(path, f"{repo_id}/{filename}@{revision}", sha256)
    return path


def _check_reachable(repo_id: str, filename: str, revision: str, cache_dir, endpoint: str | None) -> None:
    """One HEAD request without retries, so that an unreachable Hub is reported at once."""
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint),
                             timeout=_PROBE_TIMEOUT_S, endpoint=endpoint)
    except Exception as error:  # any failure (HTTP, connection, timeout) means the file cannot be had now
        raise _hub_unavailable(repo_id, filename, revision, cache_dir, endpoint, _reason(error)) from error


def _hub_unavailable(repo_id: str, filename: str, revision: str, cache_dir, endpoint: str | None,
                     reason: str) -> WeightsNotAvailableError:
    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    cache = cache_dir or constants.HF_HUB_CACHE
    return WeightsNotAvailableError(
        f"Cannot get {filename} of Hub repo {repo_id} (revision {revision}) from {url}: {reason}. It is not in "
        f"the Hugging Face cache {cache} either. To get it: download it once while online (HF_ENDPOINT points at "
        f"a mirror); or copy a cache that holds it and point HF_HUB_CACHE (or cache_dir=) at it; or fetch the "
        f"repo's files on another machine and pass weights='path/to/folder' or 'path/to/model.safetensors'."
    )


def _reason(error: BaseException) -> str:
    """``Type: first line (last line)``: for Hub errors the status, then the server's own message."""
    lines = [line.strip().rstrip(".") for line in str(error).splitlines() if line.strip()] or ["no details"]
    return f"{type(error).__name__}: {lines[0]}" + (f" ({lines[-1]})" if len(lines) > 1 else "")


def _verify_cached(path: str, name: str, sha256: str | None) -> None:
    """Check a cached Hub file against ``sha256`` or the hash its cache blob is named by; remove it on mismatch."""
    blob = Path(path).resolve()
    if sha256 or _SHA256.fullmatch(blob.name):
        expected, actual = sha256 or blob.name, file_sha256(blob)
    elif _GIT_BLOB_ID.fullmatch(blob.name):
        expected, actual = blob.name, _git_blob_id(blob)
    else:
        warnings.warn(f"{name}: no hash to check it against (cache blob {blob.name}); loading it unverified")
        return
    if actual != expected:
        Path(path).unlink()
        blob.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"{name}: the file's hash is {actual}, expected {expected}. The bad copy ({blob}) was removed from "
            f"the cache; load again to download it afresh."
        )


def _git_blob_id(path: Path) -> str:
    """The git blob id (sha1 of ``blob <size>\\0<bytes>``): the Hub's ETag of a small, non-LFS file."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fetch_url_file(url: str, sha256_prefix: str, directory: str | os.PathLike | None = None) -> str:
    """Path of the file at ``url`` in ``directory`` (default: torch.hub's ``checkpoints`` folder), downloaded if
    needed; its sha256 must start with ``sha256_prefix`` (a full sha256 works too), on download and cache hits."""
    path = Path(directory or Path(torch.hub.get_dir(), "checkpoints")) / Path(urlparse(url).path).name
    if path.is_file():
        actual = file_sha256(path)
        if not actual.startswith(sha256_prefix):
            path.unlink()
            raise ChecksumMismatchError(
                f"{path} (from {url}): sha256 {actual} does not start with {sha256_prefix}. The bad copy was "
                f"removed; load again to download it afresh."
            )
        return str(path)
    if constants.is_offline_mode():
        raise _url_unavailable(url, path, "HF_HUB_OFFLINE is set")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=sha256_prefix, progress=True)
    except RuntimeError as error:  # torch.hub's hash check; the partial file is already removed
        raise ChecksumMismatchError(f"{url}: {error}; nothing was saved") from error
    except OSError as error:  # urllib's URLError and HTTPError included
        raise _url_unavailable(url, path, _reason(error)) from error
    return str(path)


def _url_unavailable(url: str, path: Path, reason: str) -> WeightsNotAvailableError:
    return WeightsNotAvailableError(
        f"Cannot download {url}: {reason}. It is not at {path} either. To get it: download it once while online; "
        f"or copy the file to {path} (TORCH_HOME moves that folder); or pass weights='path/to/{path.name}'."
    )


def fetch_manifest_weights(key: str, entry: dict[str, Any], *, cache_dir: str | os.PathLike | None = None,
                           endpoint: str | None = None) -> str:
    """Path of the verified weights file of manifest entry ``key``: its Hub file, else its URL (a torchvision
    ``.pth``) when the Hub copy cannot be had. A checksum mismatch is raised, never worked around."""
    failures = []
    hub = entry.get("hub")
    if hub:
        if not hub["sha256"]:
            warnings.warn(
                f"{key} is not pinned: weights_manifest.json records no sha256 for {hub['repo_id']}/"
                f"{hub['filename']}, so the file is checked against the Hub's own LFS sha256 only.", stacklevel=2,
            )
        try:
            return fetch_hub_file(hub["repo_id"], hub["filename"], revision=hub["revision"], sha256=hub["sha256"],
                                  cache_dir=cache_dir, endpoint=endpoint)
        except WeightsNotAvailableError as error:
            failures.append(str(error))
    source = entry.get("url")
    if source:
        try:
            path = fetch_url_file(source["url"], source["sha256"] or source["sha256_prefix"])
        except WeightsNotAvailableError as error:
            failures.append(str(error))
        else:
            if failures:
                warnings.warn(f"{key}: the Hub copy is not available, loaded {source['url']} instead.", stacklevel=2)
            return path
    raise WeightsNotAvailableError(f"No source of {key} is available:\n- " + "\n- ".join(failures))
