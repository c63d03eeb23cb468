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
import sys
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import disable_progress_bars

from ..models.catalog import unpublished_entry
from ..models.hub import generate_model_card, push_to_hub


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
              f" timm_ensembles/_catalog.py, so that timm lists it and create_model('{entry}', pretrained=True) loads"
              f' it (hub/README.md, "Catalog")')
    return 0


if __name__ == '__main__':
    sys.exit(main())
