"""Fetching weights files from the Hugging Face Hub (``hf_hub_download``: revisions, cache, locks,
``HF_HUB_OFFLINE``) or a URL (torchvision's ``.pth``), checked on the very bytes returned: against the pinned
sha256, else the hash the Hub cache blob is named by; a mismatch removes the cache's copy (never through a link).
Every transfer is bounded by :func:`_meter` (also the progress bar): :data:`TIMEOUT_S` per connection and read, at
least :data:`MIN_RATE_BYTES_S` after :data:`GRACE_S` s, never more than the pinned size (else 4 GiB).
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
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers, tqdm

from .errors import ChecksumMismatchError, InvalidWeightsFileError, UnverifiedWeightsError, WeightsNotAvailableError
from .files import MAX_WEIGHTS_BYTES, env_flag, read_regular_file
from .manifest import PretrainedCfg

TIMEOUT_S = 10.0  # seconds a request waits for a connection or for the next bytes
MIN_RATE_BYTES_S = 10_000  # a transfer slower than this on average, after GRACE_S seconds, is cut off
GRACE_S = 30.0
ALLOW_UNVERIFIED_ENV = "DENSENET_EFFICIENT_ALLOW_UNVERIFIED"  # on: load a Hub file that no hash can verify
_HASH = re.compile(r"[0-9a-f]{64}|[0-9a-f]{40}")  # a sha256, or a git blob id / commit
_FLOATING = " {!r} is a branch, not a commit: the Hub's file may have changed since the pin; pin the commit"


def _meter(name: str, limit: int) -> type[tqdm]:
    """A progress bar (terminal only) that stops a transfer (:class:`~.errors.WeightsNotAvailableError`) past
    ``limit`` bytes or under the minimum rate; one class per transfer: the deadline spans the client's resumes."""
    started, received = time.monotonic(), 0

    class Meter(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            if (total := kwargs.get("total") or 0) > limit:
                raise WeightsNotAvailableError(f"{name}: the server announces {total:,} bytes, more than {limit:,}")
            super().__init__(*args, **{**kwargs, "disable": kwargs.get("disable") or None})

        def update(self, n: float | None = 1) -> bool | None:
            nonlocal received
            received, elapsed = received + int(n or 0), time.monotonic() - started
            if received > limit:
                raise WeightsNotAvailableError(f"{name}: the server sent more than the file's {limit:,} bytes")
            if elapsed > GRACE_S and received < MIN_RATE_BYTES_S * elapsed:
                raise WeightsNotAvailableError(
                    f"{name}: {received:,} bytes in {elapsed:.0f} s, below the minimum rate of {MIN_RATE_BYTES_S:,} B/s"
                )
            return super().update(n)

    return Meter


def _reason(error: BaseException) -> str:
    """``Type: first line`` of the error's root cause (a Hub client error wraps the HTTP or connection error)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    lines = [line.strip().rstrip(".") for line in str(error).splitlines() if line.strip()] or ["no details"]
    return f"{type(error).__name__}: {lines[0]}"


def _discard(paths: list[Path]) -> str:
    """Unlink ``paths`` (links, never their targets); what was done, for the checksum error."""
    try:
        for path in paths:
            path.unlink()
    except OSError as error:  # a read-only cache: the checksum error still says what is wrong
        return f"The bad copy could not be removed ({error.strerror or error}): delete {paths[0]} by hand."
    return f"The bad copy was removed ({', '.join(map(str, paths))}); load again to download it afresh."


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
    """Path of Hub file ``repo_id/filename`` in the HF cache (downloaded if needed) and its bytes (at most ``size``),
    read once and verified against ``sha256``, else its cache blob's name; unverifiable:
    :class:`~.errors.UnverifiedWeightsError` unless ``$DENSENET_EFFICIENT_ALLOW_UNVERIFIED`` is on."""
    revision = revision or constants.DEFAULT_REVISION
    name, limit = f"{repo_id}/{filename}@{revision}", size or MAX_WEIGHTS_BYTES
    floating = "" if _HASH.fullmatch(revision) else _FLOATING.format(revision)
    cache_dir = None if cache_dir is None else Path(cache_dir)  # huggingface_hub is typed for str | Path
    try:
        if not constants.HF_HUB_OFFLINE and not isinstance(
            try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision), str
        ):  # one HEAD without the client's retries: an unreachable Hub fails at once, a known mismatch costs no GET
            served = get_hf_file_metadata(
                hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint), timeout=TIMEOUT_S
            )
            etag, served_size = served.etag or "", served.size or 0
            mismatch = bool(sha256) and len(etag) == 64 and etag != sha256
            if mismatch or served_size > limit:
                too_big = f"{served_size:,} bytes, more than the {limit:,}"
                problem = f"sha256 {etag}, expected {sha256}" if mismatch else too_big
                raise ChecksumMismatchError(f"{name}: the Hub serves {problem}; nothing was downloaded.{floating}")
            if etag:  # the transfer, bounded, into the blob the client then links (its own has no deadline)
                folder = Path(cache_dir or constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"))
                on_hub = served.location.startswith((endpoint or constants.ENDPOINT).rstrip("/") + "/")
                _download(served.location, folder / "blobs" / etag, limit, build_hf_headers() if on_hub else {})
        options: dict[str, Any] = dict(cache_dir=cache_dir, endpoint=endpoint, etag_timeout=TIMEOUT_S)
        path = Path(hf_hub_download(repo_id, filename, revision=revision, tqdm_class=_meter(name, limit), **options))
    except Exception as error:  # HTTP, connection, offline without a copy, a transfer the meter stopped
        if isinstance(error, (WeightsNotAvailableError, ChecksumMismatchError)):
            raise
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _reason(error)
        raise WeightsNotAvailableError(
            f"Cannot get {filename} of Hub repo {repo_id} (revision {revision}): {reason}; not in the cache "
            f"{cache_dir or constants.HF_HUB_CACHE} either: set HF_HUB_CACHE, or weights='path/to/{filename}'"
        ) from error
    blob = Path(os.path.normpath(path.parent / os.readlink(path))) if path.is_symlink() else path
    data = read_regular_file(path, limit, InvalidWeightsFileError)
    expected = sha256 or (blob.name if _HASH.fullmatch(blob.name) else None)
    if expected is None:
        if not env_flag(ALLOW_UNVERIFIED_ENV):
            raise UnverifiedWeightsError(
                f"{name}: {path} is no cache blob named by its hash and no sha256 is pinned: pin one, or set "
                f"{ALLOW_UNVERIFIED_ENV}=1 to load it unverified"
            )
        warnings.warn(f"{name}: loading it unverified because {ALLOW_UNVERIFIED_ENV} is set", stacklevel=2)
        return str(path), data
    digest = hashlib.sha256(data) if len(expected) == 64 else hashlib.sha1(b"blob %d\0" % len(data) + data)
    actual = digest.hexdigest()  # a sha256, or the git blob id the Hub names a small file by
    if actual != expected:
        in_cache = [path] + [blob] * (blob != path and blob.parent.name == "blobs")
        raise ChecksumMismatchError(
            f"{name}: the file's hash is {actual}, expected {expected}.{floating} {_discard(in_cache)} "
            f"(the cache's own copy; nothing outside it)"
        )
    return str(path), data


def fetch_url_bytes(
    url: str, sha256: str, directory: str | os.PathLike | None = None, size: int | None = None
) -> tuple[str, bytes]:
    """Path of the file at ``url`` in ``directory`` (default: torch.hub's ``checkpoints``), downloaded if needed,
    and its bytes, read once: their sha256 must start with ``sha256`` (torchvision's name prefix, or all of it)."""
    path = Path(directory or Path(torch.hub.get_dir(), "checkpoints")) / Path(urlparse(url).path).name
    limit = size or MAX_WEIGHTS_BYTES
    if not path.is_file():
        try:
            if constants.HF_HUB_OFFLINE:
                raise ConnectionError("HF_HUB_OFFLINE is set")
            _download(url, path, limit)
        except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError, timeouts, IncompleteRead
            if isinstance(error, WeightsNotAvailableError):
                raise
            raise WeightsNotAvailableError(f"Cannot download {url}: {_reason(error)}; not at {path} either") from error
    data = read_regular_file(path, limit, InvalidWeightsFileError)
    actual = hashlib.sha256(data).hexdigest()
    if not actual.startswith(sha256):
        raise ChecksumMismatchError(
            f"{path} (from {url}): sha256 {actual} does not start with {sha256}. {_discard([path])}"
        )
    return str(path), data


def _download(url: str, path: Path, limit: int, headers: dict[str, str] | None = None) -> None:
    """GET ``url`` into a temporary file beside ``path``, bounded by :func:`_meter`, renamed to ``path`` only when
    complete; nothing is left on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with (
            os.fdopen(handle, "wb") as file,
            urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=TIMEOUT_S) as response,
            _meter(url, limit)(total=response.length, unit="B", unit_scale=True, desc=path.name, leave=False) as bar,
        ):
            expected, received = response.length, 0  # response.length counts down as it is read
            while chunk := response.read1(1 << 20):  # what has arrived: a drip reaches the meter
                bar.update(len(chunk))
                file.write(chunk)
                received += len(chunk)
            if expected is not None and received != expected:
                raise http.client.IncompleteRead(b"", expected - received)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def fetch_manifest_weights(
    entry: PretrainedCfg, *, cache_dir: str | os.PathLike | None = None, endpoint: str | None = None
) -> tuple[str, bytes]:
    """Path and verified bytes of a manifest entry's weights: its Hub file, else its URL. A checksum mismatch is
    raised, except at a branch (it may have moved since the pin): then the URL is loaded, with a warning."""
    key, hub, source, failures = entry.key, entry.hub, entry.url, []
    if hub:
        if not hub.sha256:
            warnings.warn(f"{key} is not pinned: checked against the Hub's own LFS sha256 only", stacklevel=2)
        options: dict[str, Any] = dict(revision=hub.revision, sha256=hub.sha256, size=hub.size)
        try:
            return fetch_hub_bytes(hub.repo_id, hub.filename, cache_dir=cache_dir, endpoint=endpoint, **options)
        except WeightsNotAvailableError as error:
            failures.append(str(error))
            why = "the Hub copy is not available"
        except ChecksumMismatchError as error:
            if not source or _HASH.fullmatch(hub.revision or ""):
                raise
            failures.append(str(error))
            why = f"the Hub copy does not match the pinned sha256 ({error})"
    if source:
        try:
            path, data = fetch_url_bytes(source.url, source.sha256 or source.sha256_prefix, size=source.size)
        except WeightsNotAvailableError as error:
            failures.append(str(error))
        else:
            if failures:
                warnings.warn(f"{key}: {why}, loaded {source.url} instead.", stacklevel=2)
            return path, data
    raise WeightsNotAvailableError(f"No source of {key} is available:\n- " + "\n- ".join(failures))
