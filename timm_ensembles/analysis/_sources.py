"""The sources of a report: run folders and Hub repos, what they recorded, and the checks between them."""
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timm.data import resolve_data_config
from torch import nn

from .. import data as te_data
from ..files.run_folder import RunFolder

_HUB_PREFIXES = ('hf-hub:', 'hf_hub:')
# the time stamp that begins train.py's default output folder name, output/train/<YYYYmmdd-HHMMSS>-<model>
_RUN_STAMP = re.compile(r'^\d{8}-\d{6}-(?=.)')


class AnalysisError(ValueError):
    """Sources that cannot be analysed (together): other datasets, class counts or snapshot subsets."""


@dataclass
class _Source:
    spec: str
    label: str
    model_name: str
    folder: Path | None
    args: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None  # the dataset its run recorded (canonical name), None when unknown
    model: nn.Module | None = None
    num_classes: int | None = None
    data_config: dict[str, Any] | None = None



def _canonical_dataset(name: str | None, root: str | None) -> str | None:
    """The name ``create_datasets`` would report for ``name`` (``DatasetInfo.name``), without reading the data."""
    if name is None:
        return None
    try:
        kind, path, _ = te_data.resolve_source(name, root)
    except (OSError, ValueError):
        return str(name)  # a path that no longer exists: compare the name as given
    # as data.py names them: absolute, symbolic links kept
    if kind == 'digits':
        return 'digits'
    if kind == 'idx':
        return f'idx:{os.path.abspath(os.path.expanduser(path))}'
    if kind == 'folder':
        return os.path.abspath(path)
    return str(path)


def _hub_file(spec: str, filename: str) -> Path:
    """``filename`` of the Hub repo ``spec`` (``hf-hub:org/name[@rev]``) downloaded, or a missing path if it has
    none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, _, revision = spec.split(':', 1)[1].partition('@')
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None))
    except EntryNotFoundError:  # also: offline and not cached; a missing repo fails later, loading the model
        return Path(os.devnull) / filename


def _resolve_source(spec: str, label: str | None) -> _Source:
    if spec.startswith(_HUB_PREFIXES):
        src = _Source(spec, label or spec.split(':', 1)[1].rstrip('/').split('/')[-1], spec, None)
        # a repo pushed from a train.py folder carries its args.yaml and results.json (not its snapshots): the Hub
        # cache's copy of the repo reads as a run folder
        cached = [p for p in (_hub_file(spec, RunFolder.ARGS), _hub_file(spec, RunFolder.RESULTS)) if p.is_file()]
        if cached:
            run = RunFolder(cached[0].parent)
            src.args, src.results = run.args(), run.results()
        # the dataset as the run named it, resolved here: the recorded one is a path on the machine that trained it
        # (no name: the --data-dir folder it read, as timm's train.py; neither: the embedded digits)
        src.dataset = (_canonical_dataset(src.args['dataset'] or src.args.get('data_dir') or '', None)
                       if 'dataset' in src.args else src.results.get('dataset'))
        return src
    path = Path(spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec).expanduser()
    if not path.is_dir():
        raise AnalysisError(f"Source '{spec}' is neither an existing folder (a train.py output) nor an hf-hub: name.")
    if not (path / RunFolder.CONFIG).is_file():
        raise AnalysisError(f"Source '{spec}' has no config.json: give a folder written by train.py (or by"
                            f' timm.models.save_for_hf).')
    src = _Source(spec, label or path.resolve().name, f'local-dir:{path.resolve()}', path)
    run = RunFolder(path)
    src.args, src.results = run.args(), run.results()
    recorded = src.results.get('dataset')
    if recorded is None and 'dataset' in src.args:
        recorded = _canonical_dataset(src.args.get('dataset'), src.args.get('data_dir'))
    src.dataset = recorded
    return src


def _short_labels(labels: list[str]) -> list[str]:
    """Default labels (folder names) without train.py's time stamp, where that leaves them distinct: the labels
    fill plot titles, axes and the printed lines."""
    short = [_RUN_STAMP.sub('', label) for label in labels]
    return short if len(set(short)) == len(short) else labels


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f'{label}#{seen[label]}')
    return out


def _describe(sources: list[_Source]) -> str:
    parts = []
    for s in sources:
        classes = f', {s.num_classes} classes' if s.num_classes is not None else ''
        parts.append(f"{s.label} ({s.spec}): dataset {s.dataset or 'not recorded'}{classes}")
    return '; '.join(parts)


def _check_datasets(sources: list[_Source], dataset: str) -> None:
    wrong = [s for s in sources if s.dataset is not None and s.dataset != dataset]
    if wrong:
        others = [s for s in sources if s not in wrong]
        raise AnalysisError(
            f'Sources trained on another dataset than --dataset ({dataset}): {_describe(wrong)}. All sources are'
            f' evaluated on one dataset; analyse each group of runs with its own --dataset.'
            + (f' The other sources: {_describe(others)}.' if others else ''))


def _check_classes(sources: list[_Source], dataset: str, num_classes: int) -> None:
    counts = {s.num_classes for s in sources}
    if len(counts) > 1 or (num_classes > 0 and counts != {num_classes}):
        raise AnalysisError(
            f'Sources predict different numbers of classes, or not the {num_classes} classes of dataset {dataset}:'
            f' {_describe(sources)}. Only models of the same classes can be compared.')


def _data_config(src: _Source, img_size: int | None, in_chans: int | None, crop_pct: float | None) -> dict:
    """The evaluation preprocessing of a source: the data config saved with the model (train.py saves the one it
    evaluated with), with the run's own flags (args.yaml) where it has them, else the flags given here."""
    if src.args:
        # a train.py run: its flags, never the ones given here, which would evaluate it at another size
        img_size, in_chans, crop_pct = (src.args.get(k) for k in ('img_size', 'in_chans', 'crop_pct'))
    own = resolve_data_config(model=src.model)
    data_args: dict[str, Any] = {}
    if crop_pct is not None:
        data_args['crop_pct'] = crop_pct
    if img_size or in_chans:
        own_size = tuple(own['input_size'])
        data_args['input_size'] = (in_chans or own_size[0], *((img_size, img_size) if img_size else own_size[1:]))
    return resolve_data_config(data_args, model=src.model)


