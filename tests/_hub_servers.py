"""Hub servers on 127.0.0.1 for push/pull tests with the real `huggingface_hub` client and no internet.

- `FakeHub`: a small in-memory Hub (create repo, preupload, LFS batch + PUT, NDJSON commit, branches, PRs,
  model info, tree, resolve by HEAD/GET with ranges) with tokens and download fault injection.
- `Olah`: the real third-party mirror `olah` serving git repositories laid out from folders (read only).
- `run_client`: runs a client snippet in a subprocess, since `HF_ENDPOINT` is read when huggingface_hub is imported.

Test modules import these with `from _hub_servers import ...`: pytest's default 'prepend' import mode puts tests/
on sys.path (tests/ is not a package).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 10 * 2**20  # the Hub's preupload answers "lfs" from 10 MiB on


class Request(NamedTuple):
    """One request as the server saw it."""

    method: str
    path: str  # unquoted, without the query string
    headers: dict[str, str]  # names in lower case


class Commit(NamedTuple):
    """One commit made through the commit endpoint."""

    repo_id: str
    ref: str  # the branch or refs/pr/N it landed on
    sha: str
    message: str
    added: list[str]  # paths, regular and LFS
    deleted: list[str]


@dataclass
class _Repo:
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    num_prs: int = 0


class _HubError(Exception):
    def __init__(self, status: int, code: str | None = None, message: str = '', **body):
        super().__init__(message)
        self.status, self.code, self.message, self.body = status, code, message, body


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports as the ETag/oid of non-LFS files."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def _lfs_pointer(data: bytes) -> bytes:
    return f'version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n' \
        f'size {len(data)}\n'.encode()


class FakeHub:
    """A Hub-compatible HTTP server for tests, enough for `HfApi`, `upload_folder`, `hf_hub_download`.

    Model repos only; an id without a namespace is created under `user`. A new repo has one empty commit on `main`
    (the real Hub would add a `.gitattributes`). Files at or above `LFS_THRESHOLD` go through the LFS batch/PUT
    path; others are base64 lines of the commit. Clients must set `HF_HUB_DISABLE_XET=1` (`run_client` does),
    otherwise large uploads go to Xet and bypass this server. Serves one request at a time (one lock), which keeps
    the state simple and is fast enough for tests.

    Args:
        tokens: Valid tokens; writes need `Authorization: Bearer <one of them>`, private repos need one to read.
        user: The user all valid tokens belong to (`whoami`), and the namespace of repos created without one.

    Attributes:
        requests: Every request (`Request`: method, path, headers), in order.
        commit_log: Every commit made through the API (`Commit`: repo_id, ref, sha, message, added, deleted).
        repos: repo_id -> `_Repo` (`refs`, `commits`, `private`); `files()` reads one revision.

    Example:
        >>> with FakeHub(tokens={'hf_test'}) as hub:
        ...     run_client("from huggingface_hub import HfApi; HfApi().create_repo('org/tiny')", hub.endpoint,
        ...                tmp_path, env={'HF_TOKEN': 'hf_test'})
        ...     assert hub.files('org/tiny') == {}
    """

    def __init__(self, tokens: set[str] | frozenset[str] = frozenset({'hf_test'}), user: str = 'tester'):
        self.tokens = set(tokens)
        self.user = user  # the namespace of repo ids without one, and whoami's name
        self.commit_log: list[Commit] = []
        self.repos: dict[str, _Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, filled by the LFS PUTs
        self.requests: list[Request] = []
        self._faults: dict[str, list[int]] = {}  # path in repo -> [GETs left to break, bytes to send first]
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self.endpoint = ''

    def start(self) -> FakeHub:
        """Starts serving on a free port of 127.0.0.1 in a daemon thread."""
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), type('Handler', (_Handler,), {'hub': self}))
        self._server.daemon_threads = True
        self.endpoint = f'http://127.0.0.1:{self._server.server_address[1]}'
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stops the server and closes its socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test helpers -----------------------------------------------------------------------------------------------

    def add_files(self, repo_id: str, files: dict[str, bytes], private: bool = False, branch: str = 'main') -> str:
        """Commits `files` (path -> content) straight into `repo_id` (created if needed); returns the commit sha."""
        with self._lock:
            repo = self.repos.get(repo_id) or self._create(repo_id, private)
            return self._commit(repo, branch, {**repo.commits[repo.refs.get(branch, repo.refs['main'])], **files})

    def files(self, repo_id: str, revision: str = 'main') -> dict[str, bytes]:
        """The files of `repo_id` at `revision` (a branch, `refs/pr/N` or a commit sha)."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.refs.get(revision, revision)])

    def fail_downloads(self, path: str, times: int = 1, after_bytes: int = 0) -> None:
        """Breaks the next `times` GETs of `path` (any repo): a full Content-Length, then a close after `after_bytes`.

        huggingface_hub 2.4 retries a broken download 5 times, 1 s apart, and resumes with a Range only from the
        last whole 10 MiB chunk it read (below that it starts again from 0); each chunk read resets the count.
        `times=0` clears the fault.
        """
        self._faults[path] = [times, after_bytes]

    # -- internals ----------------------------------------------------------------------------------------------------

    def _create(self, repo_id: str, private: bool) -> _Repo:
        self.repos[repo_id] = repo = _Repo(private=private)
        self._commit(repo, 'main', {})
        return repo

    def _commit(self, repo: _Repo, ref: str, files: dict[str, bytes]) -> str:
        # a fresh sha even for identical trees, as git commits differ by time and parent
        sha = hashlib.sha1(f'{repo.refs.get(ref)} {time.time_ns()} {len(repo.commits)}'.encode()).hexdigest()
        repo.commits[sha], repo.refs[ref] = files, sha
        return sha

    def _repo(self, repo_id: str, token: str | None, write: bool = False) -> _Repo:
        repo = self.repos.get(repo_id)
        if write and token not in self.tokens:
            raise _HubError(401, None, 'Invalid credentials in Authorization header')
        # like the real Hub: a private repo without a valid token looks missing, and missing repos answer 401
        if repo is None or (repo.private and token not in self.tokens):
            raise _HubError(401, 'RepoNotFound', 'Repository not found')
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> tuple[str, dict[str, bytes]]:
        sha = repo.refs.get(revision, revision)
        if sha not in repo.commits:
            raise _HubError(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
        return sha, repo.commits[sha]

    def _entry(self, path: str, data: bytes) -> dict:
        entry = {'type': 'file', 'path': path, 'size': len(data), 'oid': git_blob_sha(data)}
        if len(data) >= LFS_THRESHOLD:
            pointer = _lfs_pointer(data)
            entry['oid'] = git_blob_sha(pointer)
            entry['lfs'] = {'oid': hashlib.sha256(data).hexdigest(), 'size': len(data), 'pointerSize': len(pointer)}
        return entry


def _sibling(entry: dict) -> dict:
    """A tree entry as model_info lists it (other names, the LFS sha256 under "sha256")."""
    lfs = entry.get('lfs')
    lfs = {'lfs': {'sha256': lfs['oid'], 'size': lfs['size'], 'pointerSize': lfs['pointerSize']}} if lfs else {}
    return {'rfilename': entry['path'], 'size': entry['size'], 'blobId': entry['oid'], **lfs}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = 'HTTP/1.1'  # keep-alive, as the client's connection pool expects

    def log_message(self, *args) -> None:  # keep pytest output clean; `hub.requests` has the log
        pass

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':  # streamed file uploads come chunked
            chunks = []
            while size := int(self.rfile.readline().split(b';')[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b'\r\n', b'\n', b''):  # trailers
                pass
            return b''.join(chunks)
        return self.rfile.read(int(self.headers.get('Content-Length') or 0))

    def _send(self, status: int, body: bytes | dict | list = b'', headers: dict | None = None) -> None:
        if not isinstance(body, bytes):
            body, headers = json.dumps(body).encode(), {'Content-Type': 'application/json', **(headers or {})}
        self.send_response(status)
        for key, value in {'Content-Length': str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.raw_path = url.path
        auth = self.headers.get('Authorization', '')
        self.token = auth[7:] if auth.startswith('Bearer ') else None
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.hub.requests.append(Request(self.command, unquote(url.path), headers))
        self.data = self._body() if self.command in ('POST', 'PUT') else b''
        try:
            with self.hub._lock:
                self._route()
        except _HubError as e:
            headers = {'X-Error-Message': e.message, **({'X-Error-Code': e.code} if e.code else {})}
            self._send(e.status, {'error': e.message, **e.body}, headers)
        except Exception as e:  # a bug here should fail the client's call with a message, not drop its connection
            self._send(500, {'error': f'FakeHub: {traceback.format_exc()}'}, {'X-Error-Message': repr(e)})

    def _route(self) -> None:  # noqa: C901 -- one flat table of the Hub's routes reads best
        hub, path, method = self.hub, self.raw_path, self.command
        if m := re.fullmatch(r'/api/models/([^/]+/[^/]+)(/.*)?', path):
            repo_id, rest = unquote(m[1]), m[2] or ''
            if m := re.fullmatch(r'/preupload/([^/]+)', rest):
                return self._preupload(hub._repo(repo_id, self.token, write=True), unquote(m[1]))
            if m := re.fullmatch(r'/commit/([^/]+)', rest):
                return self._commit(repo_id, hub._repo(repo_id, self.token, write=True), unquote(m[1]))
            if m := re.fullmatch(r'/branch/([^/]+)', rest):
                repo = hub._repo(repo_id, self.token, write=True)
                branch = unquote(m[1])
                if branch in repo.refs:
                    raise _HubError(409, None, f'Reference already exists: {branch}')
                start = json.loads(self.data or b'{}').get('startingPoint') or 'main'
                repo.refs[branch] = hub._resolve(repo, start)[0]
                return self._send(200, {})
            repo = hub._repo(repo_id, self.token)
            if m := re.fullmatch(r'(?:/revision/([^/]+))?', rest):
                sha, files = hub._resolve(repo, unquote(m[1] or 'main'))
                siblings = [_sibling(hub._entry(p, d)) for p, d in files.items()]
                return self._send(200, {'id': repo_id, 'modelId': repo_id, 'sha': sha, 'private': repo.private,
                                        'tags': [], 'siblings': siblings})
            if m := re.fullmatch(r'/tree/([^/]+)(/.*)?', rest):
                return self._tree(repo, unquote(m[1]), unquote(m[2] or '').strip('/'))
            if rest == '/refs':
                branches = [{'name': n, 'ref': f'refs/heads/{n}', 'targetCommit': s}
                            for n, s in repo.refs.items() if not n.startswith('refs/')]
                return self._send(200, {'branches': branches, 'converts': [], 'tags': []})
        elif path == '/api/repos/create' and method == 'POST':
            if self.token not in hub.tokens:
                raise _HubError(401, None, 'Invalid credentials in Authorization header')
            payload = json.loads(self.data)
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            if repo_id in hub.repos:
                # the client reads "url" from this answer when called with exist_ok=True
                raise _HubError(409, None, 'You already created this model repo', url=f'{hub.endpoint}/{repo_id}')
            hub._create(repo_id, bool(payload.get('private')) or payload.get('visibility') == 'private')
            return self._send(200, {'url': f'{hub.endpoint}/{repo_id}', 'name': repo_id})
        elif path == '/api/whoami-v2':
            if self.token not in hub.tokens:
                raise _HubError(401, None, 'Invalid credentials in Authorization header')
            return self._send(200, {'type': 'user', 'name': hub.user, 'orgs': [],
                                    'auth': {'type': 'access_token', 'accessToken': {'role': 'write'}}})
        elif path == '/api/agent-harnesses':  # the client's user-agent detection asks once a day; nothing to detect
            return self._send(200, {'standardEnvVars': [], 'harnesses': {}})
        elif path == '/api/validate-yaml':
            return self._send(200, {'errors': [], 'warnings': []})
        elif m := re.fullmatch(r'/([^/]+/[^/]+)\.git/info/lfs/objects/batch', path):
            hub._repo(unquote(m[1]), self.token, write=True)
            objects = []
            for obj in json.loads(self.data)['objects']:  # no "actions" tells the client the object is there already
                upload = {'actions': {'upload': {'href': f"{hub.endpoint}/_lfs/{obj['oid']}"}}}
                objects.append({**obj, 'authenticated': True, **({} if obj['oid'] in hub.lfs_objects else upload)})
            return self._send(200, {'transfer': 'basic', 'objects': objects})
        elif (m := re.fullmatch(r'/_lfs/([0-9a-f]{64})', path)) and method == 'PUT':
            if hashlib.sha256(self.data).hexdigest() != m[1]:
                raise _HubError(400, None, 'sha256 mismatch')
            hub.lfs_objects[m[1]] = self.data
            return self._send(200)
        elif m := re.fullmatch(r'/([^/]+/[^/]+)/resolve/([^/]+)/(.+)', path):
            repo = hub._repo(unquote(m[1]), self.token)
            return self._resolve_file(repo, unquote(m[2]), unquote(m[3]))
        raise _HubError(404, None, f'no route for {method} {path}')

    def _preupload(self, repo: _Repo, revision: str) -> None:
        files = self.hub._resolve(repo, revision)[1]
        answer = []
        for f in json.loads(self.data)['files']:
            mode = 'lfs' if f['size'] >= LFS_THRESHOLD else 'regular'
            # the oid of an unchanged file lets the client skip it, as it does with the real Hub
            old = files.get(f['path'])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if mode == 'lfs' else git_blob_sha(old))
            answer.append({'path': f['path'], 'uploadMode': mode, 'shouldIgnore': False, 'oid': oid})
        self._send(200, {'files': answer})

    def _commit(self, repo_id: str, repo: _Repo, revision: str) -> None:
        hub = self.hub
        parent, files = hub._resolve(repo, revision)
        files, message, added, deleted = dict(files), '', [], []
        for line in self.data.splitlines():
            item = json.loads(line)
            key, value = item['key'], item['value']
            if key == 'header':
                if value.get('parentCommit') not in (None, parent):
                    raise _HubError(412, None, 'A commit has happened since. Please refresh and try again.')
                message = value.get('summary', '')
            elif key == 'file':
                files[value['path']] = base64.b64decode(value['content'])
            elif key == 'lfsFile':
                if value['oid'] not in hub.lfs_objects:
                    raise _HubError(400, None, f"LFS object {value['oid']} was not uploaded")
                files[value['path']] = hub.lfs_objects[value['oid']]
            elif key == 'deletedFile':
                files.pop(value['path'], None)
            elif key == 'deletedFolder':
                files = {p: d for p, d in files.items() if not p.startswith(value['path'].rstrip('/') + '/')}
            if key != 'header':
                (deleted if key.startswith('deleted') else added).append(value['path'])
        pr_url = None
        if self.query.get('create_pr') == '1':
            repo.num_prs += 1
            revision, pr_url = f'refs/pr/{repo.num_prs}', f'{hub.endpoint}/{repo_id}/discussions/{repo.num_prs}'
            repo.refs[revision] = parent  # the PR branches off the head of `revision`
        sha = hub._commit(repo, revision, files)
        hub.commit_log.append(Commit(repo_id, revision, sha, message, added, deleted))
        self._send(200, {'commitUrl': f'{hub.endpoint}/{repo_id}/commit/{sha}', 'commitOid': sha,
                         'pullRequestUrl': pr_url})

    def _tree(self, repo: _Repo, revision: str, folder: str) -> None:
        files = self.hub._resolve(repo, revision)[1]
        recursive = self.query.get('recursive', '').lower() in ('1', 'true')
        prefix = f'{folder}/' if folder else ''
        entries, dirs = [], set()
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split('/')
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                dirs.add(prefix + '/'.join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(self.hub._entry(path, data))
        if not entries and not dirs and folder:
            raise _HubError(404, 'EntryNotFound', f'{folder} does not exist')
        self._send(200, [{'type': 'directory', 'path': d, 'oid': git_blob_sha(d.encode()), 'size': 0}
                         for d in sorted(dirs)] + entries)

    def _resolve_file(self, repo: _Repo, revision: str, path: str) -> None:
        sha, files = self.hub._resolve(repo, revision)
        if path not in files:
            raise _HubError(404, 'EntryNotFound', f'{path} does not exist at {revision}')
        data = files[path]
        entry = self.hub._entry(path, data)
        etag = entry['lfs']['oid'] if 'lfs' in entry else entry['oid']
        headers = {'ETag': f'"{etag}"', 'X-Repo-Commit': sha, 'Accept-Ranges': 'bytes'}
        status, start, end = 200, 0, len(data)
        if m := re.fullmatch(r'bytes=(\d*)-(\d*)', self.headers.get('Range', '')):
            start = int(m[1]) if m[1] else max(len(data) - int(m[2] or 0), 0)
            end = min(int(m[2]) + 1, len(data)) if m[1] and m[2] else len(data)
            if start >= len(data) and data:
                raise _HubError(416, None, 'Range Not Satisfiable')
            status, headers['Content-Range'] = 206, f'bytes {start}-{end - 1}/{len(data)}'
        body = data[start:end]
        fault = self.hub._faults.get(path)
        if self.command == 'GET' and fault and fault[0] > 0:
            fault[0] -= 1
            # announce the whole body, send part of it, then drop the connection: a network error mid-download
            self.send_response(status)
            for key, value in {**headers, 'Content-Length': str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body[:fault[1]])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(status, body, headers)


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, release): for servers that must be told their port."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


class Olah:
    """The real Hub mirror `olah` (offline mode) serving git repositories laid out from folders; read only.

    Args:
        repos: `{repo_id: folder}`, or `{repo_id: [folder, folder, ...]}` for several commits on `main` (each folder
            is the whole tree of one commit, oldest first).
        root: Where to lay out the mirrors, olah's cache and log; a temporary folder (removed on exit) if not given.
        timeout: Seconds to wait for olah to answer.

    `commits[repo_id]` lists the commit shas, oldest first; `tag(repo_id, name, sha)` and `branch(...)` add refs.

    Example:
        >>> with Olah({'org/tiny': folder}) as olah:
        ...     run_client("from huggingface_hub import hf_hub_download; hf_hub_download('org/tiny', 'config.json')",
        ...                olah.endpoint, tmp_path)
    """

    def __init__(self, repos: dict[str, str | Path | list[str | Path]], root: str | Path | None = None,
                 timeout: float = 60):
        self._tmp = None if root else tempfile.mkdtemp(prefix='olah-')
        self.root = Path(root or self._tmp)
        self.timeout = timeout
        self.commits: dict[str, list[str]] = {}
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.endpoint = ''
        for repo_id, folders in repos.items():
            self.add_repo(repo_id, folders if isinstance(folders, list) else [folders])

    def repo_path(self, repo_id: str) -> Path:
        """The git repository that olah serves as `repo_id`."""
        return self.root / 'mirrors' / 'models' / repo_id

    def add_repo(self, repo_id: str, folders: list[str | Path]) -> list[str]:
        """Lays out `repo_id` as a git repository with one commit per folder; returns the commit shas."""
        path = self.repo_path(repo_id)
        path.mkdir(parents=True)
        _git(path, 'init', '-q', '-b', 'main')
        # local identity: the machine may have no global git config
        _git(path, 'config', 'user.name', 'tests')
        _git(path, 'config', 'user.email', 'tests@example.com')
        for i, folder in enumerate(folders):
            for old in path.iterdir():
                if old.name != '.git':
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
            shutil.copytree(folder, path, dirs_exist_ok=True)
            # a fresh index, so that every file is hashed: a copied file of the same size, mtime (copy2 keeps the
            # source's) and a reused inode would otherwise look unchanged to git's stat check, and the commit would
            # keep the previous folder's content (seen once: 'main' serving the first commit's config.json)
            (path / '.git' / 'index').unlink(missing_ok=True)
            _git(path, 'add', '-A')
            _git(path, 'commit', '-q', '--allow-empty', '-m', f'commit {i}')
            self.commits.setdefault(repo_id, []).append(_git(path, 'rev-parse', 'HEAD'))
        return self.commits[repo_id]

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        """Adds tag `name` at commit `sha`."""
        _git(self.repo_path(repo_id), 'tag', name, sha)

    def branch(self, repo_id: str, name: str, sha: str) -> None:
        """Adds branch `name` at commit `sha`."""
        _git(self.repo_path(repo_id), 'branch', name, sha)

    def start(self, attempts: int = 3) -> Olah:
        """Writes olah's config and starts it; waits until it answers or raises with its log tail.

        The free port is only free until olah binds it: another process may take it in between, so a start whose
        probe does not come back from this olah is retried on a new port.
        """
        # a repo only this instance serves: an answer for it proves that the server on the port is ours
        probe = f'olah-probe/{os.urandom(8).hex()}'
        if not self.repo_path(probe).exists():
            probe_folder = self.root / 'probe'
            probe_folder.mkdir(parents=True, exist_ok=True)
            (probe_folder / 'probe.txt').write_text(probe)
            self.add_repo(probe, [probe_folder])
        for _ in range(attempts):
            if self._start_once(probe):
                return self
        tail = self.log.read_text(errors='replace')[-3000:]
        raise RuntimeError(f'olah did not serve its probe repo on {self.endpoint} within {self.timeout} s '
                           f'({attempts} attempts); its output:\n{tail}')

    def _start_once(self, probe: str) -> bool:
        self.port = free_port()
        self.endpoint = f'http://127.0.0.1:{self.port}'
        netloc = f'127.0.0.1:{self.port}'
        config = self.root / 'olah.toml'
        config.write_text(textwrap.dedent(f'''\
            [basic]
            host = "127.0.0.1"
            port = {self.port}
            repos-path = "{self.root / 'repos'}"
            mirror-netloc = "{netloc}"
            mirror-lfs-netloc = "{netloc}"
            mirrors-path = ["{self.root / 'mirrors'}"]
            [accessibility]
            offline = true
            '''))
        self.log = self.root / 'olah.out'
        # HOME: olah keeps a sqlite database in ~/.olah, which concurrent instances should not share
        env = {**os.environ, 'OLAH_LOG_PATH': str(self.root / 'log'), 'HOME': str(self.root)}
        env.pop('HF_ENDPOINT', None)
        # the venv's olah-cli, next to this interpreter even when the venv is not activated
        cli = Path(sys.executable).with_name('olah-cli')
        cli = str(cli) if cli.exists() else shutil.which('olah-cli')
        if cli is None:
            raise RuntimeError(f'olah-cli is neither next to {sys.executable} nor on PATH: pip install olah')
        with open(self.log, 'ab') as out:
            self.process = subprocess.Popen([cli, '-c', str(config)], cwd=self.root, env=env, stdout=out,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        url = f'{self.endpoint}/{probe}/resolve/main/probe.txt'
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP(S)_PROXY
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with opener.open(url, timeout=2) as answer:
                    if answer.read().decode() == probe:
                        return True
                break  # another server holds the port
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.3)  # not listening yet
        self._terminate()
        return False

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Stops olah (terminate, then kill) and removes the temporary root if this object made it."""
        self._terminate()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Olah:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def client_env(endpoint: str, tmp_path: str | Path, env: dict | None = None) -> dict[str, str]:
    """The environment of a Hub client subprocess: `endpoint`, its own cache under `tmp_path`, no Xet, online."""
    home = Path(tmp_path) / 'hf_home'
    child = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}  # drops HF_HUB_OFFLINE and tokens
    child.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_CACHE=str(home / 'hub'), HF_HUB_DISABLE_XET='1',
                 HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_PROGRESS_BARS='1', OMP_NUM_THREADS='1',
                 NO_PROXY='127.0.0.1,localhost', no_proxy='127.0.0.1,localhost')
    child.update(env or {})
    return child


def run_client(code: str, endpoint: str, tmp_path: str | Path, env: dict | None = None, timeout: float = 120,
               check: bool = True) -> subprocess.CompletedProcess:
    """Runs Python `code` in a subprocess of this interpreter, as a Hub client of `endpoint`.

    The child gets `client_env`: HF_HOME/HF_HUB_CACHE under `tmp_path`, HF_HUB_DISABLE_XET=1, no HF_HUB_OFFLINE
    and no HF_TOKEN unless `env` sets them, OMP_NUM_THREADS=1. `code` is dedented.

    Args:
        code: The snippet; print what the test should read back.
        endpoint: The server, e.g. `hub.endpoint`.
        tmp_path: The test's tmp_path.
        env: Extra variables, e.g. `{'HF_TOKEN': 'hf_test'}`.
        timeout: Seconds before the child is killed.
        check: Raise `AssertionError` with the child's output on a non-zero exit.

    Example:
        >>> out = run_client("import huggingface_hub as h; print(h.file_exists('org/tiny', 'config.json'))",
        ...                  hub.endpoint, tmp_path).stdout
    """
    Path(tmp_path).mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=client_env(endpoint, tmp_path, env),
                            capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    if check and result.returncode:
        raise AssertionError(f'client exited with {result.returncode}\n--- stdout\n{result.stdout}\n'
                             f'--- stderr\n{result.stderr}')
    return result
