"""The test Hub servers of `_hub_servers.py` against the real huggingface_hub client (no timm_ensembles code)."""

import hashlib
import json
import os
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import timm
import torch
from _hub_servers import LFS_THRESHOLD, FakeHub, Olah, git_blob_sha, run_client

TOKEN = {'HF_TOKEN': 'hf_test'}
BIG = LFS_THRESHOLD + 2**20  # through preupload "lfs", the LFS batch endpoint and the PUT href


def _lines(result) -> list:
    """The JSON lines a client snippet printed."""
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith(('{', '[', '"'))]


@pytest.fixture(scope='module')
def hub():
    with FakeHub(tokens={'hf_test'}) as server:
        yield server


@pytest.fixture(scope='module')
def timm_folder(tmp_path_factory):
    """A `save_for_hf` folder of a tiny timm model, with a fixed input and the saved model's output on it."""
    folder = tmp_path_factory.mktemp('tiny')
    model = timm.create_model('test_resnet', num_classes=3).eval()
    timm.models.save_for_hf(model, str(folder / 'model'), safe_serialization=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the client, so that the same kernels run and outputs can be compared exactly
    with torch.no_grad():
        torch.save({'x': x, 'y': model(x)}, folder / 'io.pt')
    torch.set_num_threads(threads)
    return folder


TIMM_CHECK = '''
    import timm, torch
    torch.set_num_threads(1)
    io = torch.load({io!r})
    model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()
    with torch.no_grad():
        print(torch.equal(model(io['x']), io['y']))
'''


def test_upload_folder_then_download_byte_identical(hub, tmp_path):
    folder = tmp_path / 'up'
    folder.mkdir()
    files = {'config.json': b'{"a": 1}', 'README.md': b'---\nlicense: mit\n---\n# tiny\n', 'big.bin': os.urandom(BIG)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = _lines(run_client(f'''
        import json
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        api = HfApi()
        api.create_repo('org/roundtrip')
        api.create_repo('org/roundtrip', exist_ok=True)
        info = api.upload_folder(repo_id='org/roundtrip', folder_path={str(folder)!r})
        print(json.dumps(info.oid))
        print(json.dumps({{name: hf_hub_download('org/roundtrip', name) for name in {list(files)!r}}}))
        print(json.dumps(snapshot_download('org/roundtrip')))
        print(json.dumps(sorted(api.list_repo_files('org/roundtrip'))))
        print(json.dumps(api.model_info('org/roundtrip').sha))
    ''', hub.endpoint, tmp_path, env=TOKEN))
    sha, paths, snapshot, listed, info_sha = out
    assert info_sha == sha == hub.repos['org/roundtrip'].refs['main']
    assert listed == sorted(files)
    for name, data in files.items():
        assert Path(paths[name]).read_bytes() == data
        assert (Path(snapshot) / name).read_bytes() == data
    assert hub.files('org/roundtrip') == files
    puts = [r.path for r in hub.requests if r.method == 'PUT']
    assert '/_lfs/' + hashlib.sha256(files['big.bin']).hexdigest() in puts  # the big file went by LFS
    assert len(puts) == len(set(puts))  # and only it


def test_create_pr_lands_on_refs_pr_not_main(hub, tmp_path):
    hub.add_files('org/pr', {'config.json': b'{}'})
    main_before = hub.repos['org/pr'].refs['main']
    out = _lines(run_client('''
        import json
        from huggingface_hub import HfApi, hf_hub_download
        info = HfApi().upload_file(path_or_fileobj=b'new', path_in_repo='new.txt', repo_id='org/pr', create_pr=True)
        print(json.dumps([info.pr_url, info.pr_revision, info.pr_num]))
        print(json.dumps(open(hf_hub_download('org/pr', 'new.txt', revision=info.pr_revision)).read()))
    ''', hub.endpoint, tmp_path, env=TOKEN))
    assert out[0] == [f'{hub.endpoint}/org/pr/discussions/1', 'refs/pr/1', 1]
    assert out[1] == 'new'
    assert hub.repos['org/pr'].refs['main'] == main_before
    assert 'new.txt' not in hub.files('org/pr') and 'new.txt' in hub.files('org/pr', 'refs/pr/1')


def test_branch_revision(hub, tmp_path):
    hub.add_files('org/branch', {'config.json': b'{"v": 1}'})
    out = run_client('''
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
        api = HfApi()
        api.create_branch('org/branch', branch='dev')
        api.create_branch('org/branch', branch='dev', exist_ok=True)
        api.upload_file(path_or_fileobj=b'{"v": 2}', path_in_repo='config.json', repo_id='org/branch', revision='dev')
        print(open(hf_hub_download('org/branch', 'config.json', revision='dev')).read())
        print(open(hf_hub_download('org/branch', 'config.json')).read())
        print(sorted(api.list_repo_files('org/branch', revision='dev')))
    ''', hub.endpoint, tmp_path, env=TOKEN).stdout.splitlines()
    assert out == ['{"v": 2}', '{"v": 1}', "['config.json']"]
    assert hub.files('org/branch', 'dev')['config.json'] == b'{"v": 2}'


def test_private_repo_needs_token(hub, tmp_path):
    hub.add_files('org/private', {'config.json': b'{}'}, private=True)
    code = '''
        from huggingface_hub import hf_hub_download, HfApi
        from huggingface_hub.errors import RepositoryNotFoundError
        for call in (lambda: hf_hub_download('org/private', 'config.json'), lambda: HfApi().model_info('org/private')):
            try:
                call()
                print('read')
            except RepositoryNotFoundError as e:
                print(e.response.status_code)
    '''
    assert run_client(code, hub.endpoint, tmp_path / 'anonymous').stdout.split() == ['401', '401']
    assert run_client(code, hub.endpoint, tmp_path / 'wrong', env={'HF_TOKEN': 'hf_wrong'}).stdout.split() == \
        ['401', '401']
    assert run_client(code, hub.endpoint, tmp_path / 'token', env=TOKEN).stdout.split() == ['read', 'read']


def test_push_without_valid_token_raises_401(hub, tmp_path):
    hub.add_files('org/locked', {'config.json': b'{}'})
    before = dict(hub.repos['org/locked'].refs)
    code = '''
        from huggingface_hub import HfApi
        api = HfApi()
        for call in (lambda: api.create_repo('org/new-repo'),
                     lambda: api.upload_file(path_or_fileobj=b'x', path_in_repo='x.txt', repo_id='org/locked')):
            try:
                call()
                print('pushed')
            except Exception as e:
                print(type(e).__name__, e.response.status_code)
    '''
    expected = ['HfHubHTTPError 401', 'HfHubHTTPError 401']
    assert run_client(code, hub.endpoint, tmp_path / 'anonymous').stdout.splitlines() == expected
    assert run_client(code, hub.endpoint, tmp_path / 'wrong', env={'HF_TOKEN': 'hf_wrong'}).stdout.splitlines() == \
        expected
    assert 'org/new-repo' not in hub.repos and hub.repos['org/locked'].refs == before


def test_missing_file_repo_revision(hub, tmp_path):
    hub.add_files('org/exists', {'config.json': b'{}'})
    out = run_client('''
        from huggingface_hub import hf_hub_download, HfApi
        for args in [('org/exists', 'nope.bin', 'main'), ('org/missing', 'config.json', 'main'),
                     ('org/exists', 'config.json', 'nobranch')]:
            try:
                hf_hub_download(args[0], args[1], revision=args[2])
            except Exception as e:
                print(type(e).__name__)
        print(HfApi().file_exists('org/exists', 'nope.bin'), HfApi().file_exists('org/exists', 'config.json'))
    ''', hub.endpoint, tmp_path).stdout.splitlines()
    assert out == ['RemoteEntryNotFoundError', 'RepositoryNotFoundError', 'RevisionNotFoundError', 'False True']


def test_resolve_http_details(hub):
    """What the client relies on, by plain HTTP: quoted ETag, X-Repo-Commit, sizes, ranges, error codes."""
    sha = hub.add_files('org/http', {'a.txt': b'0123456789'})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(method, path, headers=None):
        request = urllib.request.Request(hub.endpoint + path, method=method, headers=headers or {})
        try:
            with opener.open(request) as answer:
                return answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    status, headers, body = call('HEAD', '/org/http/resolve/main/a.txt')
    assert (status, body, headers['Content-Length'], headers['X-Repo-Commit']) == (200, b'', '10', sha)
    assert headers['ETag'] == f'"{git_blob_sha(b"0123456789")}"'
    status, headers, body = call('GET', '/org/http/resolve/main/a.txt', {'Range': 'bytes=2-4'})
    assert (status, headers['Content-Range'], body) == (206, 'bytes 2-4/10', b'234')
    assert call('GET', '/org/http/resolve/main/a.txt', {'Range': 'bytes=7-'})[2] == b'789'
    status, headers, _ = call('HEAD', '/org/http/resolve/main/b.txt')
    assert (status, headers['X-Error-Code']) == (404, 'EntryNotFound')
    status, headers, _ = call('GET', '/org/nothing/resolve/main/a.txt')
    assert (status, headers['X-Error-Code']) == (401, 'RepoNotFound')
    assert call('POST', '/api/repos/create', {'Content-Type': 'application/json'})[0] == 401


def test_dropped_connections_are_retried(hub, tmp_path):
    small, big = os.urandom(300_000), os.urandom(BIG)
    hub.add_files('org/flaky', {'small.bin': small, 'big.bin': big})
    hub.fail_downloads('small.bin', times=2, after_bytes=1000)
    hub.fail_downloads('big.bin', times=1, after_bytes=LFS_THRESHOLD + 1000)
    start = len(hub.requests)
    out = run_client('''
        from huggingface_hub import hf_hub_download
        print(hf_hub_download('org/flaky', 'small.bin'))
        print(hf_hub_download('org/flaky', 'big.bin'))
    ''', hub.endpoint, tmp_path).stdout.split()
    assert Path(out[0]).read_bytes() == small and Path(out[1]).read_bytes() == big
    gets = [(r.path.rsplit('/', 1)[1], r.headers.get('range')) for r in hub.requests[start:] if r.method == 'GET']
    # below the client's 10 MiB read chunk nothing reaches the file before the drop: it starts again from 0;
    # above it, it resumes with a Range from the last full chunk
    assert gets == [('small.bin', None)] * 3 + [('big.bin', None), ('big.bin', f'bytes={LFS_THRESHOLD}-')]


def test_download_gives_up_and_leaves_no_partial_file(hub, tmp_path):
    data = os.urandom(200_000)
    hub.add_files('org/broken', {'w.bin': data})
    hub.fail_downloads('w.bin', times=6, after_bytes=1000)  # the first call: one GET and 5 retries, all broken
    out = run_client('''
        import os
        from huggingface_hub import hf_hub_download, constants
        try:
            hf_hub_download('org/broken', 'w.bin')
        except Exception as e:
            print(type(e).__module__, type(e).__name__)
        blobs = os.path.join(constants.HF_HUB_CACHE, 'models--org--broken', 'blobs')
        print(len(os.listdir(blobs)))
        print(hf_hub_download('org/broken', 'w.bin'))
    ''', hub.endpoint, tmp_path).stdout.splitlines()
    assert out[:2] == ['httpx2 RemoteProtocolError', '0']  # no blob, not even an .incomplete one
    assert Path(out[2]).read_bytes() == data


def test_timm_through_fakehub(hub, timm_folder, tmp_path):
    # one client for both pushes and pulls: importing torch and timm is most of its time
    push = textwrap.dedent(f'''
        import timm
        from huggingface_hub import HfApi
        from safetensors.torch import load_file
        HfApi().create_repo('org/tiny')
        HfApi().upload_folder(repo_id='org/tiny', folder_path={str(timm_folder / 'model')!r})
        model = timm.create_model('test_resnet', num_classes=3)
        model.load_state_dict(load_file({str(timm_folder / 'model' / 'model.safetensors')!r}))
        timm.models.push_to_hf_hub(model, 'tiny-pushed', safe_serialization=True)  # in the token's namespace
    ''')
    pull = ''.join(textwrap.dedent(TIMM_CHECK.format(io=str(timm_folder / 'io.pt'), repo=repo))
                   for repo in ('org/tiny', 'tester/tiny-pushed'))
    out = run_client(push + pull, hub.endpoint, tmp_path, env=TOKEN)
    assert out.stdout.split() == ['True', 'True']
    assert set(hub.files('org/tiny')) == {p.name for p in (timm_folder / 'model').iterdir()}
    assert 'model.safetensors' in hub.files('org/tiny')
    pushed = [c for c in hub.commit_log if c.repo_id == 'tester/tiny-pushed']
    assert len(pushed) == 1 and pushed[0].ref == 'main' and pushed[0].message == 'Add model'
    assert sorted(pushed[0].added) == ['README.md', 'config.json', 'model.safetensors']  # no pytorch_model.bin


@pytest.fixture(scope='module')
def olah(timm_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp('olah')
    v1, v2 = root / 'v1', root / 'v2'
    v1.mkdir()
    v2.mkdir()
    (v1 / 'config.json').write_text('{"v": 1}')
    (v2 / 'config.json').write_text('{"v": 2}')
    (v2 / 'extra.bin').write_bytes(os.urandom(100_000))
    with Olah({'org/files': [v1, v2], 'org/tiny': timm_folder / 'model'}, root=root / 'server') as server:
        server.tag('org/files', 'v1', server.commits['org/files'][0])
        server.branch('org/files', 'old', server.commits['org/files'][0])
        yield server


def test_olah_download_pinning_and_errors(olah, tmp_path):
    old, new = olah.commits['org/files']
    out = _lines(run_client(f'''
        import json, os
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        def attempt(call):
            try:
                return call()
            except Exception as e:
                return type(e).__name__
        print(json.dumps([open(hf_hub_download('org/files', 'config.json', revision=rev)).read()
                          for rev in (None, {old!r}, 'v1', 'old', {old[:7]!r})]))
        print(json.dumps(hf_hub_download('org/files', 'extra.bin')))
        print(json.dumps(sorted(os.listdir(snapshot_download('org/files', revision='v1')))))
        print(json.dumps(sorted(HfApi().list_repo_files('org/files'))))
        print(json.dumps([attempt(lambda: hf_hub_download('org/files', 'nope.bin')),
                          attempt(lambda: hf_hub_download('org/missing', 'config.json')),
                          attempt(lambda: hf_hub_download('org/files', 'config.json', revision='nobranch')),
                          attempt(lambda: HfApi().model_info('org/files', revision='main').sha),
                          attempt(lambda: HfApi().model_info('org/files').sha),
                          HfApi().file_exists('org/files', 'nope.bin')]))
    ''', olah.endpoint, tmp_path))
    assert out[0] == ['{"v": 2}', '{"v": 1}', '{"v": 1}', '{"v": 1}', '{"v": 1}']
    assert Path(out[1]).read_bytes() == (olah.root.parent / 'v2' / 'extra.bin').read_bytes()
    assert out[2] == ['config.json'] and out[3] == ['config.json', 'extra.bin']
    # olah's quirks: a missing file or revision looks like a missing repo, and model_info needs an explicit revision
    assert out[4] == ['RepositoryNotFoundError'] * 3 + [new, 'RepositoryNotFoundError', False]


def test_timm_through_olah(olah, timm_folder, tmp_path):
    code = TIMM_CHECK.format(io=str(timm_folder / 'io.pt'), repo='org/tiny')
    assert run_client(code, olah.endpoint, tmp_path).stdout.split() == ['True']
