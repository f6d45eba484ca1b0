"""A stand-in Hugging Face hub on 127.0.0.1, speaking what huggingface_hub's download code uses.

Endpoints: `GET /api/models/{repo}[/revision/{rev}]` (model info; `?blobs=true` adds sizes,
git blob ids and LFS sha256), `GET /api/models/{repo}/tree/{rev}` (the listing
`snapshot_download` uses), `HEAD|GET /{repo}/resolve/{rev}/{path}` (file bytes with the
hub's headers: ETag, X-Repo-Commit, X-Linked-Etag, X-Linked-Size, Range → 206).

Faults a test can ask for, per file: drop the connection after N bytes (once), serve wrong
bytes of the right size (N times), stall after N bytes until released; and model info with
hostile fields (a commit or hashes shaped as paths). Every request is
logged with its Range header and the body bytes sent, so a test can see what was fetched.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_PATTERNS = ("*.safetensors", "*.gguf", "*.bin")


@dataclass
class HostedFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        """Git blob sha1 (for LFS files the hub gives the pointer's; any stable id works here)."""
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class HostedRepo:
    commit: str
    files: dict[str, HostedFile]


@dataclass
class Faults:
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes, once
    corrupt: dict[str, int] = field(default_factory=dict)  # path -> how many more GETs
    stall_after: dict[str, int] = field(default_factory=dict)  # path -> bytes, until `release`
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    # A hostile or broken hub: {"sha": ...} replaces the commit in model info, and
    # {"siblings": {path: {field: value}}} replaces fields of a file's entry.
    info: dict = field(default_factory=dict)


class HubServer:
    """Start with `with HubServer() as hub:`; point HF_ENDPOINT at `hub.url`."""

    def __init__(self) -> None:
        self.repos: dict[str, HostedRepo] = {}
        self.faults = Faults()
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, directory: Path) -> str:
        """Host every file under `directory` as `repo_id`; returns the commit id."""
        files = {}
        for p in sorted(Path(directory).rglob("*")):
            if p.is_file():
                rel = p.relative_to(directory).as_posix()
                files[rel] = HostedFile(
                    p.read_bytes(), any(fnmatch.fnmatch(p.name, pat) for pat in LFS_PATTERNS)
                )
        digest = hashlib.sha1(
            repr(sorted((k, f.etag) for k, f in files.items())).encode()
        ).hexdigest()
        self.repos[repo_id] = HostedRepo(commit=digest, files=files)
        return digest

    def requests(self, path_suffix: str = "", method: str | None = None) -> list[dict]:
        with self._lock:
            return [
                r
                for r in self.log
                if r["path"].endswith(path_suffix) and (method is None or r["method"] == method)
            ]

    def record(self, entry: dict) -> None:
        with self._lock:
            self.log.append(entry)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.faults.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

        def _route(self, head: bool) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            entry = {
                "method": self.command,
                "path": path,
                "range": self.headers.get("Range"),
                "sent": 0,
                "status": 0,
            }
            if (
                path == "/api/agent-harnesses"
            ):  # huggingface_hub's once-a-day registry probe, not a model request
                return self._error(entry, 404, "EntryNotFound", "not served here")
            hub.record(entry)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
            if m:
                return self._tree(entry, *m.groups())
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", path)
            if m:
                return self._info(
                    entry, m.group(1), m.group(2) or "main", "blobs" in parse_qs(url.query)
                )
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._file(entry, head, *m.groups())
            self._error(entry, 404, "EntryNotFound", "no such endpoint")

        def _repo(self, entry: dict, repo_id: str, rev: str) -> HostedRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(entry, 404, "RepoNotFound", f"Repository {repo_id} not found")
            elif rev not in ("main", repo.commit):
                self._error(
                    entry, 404, "RevisionNotFound", f"Revision {rev} not found", repo.commit
                )
            else:
                return repo
            return None

        def _info(self, entry: dict, repo_id: str, rev: str, blobs: bool) -> None:
            repo = self._repo(entry, repo_id, rev)
            if repo is None:
                return
            siblings = []
            for name, f in repo.files.items():
                s: dict = {"rfilename": name}
                if blobs:
                    s.update(size=len(f.data), blobId=f.blob_id)
                    if f.lfs:
                        s["lfs"] = {"size": len(f.data), "sha256": f.sha256, "pointerSize": 134}
                s.update(hub.faults.info.get("siblings", {}).get(name, {}))
                siblings.append(s)
            sha = hub.faults.info.get("sha", repo.commit)
            body = json.dumps(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": False,
                    "siblings": siblings,
                    "tags": ["mlx"],
                }
            ).encode()
            self._send(entry, 200, body, {"Content-Type": "application/json"})

        def _tree(self, entry: dict, repo_id: str, rev: str, under: str | None) -> None:
            """The recursive file listing snapshot_download asks for."""
            repo = self._repo(entry, repo_id, rev)
            if repo is None:
                return
            items = []
            for name, f in repo.files.items():
                if under and not name.startswith(under.rstrip("/") + "/"):
                    continue
                item: dict = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": name}
                if f.lfs:
                    item["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                items.append(item)
            self._send(entry, 200, json.dumps(items).encode(), {"Content-Type": "application/json"})

        def _file(self, entry: dict, head: bool, repo_id: str, rev: str, name: str) -> None:
            repo = self._repo(entry, repo_id, rev)
            if repo is None:
                return
            f = repo.files.get(name)
            if f is None:
                return self._error(entry, 404, "EntryNotFound", f"{name} not found", repo.commit)
            data = f.data
            if not head and hub.faults.corrupt.get(name, 0) > 0:
                hub.faults.corrupt[name] -= 1
                data = bytes(b ^ 0x5A for b in data[:4096]) + data[4096:]  # same size, wrong bytes
            headers = {
                "X-Repo-Commit": repo.commit,
                "ETag": f'"{f.blob_id}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if f.lfs:
                headers.update(
                    {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data))}
                )
            status, start = 200, 0
            rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if rng and not head:
                start = int(rng.group(1))
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(entry, status, data[start:], headers, head=head, fault_key=name)

        def _error(
            self, entry: dict, status: int, code: str, message: str, commit: str | None = None
        ) -> None:
            headers = {
                "Content-Type": "application/json",
                "X-Error-Code": code,
                "X-Error-Message": message,
            }
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(entry, status, json.dumps({"error": message}).encode(), headers)

        def _send(
            self,
            entry: dict,
            status: int,
            body: bytes,
            headers: dict,
            head: bool = False,
            fault_key: str | None = None,
        ) -> None:
            entry["status"] = status
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            faults = hub.faults
            if fault_key in faults.drop_after:
                cut = faults.drop_after.pop(fault_key)
                self._write(entry, body[:cut])
                return self._hang_up()
            if fault_key in faults.stall_after:
                cut = faults.stall_after.pop(fault_key)
                self._write(entry, body[:cut])
                faults.stalled.set()
                faults.release.wait(60)
                return self._hang_up()
            self._write(entry, body)

        def _write(self, entry: dict, data: bytes) -> None:
            try:
                for i in range(0, len(data), 1 << 16):
                    self.wfile.write(data[i : i + (1 << 16)])
                    entry["sent"] += len(data[i : i + (1 << 16)])
                self.wfile.flush()
            except OSError:
                self.close_connection = True

        def _hang_up(self) -> None:
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    return Handler
