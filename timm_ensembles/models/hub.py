"""Publishing to and loading from the Hugging Face Hub.

Every model of this package, and every folder ``train.py`` writes, is in timm's Hugging Face format
(``config.json`` with ``architecture`` and ``model_args``, ``model.safetensors``), so the Hub serves it back to
``timm.create_model('hf-hub:<org>/<name>', pretrained=True)`` once ``import timm_ensembles`` has registered the
models. This module adds what timm's ``push_to_hf_hub`` does not know: a model card written from the run's own
metrics, folders pushed as they are (never their training checkpoint, which holds discriminators and optimiser
state), and clear errors when a repo cannot be loaded.

    from timm_ensembles.models.hub import push_to_hub, load_from_hub
    push_to_hub('output/train/fdl-run', 'my-org/fdl_resnet18x2.fmnist')         # a train.py folder
    push_to_hub(model, 'my-org/my-ensemble')                                    # a model (or a task)
    model = load_from_hub('my-org/fdl_resnet18x2.fmnist@v1')                    # any revision

A model is written with timm's ``save_for_hf`` (as ``train.py`` writes its folder) and every upload goes through
huggingface_hub's ``HfApi.upload_folder``, so that a model and a folder get the same files, card and checks; the
token, endpoint (``HF_ENDPOINT``), cache and offline mode are huggingface_hub's own. Weights are pushed as safetensors
only, and loaded as safetensors only, from the repo (or folder) named, checked against the sha256 its config records:
a config.json cannot point a load at a pickle, a URL or another repo (``check_sources``), and an ensemble whose config
names members in other repos loads them only with ``trust_member_repos=True``.
"""
import contextlib
import contextvars
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import timm
from torch import nn

from ..files.model_folder import VERSION_KEY, WEIGHTS_SHA_KEY, check_weights
from ..files.run_folder import RUN_FILES, RunFolder
from ..utils.extras import INSTALL_FROM_SOURCE
from ..utils.progress import logs_above_bars
from ..utils.timm_compat import generate_readme
from ..version import __version__

__all__ = ['push_to_hub', 'load_from_hub', 'generate_model_card', 'model_card_fields', 'base_models', 'eval_results',
           'read_run', 'check_config',
           'hub_download_errors', 'unreachable_error', 'weights_repo', 'HubUnreachableError', 'RUN_FILES']

_WEIGHTS = RunFolder.WEIGHTS


# ---------------------------------------------------------------------------------------------------------------
# what a folder or a model is


def _is_package_model(architecture: str) -> bool:
    # timm keys its module registry by the last part of the module name, so ask the entrypoint where it lives
    arch = architecture.split('.')[0]
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__.startswith(__package__)


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


def _paper(*names: str) -> tuple[str | None, str | None]:
    """Paper name and id of the first of ``names`` (model names, ``<method>_<any base>x<N>`` included) that has one."""
    from .registry import parse_dynamic_name

    for name in names:
        arch = name.split('.')[0]
        if not timm.is_model(arch):
            arch = (parse_dynamic_name(arch) or {}).get('method', '')
        cfg = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
        if cfg is not None and cfg.paper_name:
            return cfg.paper_name, cfg.paper_ids
    return None, None


def _paper_link(paper_ids: str | None) -> str | None:
    if paper_ids and paper_ids.startswith('arXiv:'):
        return f'https://arxiv.org/abs/{paper_ids.removeprefix("arXiv:")}'
    return None


# train.py's dataset names whose data is on the Hub, for the model card's metadata
_HUB_DATASETS = {'fashion-mnist': 'zalando-datasets/fashion_mnist'}


def _dataset_name(name: str | None) -> str | None:
    """A dataset name fit for a public card: a local folder is named by its last part, never by its path."""
    if not name:
        return None
    if name.startswith('idx:') or '/' in name and not name.startswith('hfds/'):
        return Path(name.removeprefix('idx:')).name or 'a local dataset'
    return name


def _hub_dataset(name: str | None) -> str | None:
    """The Hub dataset id of a dataset name train.py takes (``hfds/<repo>``, or one of ``_HUB_DATASETS``), else None."""
    if not name:
        return None
    return _HUB_DATASETS.get(name) or (name.removeprefix('hfds/') if name.startswith('hfds/') else None)


def _fmt(value: float | None) -> str:
    return '' if value is None else f'{value:.2f}'


# ---------------------------------------------------------------------------------------------------------------
# model cards


def model_card_fields(run: dict[str, Any], repo_id: str) -> dict[str, Any]:
    """The ``model_card`` dict of timm's ``generate_readme`` for a run (see ``read_run``) pushed as ``repo_id``, with
    the Hub metadata timm's writer leaves out: ``base_model`` (``base_models``) and ``eval_results`` (``eval_results``,
    the ``model-index``), which ``generate_model_card`` adds."""
    config = run['config']
    architecture = config['architecture']
    model_args = config.get('model_args', {})
    results = run.get('results', {})
    args = run.get('args', {})
    trained_as = results.get('model') or args.get('model') or architecture
    package_model = _is_package_model(architecture)
    paper_name, paper_ids = _paper(trained_as, architecture)
    # the name the run was given (args.yaml), not the resolved one (results.json: may be a local path)
    dataset = _dataset_name(args.get('dataset') or results.get('dataset'))
    base = model_args.get('base_model')
    members = model_args.get('num_members') or model_args.get('num_heads')
    pcfg = config.get('pretrained_cfg', {})

    if package_model:
        what = f'`{architecture}` ({trained_as})' if trained_as != architecture else f'`{architecture}`'
        description = (f'{what}, a model of timm-ensembles'
                       f'{f" with {members} x `{base}`" if base and members else ""}'
                       f'{f", trained on {dataset}" if dataset else ""}.'
                       f' Loading it needs timm-ensembles, installed {INSTALL_FROM_SOURCE}, and'
                       f' `import timm_ensembles`, which registers the model with timm.')
    else:
        origin = (f'exported from a `{trained_as}` run of timm-ensembles' if trained_as != architecture
                  else 'trained with timm-ensembles')
        description = (f'A plain timm `{architecture}`, {origin}{f" on {dataset}" if dataset else ""}. It is an'
                       f' ordinary timm model: plain timm loads it, timm-ensembles is not needed.')
        if 'exported_from' in run:
            description += ' The run trained several heads; this is the designated one, as a plain network.'
    details: dict[str, Any] = {'Model Type': 'Image classification'}
    if package_model:
        details['Architecture'] = architecture
    details['Trained as'] = f'`{trained_as}`'
    if paper_name:
        link = _paper_link(paper_ids)
        details['Method'] = f'[{paper_name}]({link})' if link else paper_name
    if base:
        details['Base model'] = base
    if members and package_model:
        details['Members' if 'num_members' in model_args else 'Heads'] = members
    if dataset:
        hub_id = _hub_dataset(dataset)
        # timm writes details['Dataset'] into the card's `datasets:` metadata, which takes Hub dataset ids only
        details['Dataset' if hub_id else 'Training data'] = hub_id or dataset
    if pcfg.get('input_size'):
        details['Image size'] = 'x'.join(str(s) for s in pcfg['input_size'][1:])
    if config.get('num_classes'):
        details['Classes'] = config['num_classes']
    if results:
        details['Training'] = (f"{results.get('epochs')} epochs, seed {results.get('seed')}, "
                               f"{results.get('world_size', 1)} process(es)")
    if args.get('teacher'):
        teachers = args['teacher'] if isinstance(args['teacher'], list) else [args['teacher']]
        details['Teachers'] = ', '.join(str(t) for t in _without_local_paths(teachers))

    lines = ['```python']
    if package_model:
        lines += ['import timm_ensembles  # registers the models of timm-ensembles with timm', 'import timm', '',
                  f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()"]
    else:
        lines += ['import timm', '', f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()"]
    lines += ['cfg = timm.data.resolve_data_config(model=model)  # the preprocessing it was evaluated with',
              'transform = timm.data.create_transform(**cfg)', 'logits = model(transform(img).unsqueeze(0))'
              '  # [1, classes]']
    if package_model and members:
        lines.append('members = model.forward_members(transform(img).unsqueeze(0))  # [1, members, classes]')
    lines.append('```')
    usage = '\n'.join(lines) + '\n'
    if package_model:
        usage += ('\n`timm_ensembles.load_from_hub(' + f"'{repo_id}'" + ')` does the same and explains a repo'
                  ' it cannot load.\n')

    comparison = ''
    final = results.get('final_epoch') or {}
    if final:
        rows = ['| | accuracy (%) |', '|---|---|', f"| prediction (`model(x)`) | {_fmt(final.get('acc'))} |"]
        for i, acc in enumerate(final.get('member_acc', [])):
            rows.append(f"| {'member' if 'num_members' in model_args else 'head'} {i} | {_fmt(acc)} |")
        if 'mean_probs_acc' in final:
            rows.append(f"| averaged probabilities | {_fmt(final['mean_probs_acc'])} |")
        if 'disagreement' in final:
            rows.append(f"| members' disagreement (fraction) | {final['disagreement']:.4f} |")
        comparison = (f"Validation results at the final epoch ({final.get('num_samples', '?')} images of"
                      f" {dataset or 'the evaluation set'}; no epoch selection):\n\n" + '\n'.join(rows) + '\n')
        if 'exported_from' in run:
            comparison += ('\nThe run\'s prediction (first row) is its designated head, which this export is, with'
                           ' identical outputs; the other rows are the heads of the run it was exported from.\n')
    mechanism = results.get('mechanism') or {}
    if mechanism:
        rows = ['| diagnostic | final epoch | when the mechanism does nothing | what it is |', '|---|---|---|---|']
        for name, d in mechanism.items():
            value = 'not computed' if d.get('value') is None else f"{d['value']:.4g}"
            null = '' if d.get('null') is None else f"{d['null']:g}"
            rows.append(f"| `{name}` | {value} | {null} | {d.get('note', '')} |")
        comparison += ("\nThe method's own diagnostics (is its mechanism acting? each beside the value it takes when"
                       ' the mechanism does nothing):\n\n' + '\n'.join(rows) + '\n')
    if args:
        comparison += ("\nTraining, with this repo's `args.yaml` (every flag of the run; `metrics.jsonl` holds every"
                       f' epoch): install timm-ensembles {INSTALL_FROM_SOURCE}, then `accelerate launch -m'
                       ' timm_ensembles.train --config args.yaml --output <new folder>` (or `timm-ensembles-train'
                       ' --config args.yaml ...`).\n')

    card = dict(
        tags=['image-classification', 'timm', 'timm-ensembles'] + ([trained_as.split('_')[0]] if package_model
                                                                   else []),
        license=pcfg.get('license', 'apache-2.0'),
        description=description,
        details=details,
        usage=usage,
        base_model=base_models(run),
        eval_results=eval_results(run, dataset),
    )
    if comparison:
        card['comparison'] = comparison
    return card


def _hub_repo(name: Any) -> str | None:
    """The Hub repo id (no revision) whose weights ``name`` loads: an ``hf-hub:`` name's, or a timm name's pretrained
    ``hf_hub_id``; None for a folder (also one named like a timm model), ``local-dir:``, a path or anything else."""
    if not isinstance(name, str) or not name or Path(name).expanduser().exists():
        return None
    try:
        repo = weights_repo(name)
    except ValueError:  # a path that is not here, or '<org>/<name>' without hf-hub: (a folder, as train.py reads it)
        return None
    return repo.partition('@')[0] if repo else None


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


def base_models(run: dict[str, Any]) -> list[str]:
    """The Hub repos a run's model starts from or learns from, for the card's ``base_model``: the base's timm weights
    when its members (heads, student) start from them (``--pretrained-base``), the published model it was fine-tuned
    from (``--pretrained``), its teachers, the members of an ``ensemble`` of trained models, and for a model pushed as
    an object what it knows of these (``run['base_models']``, names). Only Hub repos: never a folder or a path."""
    config = run['config']
    architecture = config['architecture']
    model_args = config.get('model_args') or {}
    args = run.get('args') or {}
    kwargs = args.get('model_kwargs') if isinstance(args.get('model_kwargs'), dict) else {}
    names = []
    if args.get('pretrained_base') or kwargs.get('pretrained_base'):
        # an exported head or a bare student is the base architecture itself
        names.append(model_args.get('base_model') or (None if _is_package_model(architecture) else architecture))
    if args.get('pretrained'):
        names.append(args.get('model'))
    names += _as_list(args.get('teacher'))
    names += _as_list(kwargs.get('members')) + _as_list(kwargs.get('generations'))
    names += _as_list(run.get('base_models'))
    return list(dict.fromkeys(repo for repo in map(_hub_repo, names) if repo))


def _module_base_models(source: nn.Module) -> list[str]:
    """What a model (or task) pushed as an object knows of the models it comes from (see ``base_models``): a task's
    teachers as named, the base when the members started from its pretrained weights, members loaded from Hub repos."""
    names = [n for n in getattr(source, 'teacher_names', ()) if isinstance(n, str)]
    model = source.export_model() if hasattr(source, 'export_model') else source
    recorded = model.__dict__.get('_recorded_model_args') or {}
    if recorded.get('pretrained_base'):
        names.append(recorded.get('base_model'))
    for member in getattr(model, 'members', ()):
        cfg = getattr(member, 'pretrained_cfg', None) or {}
        if cfg.get('source') == 'hf-hub' and cfg.get('hf_hub_id'):
            names.append(f"hf-hub:{cfg['hf_hub_id']}")
    return names


# the model-index entries of a card: (results.json key, metric type, metric name); accuracies in %, as the run records
_CARD_METRICS = (
    ('acc', 'accuracy', 'Top-1 accuracy (%)'),
    ('loss', 'nll', 'NLL (cross-entropy of the prediction)'),
    ('ece', 'ece', 'ECE (expected calibration error)'),
    ('member_acc_mean', 'accuracy', "Members' mean top-1 accuracy (%)"),
    ('disagreement', 'disagreement', "Members' disagreement (fraction of images on which two members differ)"),
)


def eval_results(run: dict[str, Any], dataset: str | None) -> list:
    """The run's results as huggingface_hub ``EvalResult`` entries (the card's ``model-index``): on the test set where
    the run had one (``--holdout``), else the final epoch's validation, which is then the dataset's evaluation split
    (``--val-split``); only the numbers results.json holds. Empty without results or a dataset."""
    from huggingface_hub import EvalResult

    results = run.get('results') or {}
    metrics = results.get('test') or results.get('final_epoch') or {}
    if not dataset or not isinstance(metrics, dict):
        return []
    split = (run.get('args') or {}).get('val_split')
    common = dict(task_type='image-classification', task_name='Image Classification',
                  dataset_type=_hub_dataset(dataset) or dataset, dataset_name=dataset,
                  **({'dataset_split': split} if split else {}))
    return [EvalResult(metric_type=kind, metric_name=label, metric_value=round(float(metrics[key]), 6), **common)
            for key, kind, label in _CARD_METRICS if isinstance(metrics.get(key), (int, float))]


def _card(run: dict[str, Any], repo_id: str) -> str:
    """The model card's text: timm's ``generate_readme``, with the Hub metadata it does not write (``base_model``, a
    ``model-index``) set through huggingface_hub's own card class, which writes them as the Hub reads them."""
    from huggingface_hub import ModelCard

    fields = model_card_fields(run, repo_id)
    card = ModelCard(generate_readme(fields, repo_id.split('/')[-1]))
    bases = fields['base_model']
    if bases:
        card.data.base_model = bases[0] if len(bases) == 1 else bases
    if fields['eval_results']:
        card.data.model_name = repo_id.split('/')[-1]
        card.data.eval_results = fields['eval_results']
    return str(card)


def generate_model_card(source: str | Path | nn.Module, repo_id: str) -> str:
    """The README.md (model card) that ``push_to_hub`` uploads for ``source`` (a folder, a model or a task) as
    ``repo_id``."""
    if isinstance(source, nn.Module):
        with tempfile.TemporaryDirectory(prefix='timm-ensembles-card-') as tmp:
            run = read_run(_export(source, Path(tmp)))
            return _card(dict(run, base_models=_module_base_models(source)), repo_id)
    return _card(read_run(source), repo_id)


def _export(source: nn.Module, folder: Path) -> Path:
    """A model (or a task's export) written as train.py writes it: timm's save_for_hf, safetensors only."""
    from ..files.model_folder import export_folder

    model = source.export_model() if hasattr(source, 'export_model') else source
    return export_folder(model, folder)


# ---------------------------------------------------------------------------------------------------------------
# push


def _require_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PermissionError(
            'Pushing to the Hub needs a token with write access: pass token=..., set the HF_TOKEN environment'
            ' variable, or log in once with `hf auth login`.')
    return token


def _check_loads(folder: Path) -> None:
    """Refuse a folder whose config and weights do not rebuild a model: a repo must load as it is pushed."""
    try:
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    except Exception as e:
        raise ValueError(f"'{folder}' does not load as a model ({type(e).__name__}: {e}); it is not pushed.") from e


def push_to_hub(
        source: str | Path | nn.Module,
        repo_id: str,
        *,
        token: str | None = None,
        revision: str | None = None,
        private: bool = False,
        create_pr: bool = False,
        commit_message: str = 'Add model',
        model_card: bool = True,
        check: bool = True,
):
    """Publish a model, a task's model or a ``train.py`` output folder to a Hub model repo.

    The repo gets ``config.json`` and ``model.safetensors`` (timm's format, safetensors only), a ``README.md`` model
    card, and for a folder the run's ``results.json``, ``metrics.jsonl`` and ``args.yaml``. Never a checkpoint:
    a distillation run's discriminators and teachers, and every optimiser state, stay local. A collaborative run's
    plain head is published on its own by pushing ``<run>/exported``.

    Args:
        source: A ``train.py`` output folder, a model, or a task (its ``export_model()`` is pushed).
        repo_id: ``<org or user>/<name>``; created if it does not exist.
        token: A token with write access; default: huggingface_hub's (``HF_TOKEN``, ``hf auth login``).
        revision: Branch to commit to (created from main if it does not exist); default main.
        private: Create the repo private (an existing repo keeps its visibility).
        create_pr: Open a pull request against the default branch instead of committing (not with ``revision``).
        commit_message: The commit's message.
        model_card: Upload the generated model card (it replaces the repo's README.md); False uploads none.
        check: Reload what is pushed before pushing it and refuse it if it does not load.

    Returns:
        huggingface_hub's ``CommitInfo`` of the upload.
    """
    from huggingface_hub import HfApi

    if revision and create_pr:
        # huggingface_hub refuses the pair after the repo is created; refuse it before anything is sent
        raise ValueError(f'create_pr=True opens a pull request against the default branch; it cannot be combined with'
                         f' revision={revision!r}. Push to the branch, or open the pull request without revision.')
    token = _require_token(token)
    with tempfile.TemporaryDirectory(prefix='timm-ensembles-push-') as tmp:
        staging = Path(tmp)
        if isinstance(source, nn.Module):
            # a model takes the folder's way: the same files, card and checks as a train.py folder
            folder = _export(source, staging / 'export')
            staging = staging / 'repo'
        else:
            folder = Path(source)
        source_run = RunFolder.of_model(folder)
        run = source_run.read()
        if check:
            _check_loads(folder)
        staging.mkdir(exist_ok=True)
        staged = RunFolder(staging)
        # only these files, whatever else the folder holds (checkpoint.pt, exported/, logs)
        for src, dst in ((source_run.config_path, staged.config_path), (source_run.weights_path, staged.weights_path)):
            _link_or_copy(src, dst)
        # the run's files without the paths of this machine (output, data, teachers): never published
        run = _without_local_paths(run)
        if 'args' in run:
            staged.write_args(run['args'])
        if 'results' in run:
            staged.write_results(run['results'])
        if source_run.file(RunFolder.METRICS).is_file():
            _link_or_copy(source_run.file(RunFolder.METRICS), staged.file(RunFolder.METRICS))
        if model_card:
            if isinstance(source, nn.Module):
                run['base_models'] = _module_base_models(source)
            (staging / 'README.md').write_text(_card(run, repo_id), encoding='utf-8')
        api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if private and not api.repo_info(repo_id).private:
                raise ValueError(f"'{repo_id}' exists and is public: private=True cannot make it private (the Hub keeps"
                                 f" an existing repo's visibility). Change it in the repo's settings, or push to a new"
                                 f' repo.')
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            # huggingface_hub draws its own upload bars (huggingface_hub.utils.disable_progress_bars turns them off);
            # its warnings (retries) and ours go above them
            with logs_above_bars():
                return api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision,
                                         create_pr=create_pr, commit_message=commit_message)
        except Exception as e:
            if not (_is_unreachable(e) or _is_network_error(e)):
                raise
            raise _push_unreachable_error(repo_id, e) from None


def _push_unreachable_error(repo_id: str, error: BaseException) -> OSError:
    """The one line for a push that cannot reach the Hub (the client's traceback would bury it)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return HubUnreachableError(f"Cannot push to '{repo_id}': HF_HUB_OFFLINE is set, and a push needs the network."
                                   f' Unset HF_HUB_OFFLINE, then push again.')
    return HubUnreachableError(
        f"Cannot push to '{repo_id}': {constants.ENDPOINT} cannot be reached ({type(error).__name__}: "
        f"{' '.join(str(error).split())}). Check the network (or HF_ENDPOINT), then push again: a push uploads the"
        f' whole folder again and commits it as one commit.')


def _without_local_paths(value: Any) -> Any:
    """``value`` (a run's args, results, nested) with every absolute path of this machine replaced by ``<local>/`` and
    its last part: a published repo names its data and teachers, never where they lay here."""
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str):
        for prefix in ('local-dir:', 'idx:', ''):
            rest = value[len(prefix):]
            if value.startswith(prefix) and (rest.startswith(('/', '~')) or re.match(r'^[A-Za-z]:[\\/]', rest)):
                return f'{prefix}<local>/{Path(rest).name}'
    return value


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:  # another file system, or no hard links there
        shutil.copy2(src, dst)


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
        path = hf_hub_download(repo_id, 'config.json', revision=revision)
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
            f" loads a model's own {_WEIGHTS} only, never a file, URL or repo that its config names (an export,"
            f" timm's save_for_hf, writes no such entry).")
    trust = _TRUST_MEMBER_REPOS.get() if trust_member_repos is None else trust_member_repos
    if members and not trust:
        listed = ', '.join(repr(m) for m in dict.fromkeys(members))
        raise ValueError(
            f"'{name}' names models that live elsewhere as its members ({listed}): they load only if you trust them,"
            f" with load_from_hub('{name}', trust_member_repos=True) (the same argument to timm.create_model; train.py"
            f' and timm-ensembles-predict: --trust-member-repos), each as {_WEIGHTS} checked against the sha256 its'
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
        path = try_to_load_from_cache(repo_id, 'config.json', cache_dir=cache_dir, revision=revision)
        path, own = (Path(path) if isinstance(path, str) else None), ('source', 'hf_hub_id')
    else:
        name, repo_id = f"local-dir:{pretrained_cfg['file']}", None
        path, own = Path(pretrained_cfg['file']) / 'config.json', ('source', 'file')
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
                         f' pickle): a member named by a config loads only as a Hub repo\'s {_WEIGHTS}.')
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
        if pretrained and not _is_package_model(config['architecture']):  # this package's models check on load
            check_weights(config, folder / _WEIGHTS, str(folder))
        with trusting_member_repos(trust_member_repos):
            return timm.create_model(f'local-dir:{folder}', pretrained=pretrained, **kwargs)
    repo_id, revision = _hub_name(name)
    config = _fetch_config(repo_id, revision)
    check_config(config, name)
    _check_config_sources(config, name, trust_member_repos, repo_id)
    if pretrained and not _is_package_model(config['architecture']):
        # a plain timm model (a student, a head) loads through timm alone: check it here (this package's models are
        # checked as they load, by _builder, which also serves timm.create_model('hf-hub:...'))
        _require_safetensors(repo_id, revision, name)
        if WEIGHTS_SHA_KEY in config:
            from huggingface_hub import hf_hub_download

            try:
                weights = hf_hub_download(repo_id, _WEIGHTS, revision=revision)
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
        if not _is_network_error(e):
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
        if api.file_exists(repo_id, _WEIGHTS, revision=revision):
            return
        pickled = api.file_exists(repo_id, 'pytorch_model.bin', revision=revision)
    except Exception as e:
        if _is_unreachable(e) or _is_network_error(e):
            if isinstance(try_to_load_from_cache(repo_id, _WEIGHTS, revision=revision), str):
                return  # timm loads them from the cache
            raise unreachable_error(repo_id, revision, weights_of=weights_of or name) from None
        if isinstance(e, (HfHubHTTPError, OSError)):
            return  # the listing cannot be had (a mirror): timm's download of model.safetensors decides
        raise
    if pickled:
        raise FileNotFoundError(
            f"The Hub repo '{name}' has no {_WEIGHTS}, only pytorch_model.bin: a pickle, which this package never"
            f' loads from the network. Push the model as safetensors (timm_ensembles.push_to_hub, or'
            f' safetensors.torch.save_file on a state dict you trust).')
    raise FileNotFoundError(_no_weights(name))


def _no_weights(name: str) -> str:
    return (f"The Hub repo '{name}' has a config.json but no weights (no {_WEIGHTS}): the upload was incomplete. Push"
            f' the model again (timm_ensembles.push_to_hub or python hub/push.py).')


def _is_network_error(e: BaseException) -> bool:
    # huggingface_hub lets its HTTP client's errors through once its retries are spent; a body shorter than announced
    # is its OSError 'Consistency check failed'
    if isinstance(e, HubUnreachableError):
        return False  # said in full already
    if isinstance(e, (ConnectionError, TimeoutError)) or 'Consistency check failed' in str(e):
        return True
    return type(e).__module__.split('.')[0] in ('httpx', 'httpx2', 'httpcore', 'requests', 'urllib3')


class HubUnreachableError(ConnectionError):
    """The Hub cannot be reached and the cache lacks what was asked for (not a download that broke off)."""


def _is_unreachable(e: BaseException) -> bool:
    """huggingface_hub could not reach the Hub (or was told not to, HF_HUB_OFFLINE) and the cache lacks the file; not a
    download that broke off, which ``load_from_hub`` reports as such."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return True
    return type(e).__name__ in ('ConnectError', 'ConnectTimeout') and _is_network_error(e)


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
        repo = (repo_id or weights_repo(model_name)) if _is_unreachable(e) else None
        if not repo:
            raise
        # the cause is said in full: huggingface_hub's traceback (kept as __context__) would bury the one line
        raise unreachable_error(*_hub_name(repo), weights_of=model_name) from None
