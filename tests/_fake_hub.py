"""A local HTTP server speaking the part of the Hub API that ``huggingface_hub`` uses to create a
repo and commit files (create-repo, create-branch, validate-yaml, preupload, LFS batch / upload /
verify, commit), for the push-to-hub tests.

At preupload, as the Hub: ``*.safetensors`` (and the Hub's other default LFS patterns) and any file
over 10 MiB are "lfs", the rest "regular". A regular file's bytes come base64-encoded in the
commit's ndjson body; an LFS file goes through the LFS batch API (``{repo}.git/info/lfs/objects/batch``),
a PUT of its bytes (checked against its sha256, as the Hub's storage does) and a verify call,
and the commit names it by oid. The Xet transfer is not spoken: the tests set
``HF_HUB_DISABLE_XET`` so that ``huggingface_hub`` takes the LFS path. Commits are recorded in
arrival order with their files.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

USER = "tester"


@dataclass
class Commit:
    repo_id: str
    revision: str
    message: str
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # the paths that came through the LFS path


@dataclass
class FakeHub:
    server: ThreadingHTTPServer
    repos: dict[str, dict] = field(default_factory=dict)  # repo_id -> {"private": ..., "token": ...}
    commits: list[Commit] = field(default_factory=list)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 hex -> bytes uploaded
    fail_uploads: bool = False  # answer 500 to preupload and commit
    fail_create: bool = False  # answer 500 to create-repo
    # Uploads wait at preupload until this is set (a test holds an upload "in flight" with it).
    gate: threading.Event = field(default_factory=threading.Event)
    in_flight: int = 0
    max_in_flight: int = 0  # the most uploads seen between preupload and commit at once
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.gate.set()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo_id: str, revision: str = "main", upto: int | None = None) -> dict[str, bytes]:
        """The repo's tree at ``revision`` after the first ``upto`` commits (default: all)."""
        tree: dict[str, bytes] = {}
        for c in self.commits[:upto]:
            if c.repo_id == repo_id and c.revision == revision:
                tree.update(c.files)
        return tree

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores larger files through LFS
# The Hub's default .gitattributes LFS patterns (a subset: the weights formats).
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.npy", "*.zip")
_LFS_BATCH = re.compile(r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/lfs-objects/([0-9a-f]{64})(/verify)?$")
_PREUPLOAD = re.compile(r"^/api/models/([^/]+/[^/]+)/preupload/(.+)$")
_COMMIT = re.compile(r"^/api/models/([^/]+/[^/]+)/commit/(.+)$")
_BRANCH = re.compile(r"^/api/models/([^/]+/[^/]+)/branch/(.+)$")


def upload_mode(path: str, size: int) -> str:
    if size > LFS_THRESHOLD or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS):
        return "lfs"
    return "regular"


def _handler(hub_ref: list):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)

        def do_PUT(self):  # an LFS object's bytes (the "basic" transfer)
            hub: FakeHub = hub_ref[0]
            body = self._body()
            m = _LFS_OBJECT.match(self.path.split("?")[0])
            if hub.fail_uploads:
                return self._reply(500, {"error": "Internal Error (fake hub told to fail)"})
            if m is None or m.group(2):
                return self._reply(404, {"error": f"fake hub does not serve PUT {self.path}"})
            if hashlib.sha256(body).hexdigest() != m.group(1):
                return self._reply(400, {"error": "the uploaded bytes do not match the announced sha256"})
            with hub.lock:
                hub.lfs_objects[m.group(1)] = body
            return self._reply(200, {})

        def do_POST(self):
            hub: FakeHub = hub_ref[0]
            body = self._body()
            path = self.path.split("?")[0]

            if path == "/api/repos/create":
                if hub.fail_create:
                    return self._reply(500, {"error": "Internal Error (fake hub told to fail)"})
                req = json.loads(body)
                repo_id = f"{req.get('organization') or USER}/{req['name']}"
                with hub.lock:
                    hub.repos.setdefault(repo_id, {"private": req.get("visibility") == "private",
                                                   "token": self.headers.get("authorization")})
                return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
            if m := _BRANCH.match(path):
                with hub.lock:
                    hub.repos[m.group(1)].setdefault("branches", []).append(unquote(m.group(2)))
                return self._reply(200, {})
            if path == "/api/validate-yaml":  # the README.md metadata check before a commit
                return self._reply(200, {"errors": [], "warnings": []})
            if hub.fail_uploads:
                return self._reply(500, {"error": "Internal Error (fake hub told to fail)"})
            if m := _PREUPLOAD.match(path):
                if m.group(1) not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                req = json.loads(body)
                hub.gate.wait()
                with hub.lock:
                    hub.in_flight += 1
                    hub.max_in_flight = max(hub.max_in_flight, hub.in_flight)
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": upload_mode(f["path"], f["size"]),
                                                    "shouldIgnore": False} for f in req["files"]]})
            if m := _LFS_BATCH.match(path):
                if m.group(1) not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                return self._reply(200, {"transfer": "basic", "objects": [self._lfs_action(hub, o)
                                                                          for o in json.loads(body)["objects"]]})
            if m := _LFS_OBJECT.match(path):  # verify: the object arrived, with its size
                req = json.loads(body)
                ok = m.group(2) and len(hub.lfs_objects.get(m.group(1), b"")) == req["size"] and req["oid"] == m.group(1)
                return self._reply(200 if ok else 404, {} if ok else {"error": "LFS object not found"})
            if m := _COMMIT.match(path):
                repo_id, revision = m.group(1), unquote(m.group(2))
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                         for x in lines if x["key"] == "file"}
                lfs = {x["value"]["path"]: x["value"] for x in lines if x["key"] == "lfsFile"}
                missing = [p for p, v in lfs.items() if len(hub.lfs_objects.get(v["oid"], b"")) != v["size"]]
                if missing:
                    with hub.lock:
                        hub.in_flight -= 1
                    return self._reply(422, {"error": f"LFS objects not uploaded for {missing}"})
                files.update({p: hub.lfs_objects[v["oid"]] for p, v in lfs.items()})
                oid = hashlib.sha1(body).hexdigest()
                with hub.lock:
                    hub.commits.append(Commit(repo_id, revision, header["summary"], files, set(lfs)))
                    hub.in_flight -= 1
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                         "pullRequestUrl": None})
            return self._reply(404, {"error": f"fake hub does not serve {path}"})

        def _lfs_action(self, hub: FakeHub, obj: dict) -> dict:
            """The LFS batch answer for one object: where to PUT it and verify it (none if stored)."""
            if obj["oid"] in hub.lfs_objects:
                return {"oid": obj["oid"], "size": obj["size"]}
            href = f"{hub.url}/lfs-objects/{obj['oid']}"
            return {"oid": obj["oid"], "size": obj["size"],
                    "actions": {"upload": {"href": href}, "verify": {"href": href + "/verify"}}}

    return Handler


def start_fake_hub() -> FakeHub:
    hub_ref: list = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub_ref))
    hub = FakeHub(server)
    hub_ref.append(hub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return hub
