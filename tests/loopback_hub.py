"""A small Hugging Face Hub on 127.0.0.1 for offline tests, speaking the HTTP the real client speaks.

It serves ``/{org}/{name}/resolve/{revision}/{filename}`` (large files in the LFS style: a 302 to another host
with ``X-Linked-Etag`` = sha256 and ``X-Linked-Size``; small files directly with their git blob id as ETag), the
upload API that ``HfApi.create_repo`` / ``upload_folder`` / ``get_paths_info`` use, and plain files for
torchvision-style URLs. Faults can be switched on per file to prove that the loader refuses what it must.
Every request is logged in ``requests`` as ``(method, path)``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".pth", ".bin")
FAULTS = ("tamper", "truncate", "empty", "error500", "drip", "endless", "gzip")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LoopbackHub:
    """Start with ``LoopbackHub()``, stop with ``close()``; ``endpoint`` is the address to pass to clients."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.url_files: dict[str, bytes] = {}  # URL path -> bytes
        self.lfs_objects: dict[str, tuple[bytes, str | None]] = {}  # what a 302 points at: bytes, fault
        self.faults: dict[str, str] = {}  # filename or URL path -> one of FAULTS
        self.requests: list[tuple[str, str]] = []
        self._commit_counter = itertools.count()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Add or replace ``files`` on ``branch`` of ``repo_id`` (created if needed); returns the new commit."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo())
            parent = repo.commits.get(repo.refs.get(branch, ""), {})
            oid = hashlib.sha1(f"{repo_id}:{next(self._commit_counter)}".encode()).hexdigest()
            repo.commits[oid] = {**parent, **files}
            repo.refs[branch] = oid
            return oid

    def resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos[repo_id]
        oid = repo.refs.get(revision, revision)
        return (oid, repo.commits[oid]) if oid in repo.commits else None

    def requests_for(self, fragment: str) -> list[tuple[str, str]]:
        return [request for request in self.requests if fragment in request[1]]


def _handler_for(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: no pooled connection outlives the server

        def log_message(self, *args) -> None:
            pass

        # -- plumbing -------------------------------------------------------------------------------------------
        def _send(
            self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: int | None = None
        ) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, payload, status: int = 200) -> None:
            self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Code": code} if code else {}
            self._send(
                status,
                json.dumps({"error": message}).encode(),
                {**headers, "X-Error-Message": message, "Content-Type": "application/json"},
            )

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        # -- routes ---------------------------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._route()

        def do_GET(self) -> None:
            self._route()

        def do_POST(self) -> None:
            self._route()

        def _route(self) -> None:
            path = urlparse(self.path).path
            hub.requests.append((self.command, path))
            parts = [unquote(part) for part in path.strip("/").split("/")]
            if path in hub.url_files:
                self._serve_url_file(path)
            elif parts[0] == "lfs":
                self._serve_lfs(parts[1])
            elif parts[:2] == ["api", "repos"]:
                self._create_repo()
            elif parts[:2] == ["api", "validate-yaml"]:
                self._json({"errors": [], "warnings": []})
            elif parts[0] == "api" and len(parts) >= 6:
                self._repo_api(f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:]))
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            else:
                self._error(404, None, f"no route for {path}")

        def _lookup(self, repo_id: str, revision: str):
            if repo_id not in hub.repos:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            found = hub.resolve(repo_id, revision)
            if found is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return found

        def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
            found = self._lookup(repo_id, revision)
            if found is None:
                return
            oid, files = found
            if filename not in files:
                self._error(404, "EntryNotFound", f"{filename} does not exist at {revision}")
                return
            fault = hub.faults.get(filename)
            if fault == "error500":
                self._error(500, None, "Internal Error")
                return
            data = b"" if fault == "empty" else files[filename]
            headers = {"X-Repo-Commit": oid}
            if filename.endswith(LFS_SUFFIXES):
                sha256 = hashlib.sha256(files[filename]).hexdigest()
                lfs_key = f"{sha256}-{fault}-{filename}" if fault else sha256
                hub.lfs_objects[lfs_key] = (data, fault)
                headers.update(
                    {
                        "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest() if fault == "empty" else sha256}"',
                        "X-Linked-Size": str(len(data)),
                        "ETag": f'"{git_blob_id(data)}"',
                        "Location": f"http://localhost:{hub.port}/lfs/{lfs_key}",
                    }
                )
                self._send(302, b"", headers)
            else:
                headers["ETag"] = f'"{git_blob_id(data)}"'
                self._send(200, data, headers)

        def _serve_lfs(self, key: str) -> None:
            data, fault = hub.lfs_objects[key]
            self._send_with_fault(data, fault)

        def _serve_url_file(self, path: str) -> None:
            self._send_with_fault(hub.url_files[path], hub.faults.get(path))

        def _send_with_fault(self, data: bytes, fault: str | None) -> None:
            if fault == "tamper":
                data = bytes([data[0] ^ 0xFF]) + data[1:]  # same size, other bytes
            if fault == "truncate":
                self._send(200, data[: len(data) // 2], length=len(data))  # announces more than it sends
            elif fault in ("drip", "endless", "gzip"):
                self._stream(data, fault)
            else:
                self._send(200, data)

        def _stream(self, data: bytes, fault: str) -> None:
            """drip: the file, announced, one byte every 50 ms (every read in time, the whole never ends); endless:
            no Content-Length, the file then zeros for as long as the client reads (up to 1 GiB); gzip: no
            Content-Length, a gzip-encoded body that decodes (and, raw, runs) far past the file's size."""
            self.send_response(200)
            if fault == "drip":
                self.send_header("Content-Length", str(len(data)))
            if fault == "gzip":
                self.send_header("Content-Encoding", "gzip")
                data = gzip.compress(data * 4)
            self.end_headers()
            try:
                if fault == "drip":
                    for index in range(len(data)):
                        self.wfile.write(data[index : index + 1])
                        self.wfile.flush()
                        time.sleep(0.05)
                else:
                    self.wfile.write(data)
                    for _ in range(1024 if fault == "endless" else 0):
                        self.wfile.write(bytes(1 << 20))
            except OSError:  # the client hung up: what the test wants
                pass

        def _create_repo(self) -> None:
            payload = json.loads(self._body())
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id not in hub.repos:
                hub.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            self._json({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def _repo_api(self, repo_id: str, action: str, revision: str) -> None:
            body = self._body()
            found = self._lookup(repo_id, revision)
            if found is None:
                return
            oid, files = found
            if action == "preupload":
                self._json(
                    {
                        "files": [
                            {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                            for item in json.loads(body)["files"]
                        ]
                    }
                )
            elif action == "commit":
                self._commit(repo_id, revision, body)
            elif action == "paths-info":
                self._paths_info(files, parse_qs(body.decode())["paths"])
            elif action == "revision":
                self._json({"id": repo_id, "sha": oid, "siblings": [{"rfilename": name} for name in files]})
            else:
                self._error(404, None, f"no API action {action}")

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            files = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            oid = hub.commit(repo_id, files, branch=revision)
            self._json({"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True})

        def _paths_info(self, files: dict[str, bytes], paths: list[str]) -> None:
            infos = []
            for path in paths:
                if path not in files:
                    continue
                data = files[path]
                info = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
                if path.endswith(LFS_SUFFIXES):
                    info["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                infos.append(info)
            self._json(infos)

    return Handler


class SilentServer:
    """A TCP port on 127.0.0.1 that accepts connections (the kernel completes the handshake) but never answers:
    a network that hangs. ``close()`` resets every waiting connection, so nothing outlives the test."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.endpoint = f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def close(self) -> None:
        self.socket.close()
