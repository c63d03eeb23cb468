"""The report's sections: which are asked for, and the numbers of the new ones computed from the sources' logits
(uncertainty, out-of-distribution detection, dataset shift); those computed in weight space are in ``_space``.
"""
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .. import data as te_data
from .. import metrics
from ..utils.checks import is_whole
from . import shift, uncertainty
from ._compute import _evaluate
from ._sources import AnalysisError, _Source

# every section, in the order of the report; the default ones are those of the report before sections existed,
# plus the uncertainty, which costs nothing beyond the logits already computed
SECTIONS = ('members', 'between', 'trajectories', 'uncertainty', 'ood', 'shift', 'landscape', 'samplers')
DEFAULT_SECTIONS = ('members', 'between', 'trajectories', 'uncertainty')
SAMPLERS = ('random', 'dropout', 'diag', 'lowrank')
# points of the risk-coverage curves kept in summary.json (the curves have one point per image)
_CURVE_POINTS = 1001


def _names(value: str | Sequence[str] | None, what: str) -> list[str]:
    """Comma-separated names (or a list of them) as a list of lower-case names, in order, without repeats."""
    items = [value] if isinstance(value, str) else list(value or [])
    out = []
    for item in items:
        for name in str(item).split(','):
            name = name.strip().lower()
            if name and name not in out:
                out.append(name)
    if not out:
        raise AnalysisError(f'{what} names nothing: give a comma-separated list.')
    return out


def _parse_sections(sections: str | Sequence[str] | None) -> tuple[str, ...]:
    """The sections asked for, in report order; ``default`` and ``all`` stand for those groups."""
    if sections is None:
        return DEFAULT_SECTIONS
    wanted, unknown = set(), []
    for name in _names(sections, '--sections'):
        if name == 'default':
            wanted.update(DEFAULT_SECTIONS)
        elif name == 'all':
            wanted.update(SECTIONS)
        elif name in SECTIONS:
            wanted.add(name)
        else:
            unknown.append(name)
    if unknown:
        raise AnalysisError(f"Unknown section(s) {', '.join(unknown)} in --sections: valid ones are"
                            f" {', '.join(SECTIONS)}, 'default' ({', '.join(DEFAULT_SECTIONS)}) and 'all'.")
    return tuple(s for s in SECTIONS if s in wanted)


def _parse_choices(value: str | Sequence[str] | None, valid: Sequence[str], flag: str) -> tuple[list[str], bool]:
    """The names asked for (all of ``valid`` when None) and whether they were asked for explicitly."""
    if value is None:
        return list(valid), False
    names = _names(value, flag)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise AnalysisError(f"Unknown {flag} name(s) {', '.join(unknown)}: valid ones are {', '.join(valid)}.")
    return names, True


def _parse_severities(severities: Sequence[int]) -> list[int]:
    values = list(severities or [])
    bad = [v for v in values if not is_whole(v, ge=1, le=shift.MAX_SEVERITY)]
    if not values or bad:
        raise AnalysisError(f'--severities must be integers in 1..{shift.MAX_SEVERITY} (the clean set, severity 0,'
                            f' is always shown), got {list(severities or [])}.')
    return sorted(set(values))


@dataclass
class _Context:
    """What the sections share: the data, the evaluation settings and where the models run."""
    train_ds: Any
    val_ds: Any
    batch_size: int
    workers: int
    device: torch.device
    n_bins: int
    seed: int
    bn_batches: int
    verbose: bool

    def log(self, message: str) -> None:
        if self.verbose:
            print(f'[analyze] {message}', flush=True)

    def val_loader(self, src: _Source):
        # the evaluation set with this source's eval transform, in order (one source at a time: the transform is
        # set on the shared dataset)
        return te_data.create_eval_loader(self.val_ds, src.data_config, self.batch_size, self.workers)

    def bn_loader(self, src: _Source):
        """The first ``bn_batches`` batches of the training split (a fixed stratified subset, in order) with the
        source's eval transform: the data the BatchNorm statistics of moved weights are recomputed on."""
        try:
            data = te_data.subset_dataset(self.train_ds, self.bn_images(), seed=0, arg='--landscape-batches')
        except (TypeError, ValueError):  # a streamed training set: its first batches (the consumers stop there)
            data = self.train_ds
        return te_data.create_eval_loader(data, src.data_config, self.batch_size, self.workers)

    def bn_images(self) -> int:
        try:
            return min(len(self.train_ds), self.bn_batches * self.batch_size)
        except TypeError:  # no length: streamed
            return self.bn_batches * self.batch_size


# ---------------------------------------------------------------------------------------------------------------
# uncertainty


def _thin(curve: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """At most ``_CURVE_POINTS`` points of a risk-coverage curve, evenly spaced, the last one included."""
    num = curve['coverage'].numel()
    idx = torch.linspace(0, num - 1, min(num, _CURVE_POINTS)).round().long().unique()
    return {k: v[idx].tolist() for k, v in curve.items()}


def _temperature(probs: torch.Tensor, targets: torch.Tensor, n_bins: int, seed: int) -> tuple[dict | None, str | None]:
    """Temperature scaling of the ensemble's probabilities, fitted on one half of the evaluation set (a fixed
    permutation of seed ``seed``) and measured on the other half."""
    num = targets.shape[0]
    if num < 4:
        return None, f'no temperature scaling: {num} evaluation images are too few to split in two halves'
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    fit, held = perm[:num // 2], perm[num // 2:]
    # the log of the averaged probabilities: the ensemble's logits up to a constant per sample
    log_probs = probs.double().clamp_min(1e-300).log()
    try:
        temp = uncertainty.fit_temperature(log_probs[fit], targets[fit])
    except ValueError as e:
        return None, f'no temperature scaling: {e}'
    return dict(
        temperature=temp, seed=seed, fit_samples=int(fit.numel()), eval_samples=int(held.numel()),
        before=metrics.calibration(probs[held], targets[held], n_bins=n_bins),
        after=metrics.calibration((log_probs[held] / temp).softmax(-1), targets[held], n_bins=n_bins),
    ), None


def _uncertainty(srcs: list[_Source], evals: list[dict[str, Any]], n_bins: int, seed: int) -> dict[str, Any]:
    out = dict(seed=seed, sources={})
    for s, ev in zip(srcs, evals):
        label, logits, targets = s.label, ev['logits'], ev['targets']
        # a temperature the model was calibrated with (train.py --calibrate) divides its own prediction only
        model_temp = float(getattr(s.model, 'temperature', 1.0))
        scores = uncertainty.uncertainty_scores(logits)
        probs = metrics.ensemble_probs(logits)
        member0 = logits[:, 0].double().softmax(-1)
        temp, why = _temperature(probs, targets, n_bins, seed)
        out['sources'][label] = dict(
            num_members=logits.shape[1],
            entropy=float(scores['entropy'].mean()),
            expected_entropy=float(scores['expected_entropy'].mean()),
            mutual_information=float(scores['mutual_information'].mean()),
            aurc=uncertainty.aurc(probs, targets),
            aurc_member0=uncertainty.aurc(member0, targets),
            risk_coverage=_thin(uncertainty.risk_coverage(probs, targets)),
            risk_coverage_member0=_thin(uncertainty.risk_coverage(member0, targets)),
            temperature=temp,
            model_temperature=model_temp,
            notes=[why] if why else [],
        )
        if model_temp != 1.0:
            out['sources'][label]['notes'].append(
                f'the model was calibrated with temperature {model_temp:.4g}, which divides its own prediction (the'
                f" own rule column), not the members' probabilities analysed here")
    return out


# ---------------------------------------------------------------------------------------------------------------
# out-of-distribution detection


def _native_image(dataset) -> tuple[int, tuple[int, int]] | None:
    """Channels and (width, height) of the images a dataset holds (its first one), before any transform."""
    inner = dataset.dataset if isinstance(dataset, te_data.SubsetDataset) else dataset
    if isinstance(inner, te_data.ArrayImageDataset):  # grey images [N, H, W], whatever mode it yields them in
        return 1, (int(inner.images.shape[2]), int(inner.images.shape[1]))
    if isinstance(dataset, torch.utils.data.IterableDataset) or len(dataset) == 0:
        return None  # a streamed set: nothing known before loading (its first batch is checked then)
    old = getattr(dataset, 'transform', None)
    try:
        dataset.transform = None
        img = dataset[0][0]
    except Exception:  # noqa: BLE001  (a dataset whose raw images cannot be read: the first batch is checked)
        return None
    finally:
        dataset.transform = old
    if isinstance(img, Image.Image):
        return len(img.getbands()), img.size
    if isinstance(img, torch.Tensor) and img.ndim == 3:
        return int(img.shape[0]), (int(img.shape[2]), int(img.shape[1]))
    return None


def _prepare_ood(name: str, data_dir: str | None, subset: int | None, dataset_name: str, srcs: list[_Source]):
    """The OOD set (its validation split, at most ``subset`` images) and, per source, how its eval transform adapts
    the OOD images to its input (a note) or why it cannot (an AnalysisError, before any evaluation)."""
    try:
        _, ood_ds, info = te_data.create_datasets(name, root=data_dir, val_split='validation')
    except (OSError, ValueError) as e:
        raise AnalysisError(f'Cannot create the OOD dataset {name!r} (--ood-dataset): {e}') from e
    if info.name == dataset_name:
        raise AnalysisError(f'--ood-dataset {name!r} is the evaluation dataset ({dataset_name}): give another'
                            f' dataset, of images the models were not trained on.')
    if subset is not None and subset < len(ood_ds):
        ood_ds = te_data.subset_dataset(ood_ds, subset, seed=0, arg='--ood-subset')
    native = _native_image(ood_ds)
    notes = {}
    for s in srcs:
        chans, height, width = (int(v) for v in s.data_config['input_size'])
        changes = []
        if native is not None and native[0] != chans:
            mode = {1: 'L', 3: 'RGB'}.get(chans)
            if mode is None or not te_data.set_img_mode(ood_ds, mode):
                why = (f'{chans} channels are neither grey nor RGB' if mode is None
                       else f'{type(ood_ds).__name__} cannot be set to read its images as {mode!r}')
                raise AnalysisError(
                    f'The OOD dataset {info.name} holds {native[0]}-channel images and source {s.label} takes'
                    f' {chans} channels, which its eval transform cannot give them ({why}): give an OOD dataset of'
                    f' {chans}-channel images.')
            changes.append(f'read as {mode} ({native[0]} -> {chans} channels)')
        if native is not None and native[1] != (width, height):
            changes.append(f'resized and centre-cropped from {native[1][0]}x{native[1][1]} to {width}x{height} px')
        if changes:
            notes[s.label] = f"{s.label}'s eval transform adapts the OOD images: " + ', '.join(changes)
    return ood_ds, info, notes


def _ood_loader(ood_ds, src: _Source, ctx: _Context):
    """The OOD set through the source's own eval transform; a set it cannot prepare is refused with the reason."""
    try:
        loader = te_data.create_eval_loader(ood_ds, src.data_config, ctx.batch_size, ctx.workers)
        x, _ = next(iter(loader))
    except StopIteration:
        raise AnalysisError('The OOD dataset is empty.') from None
    except Exception as e:  # noqa: BLE001  (any failure of the transform, with the source's name)
        raise AnalysisError(f"The OOD images cannot be prepared as source {src.label}'s input"
                            f" {tuple(src.data_config['input_size'])}: {type(e).__name__}: {e}") from e
    if tuple(x.shape[1:]) != tuple(src.data_config['input_size']):
        raise AnalysisError(f"The OOD images come out of source {src.label}'s eval transform as {tuple(x.shape[1:])},"
                            f" not its input {tuple(src.data_config['input_size'])}: give an OOD dataset of images"
                            f' with its channels.')
    return loader


def _detection(scores_in: dict[str, torch.Tensor], scores_out: dict[str, torch.Tensor],
               names: Sequence[str]) -> dict[str, dict[str, float]]:
    return {n: uncertainty.ood_detection(scores_in[n], scores_out[n]) for n in names}


def _ood(srcs: list[_Source], evals: list[dict[str, Any]], ood_ds, info, notes: dict[str, str],
         ctx: _Context) -> dict[str, Any]:
    out = dict(dataset=info.name, split='validation', num_samples=len(ood_ds), sources={},
               notes=list(notes.values()))
    for s, ev in zip(srcs, evals):
        ctx.log(f'ood: {s.label} on {info.name}')
        loader = _ood_loader(ood_ds, s, ctx)
        ood_logits = _evaluate(s.model.to(ctx.device), loader, ctx.device, None)['logits']
        s.model.cpu()
        num_members = ev['logits'].shape[1]
        scores_in, scores_out = uncertainty.ood_scores(ev['logits']), uncertainty.ood_scores(ood_logits)
        # one member: its expected entropy is its entropy and its mutual information 0 (no information)
        names = list(scores_in) if num_members > 1 else ['neg_max_prob', 'entropy']
        entry = dict(num_members=num_members, scores=_detection(scores_in, scores_out, names), member0=None,
                     ood_max_prob_mean=float((-scores_out['neg_max_prob']).mean()),
                     in_max_prob_mean=float((-scores_in['neg_max_prob']).mean()), logits=ood_logits)
        if num_members > 1:
            entry['member0'] = _detection(uncertainty.ood_scores(ev['logits'][:, :1]),
                                          uncertainty.ood_scores(ood_logits[:, :1]), ['neg_max_prob', 'entropy'])
        out['sources'][s.label] = entry
    return out


# ---------------------------------------------------------------------------------------------------------------
# dataset shift


def _shift_stats(logits: torch.Tensor, targets: torch.Tensor, n_bins: int) -> dict[str, dict[str, float]]:
    out = {}
    for key, probs in (('ensemble', metrics.ensemble_probs(logits)), ('member0', logits[:, 0].double().softmax(-1))):
        out[key] = dict(accuracy=100.0 * float((probs.argmax(-1) == targets).double().mean()),
                        **metrics.calibration(probs, targets, n_bins=n_bins))
    return out


def _check_shift(srcs: list[_Source], corruptions: list[str]) -> None:
    """Before any evaluation: contrast works on grey or RGB images only."""
    if 'contrast' not in corruptions:
        return
    odd = [f"{s.label} ({s.data_config['input_size'][0]} channels)" for s in srcs
           if s.data_config['input_size'][0] not in (1, 3)]
    if odd:
        raise AnalysisError(f"The contrast corruption works on 1- or 3-channel images, not those of {', '.join(odd)}:"
                            f' leave it out of --shift.')


def _shift(srcs: list[_Source], evals: list[dict[str, Any]], corruptions: list[str], severities: list[int],
           ctx: _Context) -> dict[str, Any]:
    levels = [0, *severities]
    out = dict(corruptions=corruptions, severities=levels, seed=ctx.seed, sources={})
    keys = ('accuracy', 'ece', 'nll', 'brier')
    for s, ev in zip(srcs, evals):
        ctx.log(f"shift: {s.label}, {len(corruptions)} corruption(s) x {len(severities)} severities")
        clean = _shift_stats(ev['logits'], ev['targets'], ctx.n_bins)
        # per model (ensemble, first member), per metric, per corruption: one value per severity, 0 the clean set
        res = {model: {k: {c: [clean[model][k]] for c in corruptions} for k in keys} for model in clean}
        loader = ctx.val_loader(s)
        stats = te_data.match_channels(s.data_config)
        model = s.model.to(ctx.device)
        for c in corruptions:
            for severity in severities:
                corrupted = shift.CorruptedLoader(loader, c, severity, seed=ctx.seed, mean=stats['mean'],
                                                  std=stats['std'])
                shifted = _evaluate(model, corrupted, ctx.device, None)
                numbers = _shift_stats(shifted['logits'], shifted['targets'], ctx.n_bins)
                for m in res:
                    for k in keys:
                        res[m][k][c].append(numbers[m][k])
        s.model.cpu()
        entry = dict(num_members=ev['logits'].shape[1])
        for m, values in res.items():
            if m == 'member0' and entry['num_members'] == 1:  # the model itself
                entry[m] = None
                continue
            entry[m] = dict(values, **{f'{k}_mean': [sum(values[k][c][i] for c in corruptions) / len(corruptions)
                                                     for i in range(len(levels))] for k in keys})
        out['sources'][s.label] = entry
    return out
