"""Publish a train.py output folder to a Hugging Face Hub model repo, with a model card made from its metrics.

    timm-ensembles-push output/train/<run> <org>/<name>          # config.json, model.safetensors, card, run files
    timm-ensembles-push output/train/<run>/exported <org>/<name>        # a collaborative run's plain head
    timm-ensembles-push <run> <org>/<name> --revision v1 --private      # a branch; a new repo private
    timm-ensembles-push <run> <org>/<name> --create-pr                  # open a pull request instead
    timm-ensembles-push <run> <org>/<name> --card-only card.md          # write the model card, upload nothing

(also ``python -m timm_ensembles.hub.push``, and ``python hub/push.py`` in a checkout).

The token comes from --token, HF_TOKEN or `hf auth login`; the endpoint from HF_ENDPOINT, as huggingface_hub does.
What is uploaded: config.json, model.safetensors (never a pickle, never checkpoint.pt, so no discriminator, teacher or
optimiser state), README.md (the model card), results.json, metrics.jsonl and args.yaml.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import timm
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import disable_progress_bars
from torch import nn

from ..files.model_folder import MODEL_CARD
from ..files.run_folder import RunFolder
from ..models.catalog import unpublished_entry
from ..models.hub import HubUnreachableError, is_network_error, is_unreachable
from ..utils.progress import logs_above_bars
from .card import _card, _export, _module_base_models, _without_local_paths, generate_model_card

__all__ = ['push_to_hub']


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
            (staging / MODEL_CARD).write_text(_card(run, repo_id), encoding='utf-8')
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
            if not (is_unreachable(e) or is_network_error(e)):
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


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:  # another file system, or no hard links there
        shutil.copy2(src, dst)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folder', help='a train.py output folder (or its exported/ sub-folder)')
    parser.add_argument('repo_id', help='<org or user>/<name> of the model repo (created if it does not exist)')
    parser.add_argument('--token', default=None, help='token with write access (default: HF_TOKEN, hf auth login)')
    parser.add_argument('--revision', default=None, help='branch to commit to (created from main when new)')
    parser.add_argument('--private', action='store_true', help='create the repo private')
    parser.add_argument('--create-pr', action='store_true', help='open a pull request with the commit')
    parser.add_argument('--message', default='Add model', help='commit message')
    parser.add_argument('--no-card', action='store_true', help="keep the repo's README.md; upload no model card")
    parser.add_argument('--card-only', default=None, metavar='FILE', help='write the model card to FILE and stop')
    parser.add_argument('--no-progress', action='store_true', help="no upload progress bars (huggingface_hub's)")
    args = parser.parse_args(argv)
    if args.no_progress:
        disable_progress_bars()  # for this process, which ends with the push
    try:
        if args.card_only:
            Path(args.card_only).write_text(generate_model_card(args.folder, args.repo_id), encoding='utf-8')
            print(f'model card of {args.folder} written to {args.card_only}')
            return 0
        info = push_to_hub(args.folder, args.repo_id, token=args.token, revision=args.revision, private=args.private,
                           create_pr=args.create_pr, commit_message=args.message, model_card=not args.no_card)
    except (OSError, ValueError, HfHubHTTPError) as e:  # OSError: missing files, no token, network
        raise SystemExit(f'error: {e}') from None
    where = getattr(info, 'pr_url', None) or getattr(info, 'commit_url', info)
    print(f'pushed {args.folder} to {args.repo_id}: {where}')
    print(f"load it with: import timm, timm_ensembles; timm.create_model('hf-hub:{args.repo_id}', pretrained=True)")
    entry = unpublished_entry(args.repo_id)
    if entry and not (args.revision or args.create_pr):  # timm loads a tag from the repo's main branch
        print(f"'{entry}' is in the catalog, marked unpublished: set published=True on its entry in"
              f" timm_ensembles/models/catalog.py, so that timm lists it and create_model('{entry}', pretrained=True)"
              f' loads it (hub/README.md, "Catalog")')
    return 0


if __name__ == '__main__':
    sys.exit(main())
