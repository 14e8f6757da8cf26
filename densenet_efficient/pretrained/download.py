"""Fetching weights files: from the Hugging Face Hub (``hf_hub_download``) or a plain URL (torchvision's ``.pth``).

Every file is checked before it is used, on download and on cache hits: against the sha256 the manifest pins,
else against the hash the Hub itself gives (an LFS file's sha256, which names its cache blob, or a small
file's git blob id). A file that fails is removed from the cache (other cached files stay) and
:class:`~.errors.ChecksumMismatchError` names the file and both hashes.

Offline (``HF_HUB_OFFLINE=1``) nothing is requested. A file that is neither cached nor reachable raises
:class:`~.errors.WeightsNotAvailableError` at once, saying where it was looked for and how
to get it, instead of the Hub client's retries.

Bounds, the same on every path (Hub and URL, through one meter, :func:`_transfer_meter`): every request waits at
most :data:`TIMEOUT_S` seconds for a connection and for each answer (the Hub probe, every read of a URL download;
a Hub transfer's reads are the Hub client's, ``HF_HUB_DOWNLOAD_TIMEOUT``); after :data:`GRACE_S` seconds a
transfer must have averaged :data:`MIN_RATE_BYTES_S` bytes per second, so a server that drips a byte at a time
is cut off; and no transfer writes more than the file's size (pinned in the manifest, else announced, else
:data:`.files.MAX_WEIGHTS_BYTES`), whatever the server's Content-Length or encoding. A file read from a cache is a
regular file whose size is checked before it is read (:func:`.files.read_regular_file`).

Progress bars are shown on a terminal only (``tqdm(disable=None)``): CI logs stay quiet.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import time
import urllib.request
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
from huggingface_hub.errors import HFValidationError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers, tqdm, validate_repo_id

from .errors import (
    ChecksumMismatchError,
    InvalidWeightsFileError,
    UnknownWeightsError,
    UnverifiedWeightsError,
    WeightsNotAvailableError,
)
from .files import MAX_WEIGHTS_BYTES, env_flag, lock_file, read_regular_file, remove_stale_temporaries

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_BLOB_ID = re.compile(r"[0-9a-f]{40}")
_PARTIAL_SUFFIX = ".part"
TIMEOUT_S = 10.0  # seconds a request waits for a connection or for the next bytes of an answer
_COMMIT = re.compile(r"[0-9a-f]{40}")
ALLOW_UNVERIFIED_ENV = "DENSENET_EFFICIENT_ALLOW_UNVERIFIED"  # on: load a Hub file that no hash can verify
MIN_RATE_BYTES_S = 10_000  # a transfer slower than this on average, after GRACE_S seconds, is cut off
GRACE_S = 30.0


def _transfer_meter(name: str, limit: int) -> type[tqdm]:
    """A progress-bar class (the Hub client's ``tqdm``: shown on a terminal only) for one transfer of at most
    ``limit`` bytes, whose ``update`` aborts the transfer with :class:`~.errors.WeightsNotAvailableError` before
    more than ``limit`` bytes are written, or when, after :data:`GRACE_S` seconds, fewer than
    :data:`MIN_RATE_BYTES_S` bytes a second have arrived on average. One class per transfer: the Hub client
    reuses its bar across its resumes, so the deadline spans them."""
    started, received = time.monotonic(), 0

    class Meter(tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            nonlocal received
            received += int(n or 0)
            elapsed = time.monotonic() - started
            if received > limit:
                raise WeightsNotAvailableError(
                    f"{name}: the server sent more than the file's {limit:,} bytes; the transfer was stopped"
                )
            if elapsed > GRACE_S and received < MIN_RATE_BYTES_S * elapsed:
                raise WeightsNotAvailableError(
                    f"{name}: {received:,} bytes in {elapsed:.0f} s, below the minimum rate of {MIN_RATE_BYTES_S:,} "
                    f"bytes/s; the transfer was stopped"
                )
            return super().update(n)

    return Meter


def fetch_hub_bytes(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
) -> tuple[str, bytes]:
    """Path of ``filename`` of Hub repo ``repo_id`` in the Hugging Face cache, downloaded if needed and verified,
    and its bytes, read once: the bytes whose hash was checked are the bytes returned, so a file changed in the
    cache after the check is never used.

    ``sha256``: the expected hash (from the manifest); without it the Hub's own hash is used. ``size``: the most
    bytes the file may hold (its pinned size; default :data:`.files.MAX_WEIGHTS_BYTES`). A full 40-hex
    ``revision`` makes a cache hit cost no request.
    """
    revision = revision or constants.DEFAULT_REVISION
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UnknownWeightsError(f"Invalid Hub repo id {repo_id!r}: {error}; expected 'org/name'") from None
    name = f"{repo_id}/{filename}@{revision}"
    offline = constants.is_offline_mode()
    served, limit = None, size or MAX_WEIGHTS_BYTES
    hub_cache = None if cache_dir is None else Path(cache_dir)  # huggingface_hub is typed for str | Path
    if not isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache, revision=revision), str):
        if offline:
            raise _hub_unavailable(repo_id, filename, revision, cache_dir, endpoint, "HF_HUB_OFFLINE is set")
        served, served_size, location = _check_reachable(repo_id, filename, revision, cache_dir, endpoint)
        if sha256 and served and _SHA256.fullmatch(served) and served != sha256:
            raise ChecksumMismatchError(
                f"{name}: the Hub serves a file with sha256 {served}, expected {sha256}; "
                f"nothing was downloaded.{_floating_hint(revision)}"
            )
        if served_size is not None and served_size > limit:
            raise ChecksumMismatchError(
                f"{name}: the Hub serves {served_size:,} bytes, more than the {limit:,} expected; nothing was "
                f"downloaded.{_floating_hint(revision)}"
            )
        if served:  # the transfer, bounded, into the cache blob the Hub client then links (it has no deadline)
            cache = Path(hub_cache or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
            check = sha256 or (served if _SHA256.fullmatch(served) else "")  # a git blob id: checked once linked
            try:
                _fetch_bounded(location, cache / "blobs" / served, check, limit, endpoint or constants.ENDPOINT, name)
            except (OSError, http.client.HTTPException) as error:
                if isinstance(error, ChecksumMismatchError):
                    raise
                raise _hub_unavailable(repo_id, filename, revision, cache_dir, endpoint, _reason(error)) from error
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=hub_cache,
            endpoint=endpoint,
            local_files_only=offline,
        )
    except Exception as error:  # HTTP errors, a transfer cut short after the client's resumes, ...
        raise _hub_unavailable(repo_id, filename, revision, cache_dir, endpoint, _reason(error)) from error
    return path, _verify_cached(path, name, sha256, served)


def _check_reachable(
    repo_id: str, filename: str, revision: str, cache_dir, endpoint: str | None
) -> tuple[str | None, int | None, str]:
    """One HEAD request without retries (at most :data:`TIMEOUT_S`), so that an unreachable Hub is reported at
    once. Returns the file's ETag (an LFS file's sha256, a small file's git blob id), size and address."""
    try:
        metadata = get_hf_file_metadata(
            hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint), timeout=TIMEOUT_S, endpoint=endpoint
        )
    except Exception as error:  # any failure (HTTP, connection, timeout) means the file cannot be had now
        raise _hub_unavailable(repo_id, filename, revision, cache_dir, endpoint, _reason(error)) from error
    return metadata.etag, metadata.size, metadata.location


def _floating_hint(revision: str) -> str:
    """What a hash mismatch means at ``revision``: tampering at a commit, maybe a newer file on a branch."""
    if _COMMIT.fullmatch(revision):
        return ""
    return (
        f" {revision!r} is a branch, not a commit: the Hub's file may have changed since its sha256 was pinned, "
        f"so downloading again will not help; pin the commit that holds the expected file, or load another "
        f"source"
    )


def _hub_unavailable(
    repo_id: str, filename: str, revision: str, cache_dir, endpoint: str | None, reason: str
) -> WeightsNotAvailableError:
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


def _verify_cached(path: str, name: str, sha256: str | None, served: str | None = None) -> bytes:
    """Check a cached Hub file against ``sha256``, else the hash its cache blob is named by, else ``served`` (the
    ETag of the request that just downloaded it). On a mismatch the cache's own entries for it are removed (see
    :func:`_remove_cache_entries`). A file with no hash to check against is refused
    (:class:`~.errors.UnverifiedWeightsError`) unless ``$ALLOW_UNVERIFIED_ENV`` is on (:func:`.files.env_flag`).
    Returns the bytes that were checked."""
    entry = _cache_entry(Path(path))
    data = read_regular_file(path, MAX_WEIGHTS_BYTES, InvalidWeightsFileError)
    hashes = [
        value for value in (entry.name, served) if value and (_SHA256.fullmatch(value) or _GIT_BLOB_ID.fullmatch(value))
    ]
    expected = sha256 or next(iter(hashes), None)
    if expected is None:
        if not env_flag(ALLOW_UNVERIFIED_ENV):
            raise UnverifiedWeightsError(
                f"{name}: no pinned hash to check it against ({path} is {_link_text(Path(path))}, not a cache blob "
                f"named by its hash), so it was not loaded. Pin its sha256 in the manifest, delete the cache entry "
                f"to download it again, or set {ALLOW_UNVERIFIED_ENV}=1 to load files that cannot be verified."
            )
        warnings.warn(
            f"{name}: no hash to check it against (cache entry {entry.name}); loading it unverified because "
            f"{ALLOW_UNVERIFIED_ENV} is set",
            stacklevel=2,
        )
        return data
    actual = hashlib.sha256(data).hexdigest() if _SHA256.fullmatch(expected) else _git_blob_id(data)
    if actual != expected:
        raise ChecksumMismatchError(
            f"{name}: the file's hash is {actual}, expected {expected}. {_remove_cache_entries(Path(path), entry)}"
        )
    return data


def _cache_entry(path: Path) -> Path:
    """The cache's own file for snapshot file ``path``: the blob its link names (one step, without following a
    link the blob itself may be), or ``path`` itself when it is no link (a cache without symlinks)."""
    if not path.is_symlink():
        return path
    return Path(os.path.normpath(path.parent / os.readlink(path)))


def _remove_cache_entries(path: Path, entry: Path) -> str:
    """Remove snapshot file ``path`` and its blob ``entry`` if that blob lies in the repo's ``blobs`` folder;
    returns what was done, for the checksum error. Never through a link: a link is removed, not what it points
    at, so a cache entry relinked to a file outside the cache costs the user nothing but the link."""
    snapshots = next((parent for parent in path.parents if parent.name == "snapshots"), None)
    blobs = snapshots.parent / "blobs" if snapshots is not None else None
    candidates = [
        candidate
        for candidate in dict.fromkeys((path, entry))
        if (candidate == path or (blobs is not None and candidate.parent == blobs))
        and (candidate.is_symlink() or candidate.is_file())
    ]
    return _discard(candidates, "the cache (nothing outside it)")


def _discard(paths: list[Path], where: str) -> str:
    """Unlink ``paths`` (a link, never what it points at); what was done, for a checksum error's message: a
    read-only cache keeps the bad copy, and the error says so instead of failing with the ``OSError``."""
    try:
        for path in paths:
            path.unlink()
    except OSError as error:
        return (
            f"The bad copy could not be removed from {where} ({error.strerror or error}: {', '.join(map(str, paths))});"
            f" delete it by hand, or load from another cache."
        )
    return f"The bad copy was removed from {where} ({', '.join(map(str, paths))}); load again to download it afresh."


def _link_text(path: Path) -> str:
    return f"a link to {os.readlink(path)}" if path.is_symlink() else "a plain file"


def _git_blob_id(data: bytes) -> str:
    """The git blob id (sha1 of ``blob <size>\\0<bytes>``): the Hub's ETag of a small, non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fetch_url_bytes(
    url: str, sha256_prefix: str, directory: str | os.PathLike | None = None, size: int | None = None
) -> tuple[str, bytes]:
    """Path of the file at ``url`` in ``directory`` (default: torch.hub's ``checkpoints`` folder), downloaded if
    needed, and its bytes, read once: its sha256 must start with ``sha256_prefix`` (a full sha256 works too), on
    download and cache hits, and the bytes returned are those checked. ``size``: the file's pinned size, the most
    a download writes (default: :data:`.files.MAX_WEIGHTS_BYTES`)."""
    path = Path(directory or Path(torch.hub.get_dir(), "checkpoints")) / Path(urlparse(url).path).name
    if not path.is_file():
        if constants.is_offline_mode():
            raise _url_unavailable(url, path, "HF_HUB_OFFLINE is set")
        try:
            _fetch_bounded(url, path, sha256_prefix, size or MAX_WEIGHTS_BYTES)
        except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError, TimeoutError, IncompleteRead
            if isinstance(error, ChecksumMismatchError):
                raise
            raise _url_unavailable(url, path, _reason(error)) from error
    return str(path), _read_checked(path, url, sha256_prefix)


def _read_checked(path: Path, url: str, sha256_prefix: str) -> bytes:
    """The bytes of cached ``path``, whose sha256 must start with ``sha256_prefix``; else the copy is removed (the
    cache entry only: a link, not what it points at) and :class:`~.errors.ChecksumMismatchError` raised."""
    data = read_regular_file(path, MAX_WEIGHTS_BYTES, InvalidWeightsFileError)
    actual = hashlib.sha256(data).hexdigest()
    if not actual.startswith(sha256_prefix):
        raise ChecksumMismatchError(
            f"{path} (from {url}): sha256 {actual} does not start with {sha256_prefix}. "
            f"{_discard([path], str(path.parent))}"
        )
    return data


def _fetch_bounded(
    url: str, path: Path, sha256_prefix: str, limit: int, hub: str | None = None, name: str | None = None
) -> None:
    """The one download of every path (URL and Hub): GET ``url`` into a temporary file beside ``path``, waiting at
    most :data:`TIMEOUT_S` for the connection and for each read, writing at most ``limit`` bytes at no less than
    the minimum rate (:func:`_transfer_meter`); rename it to ``path`` only if it is complete and its sha256
    starts with ``sha256_prefix``. Nothing is left behind on failure; the temporary file is locked while it is
    written, so that one a killed download left is told from one in progress (and removed by the next). The Hub
    client's headers (its token) go to addresses on the Hub ``hub`` only. Errors name the file ``name`` (default:
    ``url``). A progress bar on a terminal only."""
    name = name or url
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX)  # of killed downloads
    digest, received = hashlib.sha256(), 0
    headers = build_hf_headers() if hub and url.startswith(hub.rstrip("/") + "/") else {}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX)
    try:
        lock_file(handle)
        request = urllib.request.Request(url, headers=headers)
        with os.fdopen(handle, "wb") as file, urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            expected = response.length
            if expected is not None and expected > limit:
                raise ChecksumMismatchError(f"{name}: the server announces {expected:,} bytes, more than {limit:,}")
            meter = _transfer_meter(name, limit)
            with meter(
                total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name, leave=False, disable=None
            ) as bar:
                while chunk := response.read1(1 << 20):  # what has arrived: a drip reaches the meter
                    bar.update(len(chunk))  # before the write: raises past the limit or below the minimum rate
                    file.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
            if expected is not None and received != expected:
                raise http.client.IncompleteRead(b"", expected - received)
            actual = digest.hexdigest()
            if not actual.startswith(sha256_prefix):
                raise ChecksumMismatchError(
                    f"{name}: sha256 {actual} does not start with {sha256_prefix}; nothing was saved"
                )
            file.flush()
            os.replace(temporary, path)  # while the file is still locked: no cleaner takes it for a leftover
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _url_unavailable(url: str, path: Path, reason: str) -> WeightsNotAvailableError:
    return WeightsNotAvailableError(
        f"Cannot download {url}: {reason}. It is not at {path} either. To get it: download it once while online; "
        f"or copy the file to {path} (TORCH_HOME moves that folder); or pass weights='path/to/{path.name}'."
    )


def fetch_manifest_weights(
    key: str, entry: dict[str, Any], *, cache_dir: str | os.PathLike | None = None, endpoint: str | None = None
) -> tuple[str, bytes]:
    """Path and bytes (read once: those that were checked) of the verified weights file of manifest entry ``key``:
    its Hub file, else its URL (a torchvision ``.pth``) when the Hub copy cannot be had. A checksum mismatch is
    raised, except at a floating Hub revision (a branch such as ``main``, which may have moved on since the sha256
    was pinned): then the URL is tried, with a warning that says so."""
    failures, mismatch = [], None
    hub = entry.get("hub")
    source = entry.get("url")
    if hub:
        if not hub["sha256"]:
            warnings.warn(
                f"{key} is not pinned: weights_manifest.json records no sha256 for {hub['repo_id']}/"
                f"{hub['filename']}, so the file is checked against the Hub's own LFS sha256 only.",
                stacklevel=2,
            )
        try:
            return fetch_hub_bytes(
                hub["repo_id"],
                hub["filename"],
                revision=hub["revision"],
                sha256=hub["sha256"],
                size=hub.get("size"),
                cache_dir=cache_dir,
                endpoint=endpoint,
            )
        except WeightsNotAvailableError as error:
            failures.append(str(error))
        except ChecksumMismatchError as error:  # at a branch the file may have moved on: try the next source
            if not source or _COMMIT.fullmatch(hub["revision"] or ""):
                raise
            mismatch = error
            failures.append(str(error))
    if source:
        try:
            path, data = fetch_url_bytes(
                source["url"], source["sha256"] or source["sha256_prefix"], size=source.get("size")
            )
        except WeightsNotAvailableError as error:
            failures.append(str(error))
        else:
            if mismatch:
                warnings.warn(
                    f"{key}: the Hub copy does not match the pinned sha256 ({mismatch}); loaded "
                    f"{source['url']} instead, which matches its own pinned hash.",
                    stacklevel=2,
                )
            elif failures:
                warnings.warn(f"{key}: the Hub copy is not available, loaded {source['url']} instead.", stacklevel=2)
            return path, data
    raise WeightsNotAvailableError(f"No source of {key} is available:\n- " + "\n- ".join(failures))
