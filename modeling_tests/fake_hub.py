"""A stand-in for the Hugging Face Hub API on 127.0.0.1, just enough for ``HfApi.create_repo`` + ``upload_folder``.

It answers the requests huggingface_hub 2.x makes on that path (read from its ``hf_api.py`` / ``_commit_api.py``
/ ``_upload_pipeline.py``):

========================================  ==================================================================
``GET  /api/whoami-v2``                   the token's owner, or 401 for any other token
``POST /api/repos/create``                ``{"url": ...}``; 409 when the repo exists
``GET  /api/models/{ns}/{name}``          ``{"id", "private", "sha"}`` (``model_info`` / ``repo_info``)
``POST /api/validate-yaml``               no errors (the README's front matter is recorded)
``POST /api/models/{repo}/preupload/..``  every file "regular" (sent base64 inside the commit, no LFS / Xet)
``POST /api/models/{repo}/commit/..``     the NDJSON commit: header + one ``file`` line per file
========================================  ==================================================================

Anything else is answered 404 and recorded in ``unknown``. Every file of every commit is kept in ``repos``.
Limit of the stand-in: the real Hub puts large and binary files (``*.safetensors``) through Xet/LFS; here they
travel as regular files, so the upload *protocol* for large files is not exercised, only the requests around it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN, USER = "hf_standin_token", "standin-user"


class FakeHub:
    """Start with ``FakeHub()`` (serves in a daemon thread), read ``.endpoint``, stop with ``.close()``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.validated_yaml: list[str] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                hub._route(self, "GET")

            def do_POST(self) -> None:
                hub._route(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # -- routing -------------------------------------------------------------------------------------------------
    def _route(self, req: BaseHTTPRequestHandler, method: str) -> None:
        path = req.path.split("?", 1)[0]
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0)) if method == "POST" else b""
        with self.lock:
            self.requests.append((method, path))
        if req.headers.get("Authorization") != f"Bearer {TOKEN}" and path != "/api/agent-harnesses":
            return _send(req, 401, {"error": "Invalid credentials in Authorization header"})
        if method == "GET" and path == "/api/whoami-v2":
            return _send(req, 200, {"type": "user", "name": USER, "orgs": []})
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            with self.lock:
                if repo_id in self.repos:
                    return _send(req, 409, {"error": "You already created this model repo", "url": self._url(repo_id)})
                self.repos[repo_id] = {"private": payload.get("visibility") == "private", "files": {}, "commits": []}
            return _send(req, 200, {"url": self._url(repo_id), "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            self.validated_yaml.append(json.loads(body)["content"])
            return _send(req, 200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if method == "GET" and match and match.group(1) in self.repos:
            repo = self.repos[match.group(1)]
            return _send(req, 200, {"id": match.group(1), "private": repo["private"], "sha": _sha(repo)})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if method == "POST" and match and match.group(1) in self.repos:
            repo = self.repos[match.group(1)]
            if match.group(2) == "preupload":
                files = json.loads(body)["files"]
                return _send(req, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            assert lines[0]["key"] == "header", lines[0]
            with self.lock:
                for line in lines[1:]:
                    assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]
                    repo["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                repo["commits"].append(lines[0]["value"]["summary"])
                oid = _sha(repo)
            return _send(req, 200, {"commitUrl": f"{self._url(match.group(1))}/commit/{oid}", "commitOid": oid,
                                    "pullRequestUrl": None})
        with self.lock:
            self.unknown.append((method, path))
        return _send(req, 404, {"error": f"stand-in Hub: no route for {method} {path}"})

    def _url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"


def _sha(repo: dict) -> str:
    digest = hashlib.sha1()
    for name in sorted(repo["files"]):
        digest.update(name.encode() + repo["files"][name])
    return digest.hexdigest()


def _send(req: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    req.send_response(status)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)
