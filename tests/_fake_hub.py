"""A local HTTP server speaking the part of the Hub API that ``huggingface_hub`` uses to create a
repo and commit files (create-repo, create-branch, validate-yaml, preupload, commit), for the push-to-hub tests.

Every file is declared "regular" at preupload, so its bytes come base64-encoded in the commit's
ndjson body (no LFS / xet transfer). Commits are recorded in arrival order with their files.
"""

from __future__ import annotations

import base64
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


@dataclass
class FakeHub:
    server: ThreadingHTTPServer
    repos: dict[str, dict] = field(default_factory=dict)  # repo_id -> {"private": ..., "token": ...}
    commits: list[Commit] = field(default_factory=list)
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


_PREUPLOAD = re.compile(r"^/api/models/([^/]+/[^/]+)/preupload/(.+)$")
_COMMIT = re.compile(r"^/api/models/([^/]+/[^/]+)/commit/(.+)$")
_BRANCH = re.compile(r"^/api/models/([^/]+/[^/]+)/branch/(.+)$")


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

        def do_POST(self):
            hub: FakeHub = hub_ref[0]
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
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
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in req["files"]]})
            if m := _COMMIT.match(path):
                repo_id, revision = m.group(1), unquote(m.group(2))
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                         for x in lines if x["key"] == "file"}
                oid = hashlib.sha1(body).hexdigest()
                with hub.lock:
                    hub.commits.append(Commit(repo_id, revision, header["summary"], files))
                    hub.in_flight -= 1
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                         "pullRequestUrl": None})
            return self._reply(404, {"error": f"fake hub does not serve {path}"})

    return Handler


def start_fake_hub() -> FakeHub:
    hub_ref: list = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub_ref))
    hub = FakeHub(server)
    hub_ref.append(hub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return hub
