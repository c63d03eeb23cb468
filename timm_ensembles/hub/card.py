"""The model card of a pushed model, written from the run's own metrics (timm's card fields, the paper, the data, the
evaluation results).
"""
import re
import tempfile
from pathlib import Path
from typing import Any

import timm
from torch import nn

from ..models.hub import is_package_model, read_run, weights_repo
from ..utils.extras import INSTALL_FROM_SOURCE
from ..utils.timm_compat import generate_readme

__all__ = ['generate_model_card', 'model_card_fields', 'base_models', 'eval_results']


def _paper(*names: str) -> tuple[str | None, str | None]:
    """Paper name and id of the first of ``names`` (model names, ``<method>_<any base>x<N>`` included) that has one."""
    from ..models.registry import parse_dynamic_name

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
    package_model = is_package_model(architecture)
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
        names.append(model_args.get('base_model') or (None if is_package_model(architecture) else architecture))
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
