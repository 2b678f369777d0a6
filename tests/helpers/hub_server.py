"""A fake Hugging Face Hub on 127.0.0.1: the few endpoints huggingface_hub's snapshot_download and
hf_hub_download use, serving in-memory repos, with faults switched on and off by the test.

    GET  /api/{models,datasets}/{repo}/revision/{rev}    repo info (the commit sha)
    GET  /api/{models,datasets}/{repo}/tree/{rev}        the file listing
    HEAD /{repo}/resolve/{rev}/{file}                    file metadata (etag, size, commit)
    GET  /{repo}/resolve/{rev}/{file}                    the file, honouring Range
    (datasets: /datasets/{repo}/resolve/...)

and those HfApi.create_repo and upload_folder use to push (every file as a regular, inline blob):

    POST /api/repos/create                               a repo (409 if it exists)
    POST /api/validate-yaml                              README.md's front matter: accepted, kept in `readmes`
    POST /api/{type}s/{repo}/preupload/{rev}             each file's upload mode: "regular"
    POST /api/{type}s/{repo}/commit/{rev}                the commit (ndjson, files base64), stored in repos

Faults (`server.faults = [Fault(kind, file, times, repo), ...]`), each applied to GETs of `file` (or of
every file, with file None) of `repo` (or of every repo, with repo None) while `times` lasts (None: for ever):
    "500"       the request answers HTTP 500
    "drop"      headers and half the body are sent, then the connection is closed
    "stall"     headers are sent, then nothing until the client gives up
    "truncate"  a body of half the size is sent with a matching Content-Length (a short, "complete" response)
    "500-api"   the API (repo info, file listing) and every HEAD (file metadata) answer HTTP 500
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Fault:
    kind: str
    file: str | tuple[str, ...] | None = None  # None: every file
    times: int | None = None
    repo: str | None = None  # None: every repo


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.faults: list[Fault] = []
        self.requests: list[str] = []
        self.readmes: list[str] = []  # what was sent to /api/validate-yaml
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add_repo(self, repo_id: str, folder: Path | dict[str, bytes], repo_type: str = "model") -> None:
        files = folder if isinstance(folder, dict) else {p.name: p.read_bytes() for p in Path(folder).iterdir()
                                                         if p.is_file()}
        self.repos[(repo_type, repo_id)] = files

    def take_fault(self, file: str, repo: str) -> Fault | None:
        """The first fault for this request of file ("API": repo info and HEADs) of repo, if any."""
        with self.lock:
            for fault in self.faults:
                files = (fault.file,) if isinstance(fault.file, str) else fault.file
                if (fault.kind == "500-api") != (file == "API") or fault.repo not in (None, repo) \
                        or (files is not None and file not in files):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                return fault
            return None

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def etag(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


API = re.compile(r"/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/?]+)")
PUSH = re.compile(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)")
RESOLVE = re.compile(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/([^?]+)")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.handle_request(head=True)

    def do_GET(self) -> None:
        self.handle_request(head=False)

    def do_POST(self) -> None:
        self.server.requests.append(f"POST {self.path}")
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            asked = json.loads(body)
            kind, repo_id = asked.get("type") or "model", f"{asked['organization'] or 'user'}/{asked['name']}"
            url = f"{self.server.url}/{'' if kind == 'model' else kind + 's/'}{repo_id}"
            if (kind, repo_id) in self.server.repos:  # the Hub's 409 names the existing repo too
                return self.send(409, json.dumps({"error": "You already created this repo", "url": url}).encode(),
                                 {"Content-Type": "application/json"})
            self.server.repos[(kind, repo_id)] = {}
            return self.send(200, json.dumps({"url": url}).encode(), {"Content-Type": "application/json"})
        if path == "/api/validate-yaml":
            self.server.readmes.append(json.loads(body)["content"])
            return self.send(200, b'{"errors": [], "warnings": []}', {"Content-Type": "application/json"})
        if (m := PUSH.fullmatch(path)) is None or (m[1][:-1], m[2]) not in self.server.repos:
            return self.not_found()
        files = self.server.repos[(m[1][:-1], m[2])]
        if m[3] == "preupload":
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self.send(200, json.dumps({"files": modes}).encode(), {"Content-Type": "application/json"})
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        answer = {"commitUrl": f"{self.server.url}/{m[2]}/commit/{COMMIT}", "commitOid": COMMIT}
        self.send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

    def handle_request(self, head: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        path = self.path.split("?")[0]
        if m := API.fullmatch(path):
            kind, repo_id, what, _ = m.groups()
            if self.server.take_fault("API", repo_id) is not None:
                return self.send(500, b"Internal Server Error", {}, head)
            files = self.server.repos.get((kind[:-1], repo_id))
            if files is None:
                return self.not_found()
            if what == "revision":
                body = {"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
            else:
                body = [{"type": "file", "path": f, "size": len(d), "oid": etag(d)} for f, d in files.items()]
            return self.send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if m := RESOLVE.fullmatch(path):
            dataset, repo_id, _, filename = m.groups()
            files = self.server.repos.get(("dataset" if dataset else "model", repo_id))
            if files is None:
                return self.not_found()
            if head and self.server.take_fault("API", repo_id) is not None:
                return self.send(500, b"Internal Server Error", {}, head)
            if filename not in files:
                return self.send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            return self.serve_file(files[filename], filename, repo_id, head)
        self.send(404, b"", {}, head)

    def not_found(self) -> None:
        self.send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, self.command == "HEAD")

    def serve_file(self, data: bytes, filename: str, repo_id: str, head: bool) -> None:
        headers = {"ETag": f'"{etag(data)}"', "X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
        if head:
            return self.send(200, data, headers, head=True)
        start = 0
        if (r := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))) is not None:
            start = int(r.group(1))
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        fault = self.server.take_fault(filename, repo_id)
        if fault is None:
            return self.send(status, body, headers)
        if fault.kind == "500":
            return self.send(500, b"Internal Server Error", {})
        if fault.kind == "truncate":
            return self.send(status, body[:len(body) // 2], headers)
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if fault.kind == "drop":
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
        else:  # stall: hold the connection open, silent, until the client has surely timed out
            self.wfile.flush()
            time.sleep(5)
        self.close_connection = True

    def send(self, status: int, body: bytes, headers: dict, head: bool = False) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
