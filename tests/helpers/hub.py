"""Hub stand-ins for offline tests: a cache folder in the standard layout, and a fake Hub behind ``HfApi``'s HTTP.

`make_hub_cache` lays files out exactly as ``huggingface_hub`` does (``models--org--name/refs/main``,
``snapshots/<commit>/<path>`` symlinks to ``blobs/<sha256>``), so ``local_files_only=True`` finds them.

`FakeHub` answers the HTTP requests that ``huggingface_hub``'s own code makes — ``create_repo``, the README
YAML check, the preupload, LFS batch and upload endpoints, ``/commit``, ``repo_info``, the tree listing and
``resolve`` downloads — from an in-memory repo. `fake_hub_client` installs it as the transport of the client
``huggingface_hub`` uses (``set_client_factory``), so every library call above it runs for real.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo_id: str, files: Mapping[str, Path | bytes], commit: str = COMMIT) -> Path:
    """Lay out ``files`` (repo path -> file or bytes) as the Hub cache holds ``repo_id`` at ``commit``; returns the
    snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(name).parts) + 1), "blobs", blob.name))
    return snapshot


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` by its posix path relative to it (following symbolic links)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class FakeRepo:
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)
    commits: list[dict[str, Any]] = field(default_factory=list)
    private: bool = False

    @property
    def sha(self) -> str:
        return hashlib.sha1(json.dumps(len(self.commits)).encode()).hexdigest()


def _is_lfs(path: str, size: int) -> bool:
    """The Hub's default .gitattributes: weights and other binaries go to LFS, and anything over 10 MB."""
    return path.endswith((".safetensors", ".bin", ".model", ".pt")) or size > 10_000_000


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """An in-memory Hub. ``requests`` logs ``(method, path)`` of every request; ``repos`` holds the repos."""

    def __init__(self, user: str = "me") -> None:
        self.user = user
        self.repos: dict[str, FakeRepo] = {}
        self.uploads: dict[str, bytes] = {}  # LFS objects by sha256
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []
        self.yaml_checked: list[str] = []
        self.authorizations: list[str | None] = []  # the Authorization header of every request to the Hub API
        self.refuse: dict[str, int] = {}  # path -> HTTP status to answer instead

    # -- routing ---------------------------------------------------------------------------------------------
    def handle(self, request: Any) -> Any:
        import huggingface_hub.utils._http as hf_http

        httpx = getattr(hf_http, "httpx2", None) or hf_http.httpx  # type: ignore[attr-defined]
        url = urlsplit(str(request.url))
        path = unquote(url.path)
        self.requests.append((request.method, path))
        status, body, headers = self._route(request, url.netloc, path)
        if isinstance(body, bytes):
            content = b"" if request.method == "HEAD" else body
        else:
            content = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **headers}
        headers = {"Content-Length": str(len(body) if isinstance(body, bytes) else len(content)), **headers}
        return httpx.Response(status, headers=headers, content=content, request=request)

    def _route(self, request: Any, host: str, path: str) -> tuple[int, Any, dict[str, str]]:
        if host == "lfs.fake":
            return self._lfs_put(request, path)
        self.authorizations.append(request.headers.get("authorization"))
        if path in self.refuse:
            return self.refuse[path], {"error": "refused by the test"}, {}
        if request.method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(request.content))
        if request.method == "POST" and path == "/api/validate-yaml":
            self.yaml_checked.append(json.loads(request.content)["content"])
            return 200, {"errors": [], "warnings": []}, {}
        routes = [
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)", self._repo_info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)", self._repo_info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?P<sub>/.*)?", self._tree),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and request.method == method:
                repo = self.repos.get(match["repo"])
                if repo is None:
                    return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
                return handler(request, repo, **{k: v for k, v in match.groupdict().items() if k != "repo"})
        return 404, {"error": f"FakeHub has no route for {request.method} {path}"}, {}

    # -- writes ----------------------------------------------------------------------------------------------
    def _create(self, payload: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        self.created.append(payload)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"https://huggingface.co/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        self.repos[repo_id] = FakeRepo(
            files={".gitattributes": gitattributes}, private=payload.get("visibility") == "private"
        )
        self.repos[repo_id].commits.append({"summary": "initial commit", "operations": []})
        return 200, {"url": url, "name": repo_id}, {}

    def _preupload(self, request: Any, repo: FakeRepo, rev: str) -> tuple[int, Any, dict[str, str]]:
        files = json.loads(request.content)["files"]
        modes = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if _is_lfs(f["path"], f["size"]) else "regular",
                "shouldIgnore": False,
                "oid": _git_oid(repo.files[f["path"]]) if f["path"] in repo.files else None,
            }
            for f in files
        ]
        return 200, {"files": modes, "commitOid": repo.sha}, {}

    def _lfs_batch(self, request: Any, repo: FakeRepo) -> tuple[int, Any, dict[str, str]]:
        payload = json.loads(request.content)
        assert payload["operation"] == "upload" and "basic" in payload["transfers"], payload
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.uploads:
                entry["actions"] = {"upload": {"href": f"https://lfs.fake/{obj['oid']}", "expires_in": 3600}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_put(self, request: Any, path: str) -> tuple[int, Any, dict[str, str]]:
        data = request.read()
        oid = path.strip("/")
        assert hashlib.sha256(data).hexdigest() == oid, "uploaded bytes do not match their LFS oid"
        self.uploads[oid] = data
        return 200, b"", {"ETag": f'"{oid}"'}

    def _commit(self, request: Any, repo: FakeRepo, rev: str) -> tuple[int, Any, dict[str, str]]:
        assert rev == "main", rev
        lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
        header, operations = lines[0], lines[1:]
        assert header["key"] == "header"
        for op in operations:
            value = op["value"]
            if op["key"] == "file":
                repo.files[value["path"]] = base64.b64decode(value["content"])
                repo.lfs.discard(value["path"])
            elif op["key"] == "lfsFile":
                if value["oid"] not in self.uploads:
                    return 400, {"error": f"LFS object {value['oid']} was never uploaded"}, {}
                repo.files[value["path"]] = self.uploads[value["oid"]]
                repo.lfs.add(value["path"])
            elif op["key"] == "deletedFile":
                repo.files.pop(value["path"], None)
            elif op["key"] == "deletedFolder":
                for name in [n for n in repo.files if n.startswith(value["path"].rstrip("/") + "/")]:
                    del repo.files[name]
            else:
                return 400, {"error": f"unknown operation {op['key']}"}, {}
        repo.commits.append({"summary": header["value"]["summary"], "operations": operations})
        url = f"https://huggingface.co/{self._repo_id(repo)}/commit/{repo.sha}"
        return 200, {"commitUrl": url, "commitOid": repo.sha, "pullRequestUrl": None}, {}

    # -- reads -----------------------------------------------------------------------------------------------
    def _check_rev(self, repo: FakeRepo, rev: str) -> tuple[int, Any, dict[str, str]] | None:
        if rev not in ("main", repo.sha):
            return 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}
        return None

    def _repo_info(self, request: Any, repo: FakeRepo, rev: str = "main") -> tuple[int, Any, dict[str, str]]:
        error = self._check_rev(repo, rev)
        if error:
            return error
        siblings = [{"rfilename": name} for name in sorted(repo.files)]
        return 200, {"id": self._repo_id(repo), "sha": repo.sha, "private": repo.private, "siblings": siblings}, {}

    def _tree(self, request: Any, repo: FakeRepo, rev: str, sub: str | None) -> tuple[int, Any, dict[str, str]]:
        error = self._check_rev(repo, rev)
        if error:
            return error
        prefix = (sub or "").strip("/")
        entries = []
        for name in sorted(repo.files):
            if prefix and not name.startswith(prefix + "/"):
                continue
            data = repo.files[name]
            entry: dict[str, Any] = {"type": "file", "oid": _git_oid(data), "size": len(data), "path": name}
            if name in repo.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return 200, entries, {}

    def _resolve(self, request: Any, repo: FakeRepo, rev: str, file: str) -> tuple[int, Any, dict[str, str]]:
        error = self._check_rev(repo, rev)
        if error:
            return error
        if file not in repo.files:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha}
        data = repo.files[file]
        etag = hashlib.sha256(data).hexdigest() if file in repo.lfs else _git_oid(data)
        return 200, data, {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"'}

    def _repo_id(self, repo: FakeRepo) -> str:
        return next(name for name, r in self.repos.items() if r is repo)

    def downloads(self) -> list[str]:
        """Files fetched with GET ``/resolve/`` (not HEAD), in order."""
        return [
            p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in self.requests if m == "GET" and "/resolve/" in p
        ]


@contextlib.contextmanager
def fake_hub_client(hub: FakeHub) -> Iterator[FakeHub]:
    """Route every HTTP request ``huggingface_hub`` makes to ``hub`` (its client factory, with a mock transport)."""
    import huggingface_hub.utils._http as hf_http

    httpx = getattr(hf_http, "httpx2", None) or hf_http.httpx  # type: ignore[attr-defined]

    def factory() -> Any:
        return httpx.Client(
            transport=httpx.MockTransport(hub.handle),
            event_hooks={"request": [hf_http.hf_request_event_hook]},
            follow_redirects=True,
        )

    hf_http.set_client_factory(factory)
    try:
        yield hub
    finally:
        hf_http.set_client_factory(hf_http.default_client_factory)
