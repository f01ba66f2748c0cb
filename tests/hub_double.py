"""A stand-in for the Hugging Face Hub on 127.0.0.1, for testing real uploads and downloads offline.

It implements only what ``huggingface_hub`` (2.x, plain LFS protocol: ``HF_HUB_DISABLE_XET=1``)
and ``transformers.from_pretrained`` call to create a repository, commit files and read them back:

* ``POST /api/repos/create``                       create a model repository (409 if it exists)
* ``POST /api/models/{repo}/branch/{branch}``      create a branch from main (409 if it exists)
* ``POST /api/validate-yaml``                      accept the model card's metadata
* ``POST /api/models/{repo}/preupload/{rev}``      say which files go through LFS
* ``POST /{repo}.git/info/lfs/objects/batch``      LFS batch API: where to PUT each new object
* ``PUT  /lfs-objects/{oid}``                      receive an LFS object (sha256 checked)
* ``POST /api/models/{repo}/commit/{rev}``         NDJSON commit: regular files inline, LFS by oid
* ``GET  /api/models/{repo}[/revision/{rev}]``     model info (sha, siblings)
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``        file download with ETag, X-Repo-Commit,
  X-Linked-Etag / X-Linked-Size (LFS) and Content-Length, as ``hf_hub_download`` expects

Every request but the LFS object PUT (which stands for a pre-signed storage URL, so the client
sends no token there) needs ``Authorization: Bearer <token>`` with the one valid token; any other
token gets 401, as the Hub answers a bad token. ``fail_next`` makes the next matching request fail with a
given status. Everything received (method, path, headers, body) is kept in ``received`` so tests
can check what left the client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".pt", ".pth")
LFS_MIN_SIZE = 10_000  # this double sends files above 10 kB through LFS (the Hub: binary or > 10 MB)
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_blob_sha1(self.content)


@dataclass
class Repo:
    private: bool
    # branch -> (commit sha, {path: StoredFile})
    branches: dict = field(default_factory=dict)
    commits: dict = field(default_factory=dict)  # sha -> {path: StoredFile}


@dataclass
class Request:
    method: str
    path: str
    headers: dict
    body: bytes


class HubDouble:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.received: list[Request] = []
        self.fail_next: dict[str, int] = {}  # regex on "METHOD /path" -> status to answer once
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # --- helpers for tests -------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        _, files = self.repos[repo_id].branches[revision]
        return {path: stored.content for path, stored in files.items()}

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits) - 1  # minus the empty initial commit

    def _handler_class(self):
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _dispatch(self, method: str):
                body = self._body() if method in ("POST", "PUT") else b""
                path = urlsplit(self.path).path
                with double.lock:
                    double.received.append(Request(method, self.path, dict(self.headers), body))
                    for pattern, status in list(double.fail_next.items()):
                        if re.search(pattern, f"{method} {path}"):
                            del double.fail_next[pattern]
                            return self._json(status, {"error": f"injected failure {status}"})
                    # LFS object URLs stand for the Hub's pre-signed storage URLs: no token is sent there.
                    presigned = path.startswith("/lfs-objects/")
                    if not presigned and self.headers.get("Authorization") != f"Bearer {double.token}":
                        return self._json(401, {"error": "Invalid credentials in Authorization header"})
                    try:
                        return double._route(self, method, path, body)
                    except Exception as error:  # a bug in the double: show it in the test
                        self._json(500, {"error": f"hub double: {type(error).__name__}: {error}"})
                        raise

            def do_GET(self):
                self._dispatch("GET")

            def do_HEAD(self):
                self._dispatch("HEAD")

            def do_POST(self):
                self._dispatch("POST")

            def do_PUT(self):
                self._dispatch("PUT")

            def _send(self, status: int, payload: bytes, headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if not head:
                    self.wfile.write(payload)

            def _json(self, status: int, data, headers: dict | None = None, head: bool = False):
                self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

        return Handler

    # --- the Hub's behaviour -----------------------------------------------------------------

    def _new_commit(self, repo: Repo, files: dict) -> str:
        sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        repo.commits[sha] = files
        return sha

    def _resolve(self, repo: Repo, revision: str):
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision, repo.commits[revision]
        return None

    def _route(self, h, method: str, path: str, body: bytes):
        match = None

        def route(pattern: str, verb: str | tuple) -> bool:
            nonlocal match
            verbs = (verb,) if isinstance(verb, str) else verb
            match = re.fullmatch(pattern, path) if method in verbs else None
            return match is not None

        if route(r"/api/repos/create", "POST"):
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            if repo_id in self.repos:
                return h._json(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
            repo = Repo(private=data.get("visibility") == "private" or bool(data.get("private")))
            repo.branches["main"] = (self._new_commit(repo, {}), {})
            self.repos[repo_id] = repo
            return h._json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex})

        if route(r"/api/validate-yaml", "POST"):
            return h._json(200, {"errors": [], "warnings": []})

        if route(rf"/api/models/{REPO}/branch/(?P<branch>.+)", "POST"):
            repo = self.repos.get(match["repo"])
            if repo is None:
                return self._repo_not_found(h)
            branch = unquote(match["branch"])
            if branch in repo.branches:
                return h._json(409, {"error": f"Reference refs/heads/{branch} already exists"})
            repo.branches[branch] = repo.branches["main"]
            return h._json(200, {})

        if route(rf"/api/models/{REPO}/preupload/(?P<rev>.+)", "POST"):
            repo = self.repos.get(match["repo"])
            if repo is None:
                return self._repo_not_found(h)
            resolved = self._resolve(repo, unquote(match["rev"]))
            existing = resolved[1] if resolved else {}
            answer = []
            for entry in json.loads(body)["files"]:
                lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] > LFS_MIN_SIZE
                stored = existing.get(entry["path"])
                answer.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                               "oid": stored.etag if stored else None})
            return h._json(200, {"files": answer, "commitOid": resolved[0] if resolved else None})

        if route(rf"/{REPO}\.git/info/lfs/objects/batch", "POST"):
            if match["repo"] not in self.repos:
                return self._repo_not_found(h)
            data = json.loads(body)
            objects = []
            for obj in data["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in self.lfs:
                    entry["actions"] = {"upload": {"href": f"{self.url}/lfs-objects/{obj['oid']}", "header": {}}}
                objects.append(entry)
            return h._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

        if route(r"/lfs-objects/(?P<oid>[0-9a-f]{64})", "PUT"):
            if hashlib.sha256(body).hexdigest() != match["oid"]:
                return h._json(400, {"error": "sha256 mismatch"})
            self.lfs[match["oid"]] = body
            return h._send(200, b"")

        if route(rf"/api/models/{REPO}/commit/(?P<rev>.+)", "POST"):
            repo = self.repos.get(match["repo"])
            if repo is None:
                return self._repo_not_found(h)
            revision = unquote(match["rev"])
            if revision not in repo.branches:
                return h._json(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
            _, files = repo.branches[revision]
            files = dict(files)
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in self.lfs:
                        return h._json(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                    files[value["path"]] = StoredFile(self.lfs[value["oid"]], lfs=True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
            sha = self._new_commit(repo, files)
            repo.branches[revision] = (sha, files)
            return h._json(200, {"commitUrl": f"{self.url}/{match['repo']}/commit/{sha}", "commitOid": sha,
                                 "success": True, "pullRequestUrl": None})

        if route(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "GET"):
            repo = self.repos.get(match["repo"])
            resolved = self._resolve(repo, unquote(match["rev"] or "main")) if repo else None
            if resolved is None:
                return self._repo_not_found(h)
            sha, files = resolved
            return h._json(200, {"id": match["repo"], "modelId": match["repo"], "sha": sha, "private": repo.private,
                                 "siblings": [{"rfilename": name} for name in sorted(files)], "tags": [], "downloads": 0})

        if route(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", ("GET", "HEAD")):
            repo = self.repos.get(match["repo"])
            resolved = self._resolve(repo, unquote(match["rev"])) if repo else None
            head = method == "HEAD"
            if resolved is None:
                return self._repo_not_found(h, head)
            sha, files = resolved
            stored = files.get(unquote(match["file"]))
            if stored is None:
                return h._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, head)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{stored.etag}"', "Content-Type": "application/octet-stream"}
            if stored.lfs:
                headers.update({"X-Linked-Etag": f'"{stored.etag}"', "X-Linked-Size": str(len(stored.content))})
            return h._send(200, stored.content, headers, head)

        return h._json(404, {"error": f"hub double: no route for {method} {path}"})

    @staticmethod
    def _repo_not_found(h, head: bool = False):
        return h._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
