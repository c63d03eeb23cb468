"""Loading from the Hugging Face Hub (and from exported folders): ``load_from_hub`` and the checks every load makes.

Every model of this package, and every folder ``train.py`` writes, is in timm's Hugging Face format
(``config.json`` with ``architecture`` and ``model_args``, ``model.safetensors``), so the Hub serves it back to
``timm.create_model('hf-hub:<org>/<name>', pretrained=True)`` once ``import timm_ensembles`` has registered the
models; publishing is ``timm_ensembles.hub`` (``push_to_hub``, the model card).

    from timm_ensembles import load_from_hub
    model = load_from_hub('my-org/fdl_resnet18x2.fmnist@v1')                    # any revision

Weights are loaded as safetensors only, from the repo (or folder) named, checked against the sha256 its config
records: a config.json cannot point a load at a pickle, a URL or another repo (``check_sources``), and an ensemble
whose config names members in other repos loads them only with ``trust_member_repos=True``. As in timm
(``timm/models/_hub.py``), loading is a models concern: the builder and the registry use it.
"""
import contextlib
import contextvars
import json
from pathlib import Path
from typing import Any

import timm
from torch import nn

from ..files.model_folder import CONFIG, PICKLED_WEIGHTS, VERSION_KEY, WEIGHTS, WEIGHTS_SHA_KEY, check_weights
from ..files.run_folder import RunFolder
from ..utils.extras import INSTALL_FROM_SOURCE
from ..version import __version__

__all__ = ['load_from_hub', 'read_run', 'check_config', 'check_sources', 'check_timm_source', 'check_member_source',
           'trusting_member_repos', 'hub_download_errors', 'unreachable_error', 'weights_repo', 'HubUnreachableError',
           'is_package_model', 'is_unreachable', 'is_network_error']

# ---------------------------------------------------------------------------------------------------------------
# what a folder or a model is


def is_package_model(architecture: str) -> bool:
    # timm keys its module registry by the last part of the module name, so ask the entrypoint where it lives
    arch = architecture.split('.')[0]
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__.startswith(__name__.split('.')[0])


def read_run(folder: str | Path) -> dict[str, Any]:
    """The config and run files of a ``train.py`` output folder (or of its ``exported/`` sub-folder).

    Returns:
        ``config`` (config.json), and where present ``results`` (results.json), ``args`` (args.yaml), ``metrics``
        (metrics.jsonl lines), ``exported_from`` (the run folder, for an ``exported/`` sub-folder).

    Raises:
        FileNotFoundError: no ``config.json`` or no ``model.safetensors`` in the folder.
        ValueError: a ``config.json`` that is not timm's format.
    """
    return RunFolder.of_model(folder).read()


# ---------------------------------------------------------------------------------------------------------------
# pull


def _hub_name(name: str) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of ``org/name``, ``org/name@rev`` or ``hf-hub:org/name[@rev]``."""
    name = name.removeprefix('hf-hub:')
    repo_id, _, revision = name.partition('@')
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f"'{name}' is not a Hub model name: expected '<org>/<name>' or '<org>/<name>@<revision>',"
                         f" optionally after 'hf-hub:'; a local folder is given as 'local-dir:<folder>'.")
    return repo_id, revision or None


def _fetch_config(repo_id: str, revision: str | None) -> dict[str, Any]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f' at revision {revision!r}' if revision else ''
    try:
        path = hf_hub_download(repo_id, CONFIG, revision=revision)
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
        raise unreachable_error(repo_id, revision) from None
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"The Hub repo '{repo_id}' has no revision {revision!r} (a branch, tag or commit)."
                                ) from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(
            f"The Hub repo '{repo_id}'{at} has no config.json: it is not a timm model repo (push one with"
            f" timm_ensembles.push_to_hub or python hub/push.py).") from e
    except GatedRepoError as e:  # a subclass of RepositoryNotFoundError
        raise PermissionError(f"The Hub repo '{repo_id}' is gated: accept its conditions on its Hub page, then use a"
                              f' token of that account (HF_TOKEN or `hf auth login`).') from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"No model repo '{repo_id}' on {constants.ENDPOINT}, or it is private and no token with access was found"
            f" (HF_TOKEN or `hf auth login`). Check the name; hub/README.md lists the published models."
        ) from e
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config.json of '{repo_id}'{at} is not valid JSON ({e}).") from e


def check_config(config: dict[str, Any], source: str) -> None:
    """Raise a ValueError that says what is missing when this installation cannot build ``config``'s model."""
    architecture = config.get('architecture')
    if not architecture:
        raise ValueError(f"config.json of '{source}' has no 'architecture': it is not a timm model config.")
    if timm.is_model(architecture):
        return
    written_by = config.get(VERSION_KEY)
    hint = (f' It was written by timm-ensembles {written_by}; this is timm-ensembles {__version__}: install a newer'
            f' one {INSTALL_FROM_SOURCE}.' if written_by and written_by != __version__ else
            ' If it is a model of another timm plugin, import that package first (timm has no plugin discovery).')
    raise ValueError(
        f"'{source}' is a '{architecture}', a model that neither timm {timm.__version__} nor timm-ensembles"
        f" {__version__} knows.{hint}")


# pretrained_cfg entries that say where weights come from: timm's save_for_hf drops them, so a config that has one was
# not written by an export, and timm would follow it (`file`, `hf_hub_filename`: another file of the repo, a pickle)
_WEIGHTS_ENTRIES = ('file', 'url', 'state_dict', 'hf_hub_id', 'hf_hub_filename')
# model arguments whose strings are models loaded with their weights wherever they live (an ensemble's members, a BAN
# ensemble's generations); a saved model records its members as specs, built empty and filled from its own weights
_MEMBER_ARGS = ('members', 'generations')
_SOURCE_PREFIXES = ('hf-hub:', 'hf_hub:', 'local-dir:')
# the opt-in of load_from_hub(trust_member_repos=True) (or train.py's flag) for the models it builds, nested ones too
_TRUST_MEMBER_REPOS = contextvars.ContextVar('trust_member_repos', default=False)
# set while a model is built from a config read from a repo or folder: the member names it holds load under
# check_member_source's rule
_FROM_CONFIG = contextvars.ContextVar('from_config', default=False)


@contextlib.contextmanager
def trusting_member_repos(trust: bool = True, from_config: bool = False):
    """Within it, models built from a repo's or folder's config may load the members that config names from other
    repos (``load_from_hub(..., trust_member_repos=True)``); ``from_config`` marks a build from such a config."""
    tokens = [_TRUST_MEMBER_REPOS.set(trust or _TRUST_MEMBER_REPOS.get())]
    if from_config:
        tokens.append(_FROM_CONFIG.set(True))
    try:
        yield
    finally:
        for token in reversed(tokens):
            token.var.reset(token)


def check_sources(pretrained_cfg: dict[str, Any], model_args: dict[str, Any], name: str,
                  trust_member_repos: bool | None = None) -> None:
    """Refuse a config read from a repo or folder (``name``) that would make loading fetch anything but its own
    ``model.safetensors``: a weights entry in its ``pretrained_cfg`` (a file, URL or repo; a pickle), or model arguments
    that fetch weights (``pretrained_base``) or name models elsewhere (members in other repos, folders or timm's
    weights), unless ``trust_member_repos`` (default: the ``trusting_member_repos`` context) allows the latter.

    Args:
        pretrained_cfg: The config's ``pretrained_cfg``, less what timm itself sets on a load (``source``, and the
            repo's ``hf_hub_id`` or the folder's ``file``).
        model_args: The config's ``model_args``.
        name: What the user named (``hf-hub:org/name``, ``local-dir:<folder>``), for the messages.
        trust_member_repos: The user's opt-in to members that live elsewhere.

    Raises:
        ValueError: One line naming the entries or members, and for members the opt-in.
    """
    steering = [f'pretrained_cfg {k}={pretrained_cfg[k]!r}' for k in _WEIGHTS_ENTRIES if pretrained_cfg.get(k)]
    members: list[str] = []

    def walk(value: Any, key: str | None = None) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k in ('pretrained_base', 'trust_member_repos') and v:
                    steering.append(f'model_args {k}={v!r}')
                else:
                    walk(v, k)
        elif isinstance(value, (list, tuple)):
            for v in value:
                if key in _MEMBER_ARGS and isinstance(v, str):
                    members.append(v)
                else:
                    walk(v, key)
        elif isinstance(value, str) and value.startswith(_SOURCE_PREFIXES):
            members.append(value)  # e.g. a base model or a member's architecture in another repo

    walk(model_args or {})
    if steering:
        raise ValueError(
            f"The config.json of '{name}' says where to fetch weights from ({', '.join(steering)}): timm-ensembles"
            f" loads a model's own {WEIGHTS} only, never a file, URL or repo that its config names (an export,"
            f" timm's save_for_hf, writes no such entry).")
    trust = _TRUST_MEMBER_REPOS.get() if trust_member_repos is None else trust_member_repos
    if members and not trust:
        listed = ', '.join(repr(m) for m in dict.fromkeys(members))
        raise ValueError(
            f"'{name}' names models that live elsewhere as its members ({listed}): they load only if you trust them,"
            f" with load_from_hub('{name}', trust_member_repos=True) (the same argument to timm.create_model; train.py"
            f' and timm-ensembles-predict: --trust-member-repos), each as {WEIGHTS} checked against the sha256 its'
            f' config.json records.')


def check_timm_source(pretrained_cfg: Any, model_args: dict[str, Any] | None, trust: bool | None = None,
                      cache_dir: str | Path | None = None) -> contextlib.AbstractContextManager:
    """``check_sources`` for a model that ``timm.create_model`` builds from an ``hf-hub:`` or ``local-dir:`` name (its
    entrypoint gets the repo's ``pretrained_cfg``, with ``source``, and ``model_args``); nothing for other models.

    The config.json is read again as written (timm sets ``hf_hub_id`` and ``file`` to the repo or folder it was given):
    from the folder, or from the Hub cache that timm has just filled; where it is not there, what timm passed on.

    Returns:
        A context in which to build the model: members it names load under ``check_member_source``'s rule.
    """
    source = pretrained_cfg.get('source') if isinstance(pretrained_cfg, dict) else None
    if source not in ('hf-hub', 'local-dir'):
        return contextlib.nullcontext()
    if source == 'hf-hub':
        from huggingface_hub import try_to_load_from_cache

        name, (repo_id, revision) = f"hf-hub:{pretrained_cfg['hf_hub_id']}", _hub_name(pretrained_cfg['hf_hub_id'])
        path = try_to_load_from_cache(repo_id, CONFIG, cache_dir=cache_dir, revision=revision)
        path, own = (Path(path) if isinstance(path, str) else None), ('source', 'hf_hub_id')
    else:
        name, repo_id = f"local-dir:{pretrained_cfg['file']}", None
        path, own = Path(pretrained_cfg['file']) / CONFIG, ('source', 'file')
    try:
        config = json.loads(path.read_text()) if path is not None else None
    except (OSError, json.JSONDecodeError):
        config = None
    if isinstance(config, dict):
        _check_config_sources(config, name, trust, repo_id)
    else:
        check_sources({k: v for k, v in pretrained_cfg.items() if k not in own}, model_args or {}, name, trust)
    return trusting_member_repos(bool(trust), from_config=True)


def check_member_source(name: str) -> None:
    """Under a build from a repo's or folder's config (trusted, see ``check_sources``), refuse a member named by a
    timm name whose pretrained weights are not a Hub repo's safetensors (a URL or file: a pickle). Members named as
    ``hf-hub:`` / ``local-dir:`` sources load through ``load_from_hub``, which holds them to its own rule."""
    if not _FROM_CONFIG.get() or not isinstance(name, str) or name.startswith(_SOURCE_PREFIXES) or Path(name).exists():
        return
    repo = weights_repo(name)
    if repo is None:
        raise ValueError(f"member '{name}' has no pretrained weights on the Hub (they would come from a URL or file, a"
                         f' pickle): a member named by a config loads only as a Hub repo\'s {WEIGHTS}.')
    _require_safetensors(*_hub_name(repo), repo, weights_of=name)


def load_from_hub(name: str, pretrained: bool = True, trust_member_repos: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for a Hub repo or a local folder, with this package's models registered.

    Whatever its config.json says, what is loaded is the repo's (folder's) own ``model.safetensors``, checked against
    the sha256 the config records: never a pickle, and never a file, URL or other repo the config names. An ensemble
    whose config names members in other repos (or folders, or timm's weights) loads only with
    ``trust_member_repos=True``, each member held to the same rule.

    The token (private repos), endpoint, cache and offline mode are huggingface_hub's: ``HF_TOKEN`` or
    ``hf auth login``, ``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``.

    Args:
        name: ``<org>/<name>``, ``<org>/<name>@<revision>`` or ``hf-hub:...`` (a Hub repo), ``local-dir:<folder>``
            or a folder path.
        pretrained: Load the repo's weights (False: only its architecture, freshly initialised).
        trust_member_repos: Load the members that the config names in other places.
        **kwargs: Passed on to ``timm.create_model`` (e.g. ``num_classes`` for a new classifier).

    Raises:
        FileNotFoundError: The repo, the revision, its config.json or its weights do not exist (or are not in the
            offline cache).
        PermissionError: The repo is gated and the token has not accepted its conditions.
        ConnectionError: The Hub could not be reached and nothing is cached, or a download broke off for good.
        ValueError: The config names a model this installation does not know (it says which package or version), or
            says where to fetch weights from, or names members elsewhere without ``trust_member_repos``.
        TypeError: The config holds arguments this version does not know (written by a newer version).
        RuntimeError: The weights do not fit the model the config describes, or are not the ones it records.
    """
    if name.startswith('local-dir:') or Path(name).is_dir():
        folder = Path(name.removeprefix('local-dir:'))
        config = read_run(folder)['config']
        check_config(config, str(folder))
        _check_config_sources(config, f'local-dir:{folder}', trust_member_repos)
        if pretrained and not is_package_model(config['architecture']):  # this package's models check on load
            check_weights(config, folder / WEIGHTS, str(folder))
        with trusting_member_repos(trust_member_repos):
            return timm.create_model(f'local-dir:{folder}', pretrained=pretrained, **kwargs)
    repo_id, revision = _hub_name(name)
    config = _fetch_config(repo_id, revision)
    check_config(config, name)
    _check_config_sources(config, name, trust_member_repos, repo_id)
    if pretrained and not is_package_model(config['architecture']):
        # a plain timm model (a student, a head) loads through timm alone: check it here (this package's models are
        # checked as they load, by _builder, which also serves timm.create_model('hf-hub:...'))
        _require_safetensors(repo_id, revision, name)
        if WEIGHTS_SHA_KEY in config:
            from huggingface_hub import hf_hub_download

            try:
                weights = hf_hub_download(repo_id, WEIGHTS, revision=revision)
            except Exception:
                weights = None  # timm's own download, below, reports what failed
            if weights:
                check_weights(config, weights, name)
    # config.json is in the cache now: timm reads it from there, then fetches the weights
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        with trusting_member_repos(trust_member_repos):
            return timm.create_model(f'hf-hub:{repo_id}' + (f'@{revision}' if revision else ''),
                                     pretrained=pretrained, **kwargs)
    except LocalEntryNotFoundError:  # offline or unreachable, config.json cached but not the weights
        raise unreachable_error(repo_id, revision, weights_of=name) from None
    except EntryNotFoundError as e:
        # timm looks for model.safetensors, then falls back to pytorch_model.bin: the error names the fallback
        raise FileNotFoundError(_no_weights(name)) from e
    except Exception as e:
        if not is_network_error(e):
            raise
        raise ConnectionError(
            f"Downloading the weights of '{name}' failed after huggingface_hub's retries ({type(e).__name__}: {e})."
            f' The cache keeps no partial file as complete: run it again when the connection is back.') from e


def _check_config_sources(config: dict[str, Any], name: str, trust: bool, repo_id: str | None = None) -> None:
    """``check_sources`` on a config.json as read (timm's older single-dict form included); an ``hf_hub_id`` naming
    the repo itself is no other source."""
    pretrained_cfg = dict(config['pretrained_cfg'] if 'pretrained_cfg' in config else config)
    if repo_id and str(pretrained_cfg.get('hf_hub_id', '')).removeprefix('hf-hub:').partition('@')[0] == repo_id:
        del pretrained_cfg['hf_hub_id']
    check_sources(pretrained_cfg, config.get('model_args') or {}, name, trust or None)


def _require_safetensors(repo_id: str, revision: str | None, name: str, weights_of: str | None = None) -> None:
    """Refuse a repo without ``model.safetensors`` before timm falls back to ``pytorch_model.bin``: that is a pickle,
    and this package never unpickles weights from the network.

    Where the Hub cannot be reached (or HF_HUB_OFFLINE is set), cached weights load as they are, and weights not in the
    cache are ``unreachable_error`` (naming ``weights_of``, default ``name``) at once, before huggingface_hub's
    downloads of model.safetensors and pytorch_model.bin each wait through their retries.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        if api.file_exists(repo_id, WEIGHTS, revision=revision):
            return
        pickled = api.file_exists(repo_id, PICKLED_WEIGHTS, revision=revision)
    except Exception as e:
        if is_unreachable(e) or is_network_error(e):
            if isinstance(try_to_load_from_cache(repo_id, WEIGHTS, revision=revision), str):
                return  # timm loads them from the cache
            raise unreachable_error(repo_id, revision, weights_of=weights_of or name) from None
        if isinstance(e, (HfHubHTTPError, OSError)):
            return  # the listing cannot be had (a mirror): timm's download of model.safetensors decides
        raise
    if pickled:
        raise FileNotFoundError(
            f"The Hub repo '{name}' has no {WEIGHTS}, only {PICKLED_WEIGHTS}: a pickle, which this package never"
            f' loads from the network. Push the model as safetensors (timm_ensembles.push_to_hub, or'
            f' safetensors.torch.save_file on a state dict you trust).')
    raise FileNotFoundError(_no_weights(name))


def _no_weights(name: str) -> str:
    return (f"The Hub repo '{name}' has a config.json but no weights (no {WEIGHTS}): the upload was incomplete. Push"
            f' the model again (timm_ensembles.push_to_hub or python hub/push.py).')


def is_network_error(e: BaseException) -> bool:
    # huggingface_hub lets its HTTP client's errors through once its retries are spent; a body shorter than announced
    # is its OSError 'Consistency check failed'
    if isinstance(e, HubUnreachableError):
        return False  # said in full already
    if isinstance(e, (ConnectionError, TimeoutError)) or 'Consistency check failed' in str(e):
        return True
    return type(e).__module__.split('.')[0] in ('httpx', 'httpx2', 'httpcore', 'requests', 'urllib3')


class HubUnreachableError(ConnectionError):
    """The Hub cannot be reached and the cache lacks what was asked for (not a download that broke off)."""


def is_unreachable(e: BaseException) -> bool:
    """huggingface_hub could not reach the Hub (or was told not to, HF_HUB_OFFLINE) and the cache lacks the file; not a
    download that broke off, which ``load_from_hub`` reports as such."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return True
    return type(e).__name__ in ('ConnectError', 'ConnectTimeout') and is_network_error(e)


def unreachable_error(repo_id: str, revision: str | None = None, weights_of: str | None = None) -> OSError:
    """The one-line error for a file of ``repo_id`` that is neither in the cache nor downloadable: FileNotFoundError
    when HF_HUB_OFFLINE is set, HubUnreachableError (a ConnectionError) when the Hub (``HF_ENDPOINT``) cannot be
    reached.

    Args:
        repo_id: The Hub repo.
        revision: Its revision, if one was asked for.
        weights_of: The model whose weights were being fetched (a timm name, a tag), for the message; None for the
            repo itself.
    """
    from huggingface_hub import constants

    at = f' at revision {revision!r}' if revision else ''
    what, verb, it, they = ((f"The weights of '{weights_of}' (Hub repo '{repo_id}'{at})", 'are', 'them', 'they')
                            if weights_of else (f"'{repo_id}'{at}", 'is', 'it', 'it'))
    if constants.HF_HUB_OFFLINE:
        return FileNotFoundError(
            f'{what} {verb} not in the local Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: download'
            f' {it} once with the network (HF_HUB_OFFLINE unset), or point HF_HUB_CACHE at a cache that holds {it}.')
    return HubUnreachableError(
        f'{what} {verb} not in the local Hub cache ({constants.HF_HUB_CACHE}) and {constants.ENDPOINT} cannot be'
        f' reached: check the network (or HF_ENDPOINT). HF_HUB_OFFLINE=1 reads only the cache, once {they} {verb}'
        f' there.')


def weights_repo(model_name: str) -> str | None:
    """The Hub repo (``org/name[@revision]``) that ``timm.create_model(model_name, pretrained=True)`` downloads from:
    an ``hf-hub:`` name's own, else the ``hf_hub_id`` of the name's pretrained cfg in timm's registry; None for weights
    that come from elsewhere (a URL, a file) or for none."""
    from timm.models import parse_model_name

    if not isinstance(model_name, str):
        return None
    source, model_id = parse_model_name(model_name)
    if source == 'hf-hub':
        return model_id
    if source is not None:
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(model_id)
    except RuntimeError:  # a tag timm does not know: timm's own error says so
        return None
    return cfg.hf_hub_id if cfg is not None else None


@contextlib.contextmanager
def hub_download_errors(model_name: str, repo_id: str | None = None):
    """Around a download of ``model_name``'s pretrained weights: when the Hub cannot be reached (or HF_HUB_OFFLINE is
    set) and the cache lacks them, raise ``unreachable_error`` naming the repo, instead of huggingface_hub's error.

    Args:
        model_name: The timm name (a tag, ``hf-hub:...``) whose weights are fetched.
        repo_id: Its Hub repo, when the registry does not give it (``weights_repo``).
    """
    try:
        yield
    except Exception as e:
        repo = (repo_id or weights_repo(model_name)) if is_unreachable(e) else None
        if not repo:
            raise
        # the cause is said in full: huggingface_hub's traceback (kept as __context__) would bury the one line
        raise unreachable_error(*_hub_name(repo), weights_of=model_name) from None
