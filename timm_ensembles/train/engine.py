"""The training and evaluation loops behind ``train.py``, method-agnostic.

They see a task (``task(x, target) -> dict(loss, output, components, stats)``) and a model (with
``forward_members`` and ``combine`` when it is an ensemble, and ``forward_members_with_features`` when its members
have features to compare); they never name a method.
"""
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from timm.utils import dispatch_clip_grad
from torch import nn

from .. import metrics
from ..losses import pairwise_feature_difference
from ..utils.progress import progress as progress_bar

__all__ = ['LabelError', 'NonFiniteLossError', 'train_one_epoch', 'evaluate', 'MemberOutputs', 'MemberPredictor',
           'check_input_size', 'check_batch_labels', 'format_metrics', 'format_mechanism', 'mechanism_shares',
           'sync_buffers']


# consecutive fp16 overflow steps tolerated: GradScaler halves its scale at each, so 2^-30 of the starting scale
MAX_FP16_OVERFLOWS = 30


class LabelError(ValueError):
    """A batch holds labels the model has no class for."""


class NonFiniteLossError(FloatingPointError):
    """A loss or loss term became NaN or infinite; training stops before the step is applied."""


class _Means:
    """Running means of the scalars logged over an epoch."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, name: str, value: Any, n: int = 1) -> None:
        self.sums[name] += float(value) * n
        self.counts[name] += n

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / max(self.counts[k], 1) for k in self.sums}


def _non_finite_terms(out: dict[str, Any]) -> list:
    bad = [name for name, value in out.get('components', {}).items() if not torch.isfinite(value).all()]
    if not bad and not torch.isfinite(out['loss']).all():
        bad.append('the weighted sum of finite terms (a weight overflowed)')
    return bad


def check_batch_labels(target: torch.Tensor, num_classes: int | None, split: str) -> None:
    """Refuse labels outside ``0..num_classes - 1`` before they reach a loss (on a GPU, a device-side assert)."""
    if num_classes is None or not target.numel() or target.dtype.is_floating_point:
        return
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= num_classes:
        raise LabelError(f'The {split} split has a label {low if low < 0 else high} outside 0..{num_classes - 1} for'
                         f' {num_classes} classes: pass the right --num-classes, or check the labels.')


def train_one_epoch(
        task: nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        accelerator,
        epoch: int,
        lr_scheduler=None,
        clip_grad: float | None = None,
        clip_mode: str = 'norm',
        num_updates: int = 0,
        show_progress: bool = True,
        num_classes: int | None = None,
        log_interval: int = 0,
        log: Callable[[dict[str, float]], None] | None = None,
        on_update: Callable[[int], None] | None = None,
        mixup_fn: Callable | None = None,
        mechanism_interval: int = 50,
) -> tuple[dict[str, float], int]:
    """One epoch of training.

    Args:
        task: The (prepared) task.
        loader: The (prepared) training loader.
        optimizer: The (prepared) optimizer.
        accelerator: The ``accelerate.Accelerator``.
        epoch: Epoch index, for messages.
        lr_scheduler: A timm scheduler, stepped per optimizer update (``step_update``).
        clip_grad: Where gradients are clipped (by ``clip_mode``), or None.
        clip_mode: timm's clipping modes (``timm.utils.dispatch_clip_grad``): 'norm' clips the global gradient norm
            at ``clip_grad``, 'value' every gradient value to ``[-clip_grad, clip_grad]``, 'agc' adaptively per unit
            (``clip_grad`` the factor; every classifier layer left out, as timm leaves its model's head out).
        num_updates: Optimizer updates done before this epoch.
        show_progress: Show a progress bar on the local main process (when stderr is a terminal; log lines, ``log``'s
            included, are written above it).
        num_classes: When given, the first batch's labels are checked against it.
        log_interval: Every this many updates (and at the epoch's last), ``log`` is called with the update count
            (``update``), the batch index in the epoch (``batch``, of ``batches``), this process's mean loss over the
            interval (``loss``), the first group's learning rate (``lr``) and the throughput of all processes
            (``samples_per_sec``). 0: never.
        log: The callback of ``log_interval``.
        on_update: Called with the update count after every optimizer update (e.g. the model EMA's update).
        mixup_fn: timm's ``Mixup``: mixes each batch and gives the task ``[B, C]`` soft targets (training accuracy
            is then against the target's largest share).
        mechanism_interval: On the epoch's first step and every this many updates, the share of the model's gradient
            from each of the task's ``mechanism`` terms is measured (``share_<name>``, see ``mechanism_shares``);
            0: never.

    Returns:
        (mean of the loss, each component and each stat over the epoch; also train accuracy), updates done so far.

    Raises:
        NonFiniteLossError: A term became NaN or infinite (on any process); the step is not applied.
    """
    task.train()
    clip_params = None
    if clip_grad and clip_mode != 'norm':
        clip_params = _parameters_to_clip(task, exclude_heads=clip_mode == 'agc')
    means = _Means()
    unwrapped = extract_model_from_parallel(task)  # DDP's and torch.compile's wrappers off
    model = getattr(unwrapped, 'model', None)
    model_params = [] if model is None else [p for p in model.parameters() if p.requires_grad]
    overflows = 0  # consecutive fp16 overflow steps, which GradScaler skips and answers with a smaller scale
    with progress_bar(loader, desc=f'train {epoch}', enabled=show_progress and accelerator.is_local_main_process,
                      unit='batch') as bar:
        interval = _Interval(log if log_interval else None, log_interval, len(loader), accelerator.num_processes)
        for step, (x, target) in enumerate(bar):
            if step == 0:
                check_batch_labels(target, num_classes, 'training')
            if mixup_fn is not None and mixup_fn.mixup_enabled:
                x, target = _mix(mixup_fn, x, target)
            with accelerator.accumulate(task):
                out = task(x, target)
                _check_finite_loss(out, accelerator, epoch, num_updates)
                if out.get('mechanism') and model_params and mechanism_interval and (
                        step == 0 or (accelerator.sync_gradients and (num_updates + 1) % mechanism_interval == 0)):
                    for name, share in mechanism_shares(out['loss'], out['mechanism'], model_params).items():
                        means.update(f'share_{name}', share)
                accelerator.backward(out['loss'])
                if accelerator.sync_gradients:
                    overflows = _clip_gradients(task, accelerator, clip_grad, clip_mode, clip_params, overflows, out,
                                                epoch, num_updates)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                num_updates += 1
                if lr_scheduler is not None:
                    lr_scheduler.step_update(num_updates=num_updates)
                if on_update is not None:
                    on_update(num_updates)
            n = target.shape[0]
            interval.add(out['loss'], n, step, num_updates, accelerator.sync_gradients, optimizer)
            _record_batch(means, out, target, n)
            bar.set_postfix(loss=f"{out['loss'].item():.4f}", refresh=False)
    # a finite gradient can still overflow a parameter; such weights must never become a checkpoint
    bad_params = [n for n, p in task.named_parameters() if not torch.isfinite(p).all()]
    if bad_params:
        raise NonFiniteLossError(f'Parameters became non-finite in the last update of epoch {epoch}: {bad_params[:5]}.')
    return means.result(), num_updates


def _mix(mixup_fn: Callable, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup on one batch, its last sample dropped when the batch is odd."""
    if x.shape[0] % 2:
        # mixing pairs images (timm's Mixup refuses odd batches): only a data set smaller than one batch, or an odd
        # --batch-size refused before training, gives one
        x, target = x[:-1], target[:-1]
    return mixup_fn(x, target)


def _check_finite_loss(out: dict[str, Any], accelerator, epoch: int, num_updates: int) -> None:
    """Raise NonFiniteLossError, on every process, when a term of ``out`` is not finite on any process."""
    bad = _non_finite_terms(out)
    if accelerator.num_processes > 1:
        # every process must stop together, or the others hang in the next all-reduce
        flag = torch.tensor([float(bool(bad))], device=out['loss'].device)
        if accelerator.reduce(flag, reduction='sum').item() > 0 and not bad:
            bad = ['loss (on another process)']
    if bad:
        terms = {k: float(v) for k, v in out.get('components', {}).items()}
        raise NonFiniteLossError(
            f"Non-finite loss at epoch {epoch}, update {num_updates}: {', '.join(bad)} blew up"
            f" (terms: {terms}). The step was not applied."
        )


def _clip_gradients(task: nn.Module, accelerator, clip_grad: float | None, clip_mode: str, clip_params, overflows: int,
                    out: dict[str, Any], epoch: int, num_updates: int) -> int:
    """Clip the (all-reduced) gradients by ``clip_mode`` and check their norm; returns the count of consecutive fp16
    overflow steps, ``overflows`` included. Raises NonFiniteLossError on a non-finite gradient that is no fp16
    overflow the grad scaler answers."""
    # the gradients are all-reduced by now, so every process sees the same norm and stops together; the norm unscales
    # fp16 gradients first, so that the other modes clip true gradient values
    max_norm = clip_grad if clip_grad and clip_mode == 'norm' else float('inf')
    grad_norm = accelerator.clip_grad_norm_(task.parameters(), max_norm)
    finite = bool(torch.isfinite(grad_norm))
    if clip_params is not None and finite:
        dispatch_clip_grad(clip_params, clip_grad, mode=clip_mode)
    overflows = 0 if finite else overflows + 1
    # with fp16's GradScaler an overflow is routine: the scaler skips that step and halves its scale; only a run of
    # them (the scale cannot get small enough) means the gradient itself is not finite
    if not finite and (accelerator.scaler is None or overflows > MAX_FP16_OVERFLOWS):
        terms = {k: float(v) for k, v in out.get('components', {}).items()}
        raise NonFiniteLossError(
            f'Non-finite gradient at epoch {epoch}, update {num_updates}, from finite loss terms'
            f' {terms} and weights {out.get("stats", {})}: a term\'s gradient overflowed. The step was'
            ' not applied.'
        )
    return overflows


def _record_batch(means: _Means, out: dict[str, Any], target: torch.Tensor, n: int) -> None:
    """Add one batch's loss, terms, stats and accuracy (against a soft target's largest share) to the epoch's means."""
    means.update('loss', out['loss'].detach(), n)
    for name, value in out.get('components', {}).items():
        means.update(name, value, n)
    for name, value in out.get('stats', {}).items():
        means.update(name, value, n)
    if out.get('output') is not None:
        hard = target.argmax(-1) if target.ndim == 2 else target
        means.update('train_acc', (out['output'].detach().argmax(-1) == hard).float().mean() * 100, n)


class _Interval:
    """The loss and throughput over the updates since the last ``log`` call, logged every ``every`` updates and at
    the epoch's last batch (nothing when ``log`` is None)."""

    def __init__(self, log: Callable[[dict[str, float]], None] | None, every: int, batches: int, processes: int):
        self.log, self.every, self.batches, self.processes = log, every, batches, processes
        self.loss, self.samples, self.start = 0.0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, n: int, step: int, num_updates: int, synced: bool, optimizer) -> None:
        if self.log is None:
            return
        self.loss = self.loss + loss.detach() * n  # a tensor: no device sync but at log steps
        self.samples += n
        last = step + 1 == self.batches
        if synced and (num_updates % self.every == 0 or last):
            seconds = max(time.perf_counter() - self.start, 1e-9)
            self.log(dict(update=num_updates, batch=step + 1, batches=self.batches,
                          loss=float(self.loss) / self.samples, lr=optimizer.param_groups[0]['lr'],
                          samples_per_sec=self.samples * self.processes / seconds))
            self.loss, self.samples, self.start = 0.0, 0, time.perf_counter()


def mechanism_shares(loss: torch.Tensor, terms: dict[str, torch.Tensor],
                     params: list[torch.Tensor]) -> dict[str, float]:
    """The share of the gradient of ``loss`` on ``params`` that each term gives: ``|grad term| / |grad loss|`` (norms
    over every parameter together; 0 for a term of weight 0, and above 1 where other terms pull the other way).
    Gradients are taken without touching ``.grad`` (the step's own backward follows), on this process's batch."""
    def norm(value: torch.Tensor) -> float:
        if not value.requires_grad:
            return 0.0
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        squares = [g.float().pow(2).sum() for g in grads if g is not None]
        return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

    total = norm(loss)
    if total == 0:
        return {}
    return {name: norm(term) / total for name, term in terms.items()}


def _parameters_to_clip(task: nn.Module, exclude_heads: bool) -> list[nn.Parameter]:
    """The trainable parameters, less (``exclude_heads``) those of every classifier a timm model in ``task`` has
    (``get_classifier``: each member's head, an ensemble's own): AGC leaves the final layer unclipped (Brock et al.
    2021), which timm's train.py does by dropping its model's head."""
    heads = set()
    if exclude_heads:
        for module in task.modules():
            get_classifier = getattr(module, 'get_classifier', None)
            classifier = get_classifier() if callable(get_classifier) else None
            if isinstance(classifier, nn.Module):
                heads.update(id(p) for p in classifier.parameters())
    return [p for p in task.parameters() if p.requires_grad and id(p) not in heads]


class MemberOutputs(NamedTuple):
    """One evaluated batch (see ``MemberPredictor``)."""
    members: torch.Tensor  # float32 [B, M, C]: every member's logits (M = 1 for a plain model)
    logits: torch.Tensor  # float32 [B, C]: the model's own prediction (its combine rule, or model(x)), calibrated
    target: torch.Tensor  # [B]
    feature_pairs: torch.Tensor | None  # float32 [B, M, M]: each sample's L_FDL(i, j) (losses.pairwise_...)
    feature_pairs_relative: torch.Tensor | None = None  # float32 [B, M, M]: the same, scale-free ('relative')


class MemberPredictor:
    """The one evaluation pass of member logits, batch by batch, in eval mode (the training mode is restored after):
    for the epoch's evaluation (``evaluate``), the snapshots and the analysis.

    A model with ``forward_members`` is an ensemble (its ``combine`` gives its own prediction, or ``model(x)`` where
    it has none); any other model is one member. With ``features``, a model with
    ``forward_members_with_features`` also gives the per-sample feature difference of every member pair, from the
    same forward pass; a base without intermediates for the taps gives logits only, with the reason in
    ``feature_note``.

    Args:
        model: The unwrapped model.
        loader: Yields ``(x, target)`` batches.
        accelerator: For the device, autocast and (with ``gather``) gathering across processes; None: the model's
            device, no autocast, this process.
        gather: Gather every batch across processes (each sample once, the duplicated tail dropped).
        features: Ask for the feature difference.
        taps: The feature taps (``'preact'``, ``'stages'`` or ``'convs'``); None: the model's default (``'preact'``,
            the stage outputs before their final activation).
        progress: A progress bar over the batches with this description, on the local main process when stderr is a
            terminal (``utils.progress.progress``); None: none.
    """

    def __init__(self, model: nn.Module, loader: Iterable, accelerator=None, gather: bool = False,
                 features: bool = False, taps: str | None = None, progress: str | None = None):
        self.model, self.loader, self.accelerator, self.gather, self.taps = model, loader, accelerator, gather, taps
        self.progress = progress
        self.is_ensemble = hasattr(model, 'forward_members')
        self.with_features = features and self.is_ensemble and hasattr(model, 'forward_members_with_features')
        self.feature_note = None
        if features and self.is_ensemble and not self.with_features:
            self.feature_note = f'no feature distance: {type(model).__name__} has no forward_members_with_features'

    def _forward(self, x: torch.Tensor, first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        model, pairs = self.model, None
        if not self.is_ensemble:
            logits = model(x)
            return logits[:, None], logits, None
        if self.with_features:
            try:
                kwargs = {} if self.taps is None else dict(taps=self.taps)
                members, features = model.forward_members_with_features(x, **kwargs)
            except ValueError as e:
                if not first:
                    raise
                # a base without intermediates for these taps: the same on every process, so all fall back together
                self.with_features, self.feature_note = False, f'no feature distance: {e}'
                members = model.forward_members(x)
            else:
                pairs = torch.stack([pairwise_feature_difference(features, d) for d in ('mse', 'relative')], 1)
                del features
        else:
            members = model.forward_members(x)
        # without a combine rule, the model's own forward says what it predicts (a second pass, for such models only)
        logits = model.combine(members) if hasattr(model, 'combine') else model(x)
        if hasattr(model, 'combine') and hasattr(model, '_tempered'):
            logits = model._tempered(logits)  # as forward: the calibration's temperature (ModelArgsMixin)
        return members, logits, pairs

    @torch.no_grad()
    def __iter__(self) -> Iterator[MemberOutputs]:
        acc, model = self.accelerator, self.model
        # batches go where the model is (a prepared loader has put them there already); a model without parameters
        # takes them where they are
        device = getattr(acc, 'device', None) or next((p.device for p in model.parameters()), None)
        was_training = model.training
        model.eval()
        # a bar on the local main process only (asked only when a bar is wanted)
        enabled = self.progress is not None and (acc is None or acc.is_local_main_process)
        batches = progress_bar(self.loader, desc=self.progress, enabled=enabled, unit='batch')
        try:
            for batch_index, (x, target) in enumerate(batches):
                target = torch.as_tensor(target)
                if device is not None:
                    x, target = x.to(device), target.to(device)
                with acc.autocast() if acc is not None else contextlib.nullcontext():
                    members, logits, pairs = self._forward(x, batch_index == 0)
                out = (members.float(), logits.float(), target) + (() if pairs is None else (pairs,))
                if self.gather:
                    out = acc.gather_for_metrics(out)
                pairs = out[3] if len(out) > 3 else None
                yield MemberOutputs(*out[:3], *((None, None) if pairs is None else (pairs[:, 0], pairs[:, 1])))
        finally:
            batches.close()  # also when the consumer stops early: the bar cleared, the logging restored
            model.train(was_training)


def evaluate(model: nn.Module, loader, accelerator, num_classes: int | None = None,
             split: str = 'validation', progress: str | None = None, n_bins: int | None = None) -> dict[str, Any]:
    """Accuracy and loss of the model, and of every member and their diversity when the model is an ensemble.

    With ``num_classes``, the first batch's labels are checked against it (``split`` names the data in the message).
    ``progress``: a progress bar with this description (``MemberPredictor``); None: none. Without ``accelerator``:
    on the model's device, in this process. With ``n_bins``, also ``ece``: the expected calibration error of
    ``model(x)``'s probabilities in that many bins (``metrics.expected_calibration_error``, which needs torchmetrics).

    Returns:
        ``acc``, ``top5`` (the label among the five highest logits; among all of them with fewer classes) and
        ``loss`` (cross-entropy) of ``model(x)``; for an ensemble also ``member_acc`` (a list),
        ``member_acc_mean``, ``mean_probs_acc`` (accuracy of the averaged member probabilities, the deep
        ensemble's rule, whatever the model's own combine rule is), ``disagreement`` (the fraction of samples on
        which two members' argmax differ, averaged over member pairs) and, for models with
        ``forward_members_with_features``, ``feature_distance`` (the FDL paper's L_FDL between the members' stage
        outputs before their final activation, ``taps='preact'``, averaged over samples and pairs) and
        ``feature_distance_rel`` (its scale-free form, 1 for orthogonal features, 2 for opposite ones:
        ``losses.pairwise_feature_difference``). Every sample counts once, also under DDP.
    """
    # the stage features come out of the same forward pass as the member logits: no second pass
    predictor = MemberPredictor(model, loader, accelerator, gather=accelerator is not None, features=True,
                                progress=progress)
    correct = top5_correct = avg_correct = total = 0
    probs, targets = [], []  # with n_bins: the calibration error bins the whole set at once
    nll = 0.0
    member_correct = pair_differ = feature_sum = relative_sum = None
    for batch_index, (members, logits, target, pairs, relative) in enumerate(predictor):
        if batch_index == 0:
            check_batch_labels(target, num_classes, split)
        if predictor.is_ensemble:  # a plain model's one member is the model: nothing more to count
            # counts, summed exactly over batches, from the same functions as the analysis' matrices
            hits = metrics.member_correct(members, target)
            member_correct = hits if member_correct is None else member_correct + hits
            avg_correct += metrics.ensemble_correct(members, target)
            differ = metrics.pairwise_differ_counts(members)
            pair_differ = differ if pair_differ is None else pair_differ + differ
        if pairs is not None:
            pair_sum = pairs.double().sum(0)
            feature_sum = pair_sum if feature_sum is None else feature_sum + pair_sum
            pair_sum = relative.double().sum(0)
            relative_sum = pair_sum if relative_sum is None else relative_sum + pair_sum
        correct += int((logits.argmax(-1) == target).sum())
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top5_correct += int((top5 == target[:, None]).any(-1).sum())
        nll += float(F.cross_entropy(logits, target, reduction='sum'))
        total += target.shape[0]
        if n_bins:
            probs.append(logits.softmax(-1).cpu())
            targets.append(target.cpu())
    if total == 0:
        raise ValueError('The evaluation set is empty.')
    out: dict[str, Any] = dict(acc=100.0 * correct / total, top5=100.0 * top5_correct / total, loss=nll / total,
                               num_samples=total)
    if n_bins:
        out['ece'] = metrics.expected_calibration_error(torch.cat(probs), torch.cat(targets), n_bins)
    if predictor.is_ensemble:
        member_acc = [100.0 * float(c) / total for c in member_correct]
        out.update(member_acc=member_acc, member_acc_mean=sum(member_acc) / len(member_acc),
                   mean_probs_acc=100.0 * avg_correct / total)
        if pair_differ.shape[0] > 1:
            out['disagreement'] = metrics.mean_offdiag(pair_differ.double().cpu() / total)
            if feature_sum is not None:
                out['feature_distance'] = metrics.mean_offdiag(feature_sum.cpu() / total)
                out['feature_distance_rel'] = metrics.mean_offdiag(relative_sum.cpu() / total)
    return out


def sync_buffers(model: nn.Module, accelerator) -> None:
    """Give every process the main process's buffers (BatchNorm statistics), which DDP leaves per process."""
    if accelerator.num_processes < 2:
        return
    import torch.distributed as dist
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def check_input_size(model: nn.Module, input_size: tuple[int, int, int], model_name: str) -> None:
    """Run one dummy image through the model to tell, before training, whether it takes this input size."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    except Exception as e:
        raise ValueError(
            f"Model '{model_name}' cannot take input size {tuple(input_size)}: {type(e).__name__}: {e}. Choose another"
            f" --img-size, or, for models built for a fixed size (ViTs), build the model for this one with"
            f" --model-kwargs img_size={input_size[-1]}."
        ) from e
    finally:
        model.train(was_training)


def format_mechanism(diagnostics: dict[str, dict[str, Any]]) -> str:
    """The method's diagnostics (``Task.mechanism``) as ``name value (null n)`` (without the null where a diagnostic
    has none), comma-separated; '' for none."""
    parts = []
    for name, d in diagnostics.items():
        value = 'n/a' if d['value'] is None else f"{d['value']:.3g}"
        parts.append(f"{name} {value}" + ('' if d['null'] is None else f" (null {d['null']:g})"))
    return ', '.join(parts)


def format_metrics(epoch: int, train: dict[str, float], val: dict[str, Any], lr: float, seconds: float) -> str:
    """One human-readable line per epoch."""
    parts = [f'epoch {epoch}', f'lr {lr:.3g}']
    parts += [f'{k} {v:.4g}' for k, v in train.items()]
    if 'member_acc' in val:
        parts.append('members ' + ' '.join(f'{a:.2f}' for a in val['member_acc']))
        parts.append(f"mean-probs {val['mean_probs_acc']:.2f}")
    if 'disagreement' in val:
        parts.append(f"disagree {val['disagreement']:.3f}")
    if 'feature_distance' in val:
        parts.append(f"feat-dist {val['feature_distance']:.3g}")
    if 'feature_distance_rel' in val:
        parts.append(f"rel {val['feature_distance_rel']:.3g}")
    parts.append(f"val acc {val['acc']:.2f}")
    parts.append(f"val loss {val['loss']:.4f}")
    parts.append(f'{seconds:.0f}s')
    return ' | '.join(parts)

