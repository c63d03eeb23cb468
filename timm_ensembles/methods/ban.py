"""Born-again networks: a student retrained from its predecessor's predictions, generation after generation.

Paper: "Born-Again Neural Networks", Furlanello, Lipton, Tschannen, Itti, Anandkumar, ICML 2018 (arXiv:1805.04770).
No official PyTorch code.

Generation k (a ``ban_<base>`` student, by default of the teacher's architecture) is trained on the cross-entropy
between its predictions and generation k-1's, without temperature (the paper's BAN: teacher only, no labels), from
a new random initialisation with the same schedule. The teacher is frozen and in eval mode (``models/teachers.py``).
``train.py --generations K`` runs K generations, each teaching the next. The BAN ensemble (``bane``) averages the
predicted probabilities of several generations.

Options (``--task-kwargs``): ``temperature`` (T; the loss is scaled by T^2), ``label_weight`` (adds the labels'
cross-entropy: the paper's BAN+L), and ``variant``:

* ``ban``: cross-entropy against the teacher's distribution (default);
* ``cwtm``: confidence-weighted by teacher max: the labels' cross-entropy, each sample weighted by the teacher's
  highest probability, normalised over the batch;
* ``dkpp``: dark-knowledge with permuted predictions: the teacher's distribution with its non-argmax probabilities
  permuted at random per sample.

With several teachers, their probabilities are averaged. Registered names: ``ban`` (``base_model=``),
``ban_<base>``, and ``bane`` (``base_model=``, ``num_members=``, or ``generations=[folders]``).
"""
import json
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..files.run_folder import RunFolder
from ..losses import soft_cross_entropy  # re-exported: its home before losses.py
from ..models.builder import create_ensemble, register_ensemble_variants, register_student_variants
from ..models.distill import DistillationTask, StudentModel
from ..models.ensemble import EnsembleModel
from ..models.registry import register_task
from ..task import TaskOutput
from ..utils.checks import check_option, check_range

__all__ = ['BornAgainStudent', 'BornAgainTask', 'BornAgainEnsemble', 'create_bane', 'soft_cross_entropy']

VARIANTS = ('ban', 'cwtm', 'dkpp')


class BornAgainStudent(StudentModel):
    """A born-again student: one timm model (see ``StudentModel``), trained by ``BornAgainTask``."""


def permute_dark_knowledge(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row's non-argmax probabilities permuted at random among the non-argmax classes (DKPP)."""
    batch, num_classes = probs.shape
    top = probs.argmax(-1, keepdim=True)
    is_top = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, True)
    # the non-argmax classes of each row, in ascending order and in a random order (the argmax sorts last in both)
    classes = torch.arange(num_classes, device=probs.device).expand(batch, -1)
    ordered = torch.argsort(classes + num_classes * is_top, dim=1)[:, :-1]
    noise = torch.rand(batch, num_classes, generator=generator).to(probs.device)
    shuffled = torch.argsort(noise + 2.0 * is_top, dim=1)[:, :-1]
    return probs.scatter(1, ordered, probs.gather(1, shuffled))


@register_task(BornAgainStudent)
class BornAgainTask(DistillationTask):
    """The born-again objective.

    Args:
        model: A ``BornAgainStudent``.
        teachers: The previous generation (or several teachers, averaged): see ``DistillationTask``.
        variant: 'ban' (default), 'cwtm' or 'dkpp' (see the module docstring).
        temperature: Softmax temperature of teacher and student in the distillation term (1: the paper's, none).
        label_weight: Weight of the labels' cross-entropy added to the distillation term (0: the paper's BAN;
            1: BAN+L). Ignored by 'cwtm', which is a weighted labels' cross-entropy.
        teacher_weight: Weight of the distillation term (1: the paper's; 0 with ``label_weight`` leaves the labels
            alone, the student trained as its teacher was: the null of the diagnostics).
        label_smoothing: Label smoothing of the labels' cross-entropy.
    """
    accepts_soft_targets = True  # every cross-entropy of it takes probabilities (mixup, cutmix)

    def __init__(self, model: BornAgainStudent, teachers: Sequence[str | nn.Module] | str | None = None,
                 variant: str = 'ban', temperature: float = 1.0, label_weight: float = 0.0,
                 teacher_weight: float = 1.0, label_smoothing: float = 0.0):
        if variant not in VARIANTS:
            raise ValueError(f"Unknown born-again variant '{variant}', expected one of {VARIANTS}.")
        check_option('temperature', temperature, float)
        check_option('label_weight', label_weight, float, low=0)
        check_option('teacher_weight', teacher_weight, float, low=0)
        check_range('temperature', temperature, '> 0', gt=0)
        super().__init__(model, teachers, label_smoothing=label_smoothing)
        self.variant = variant
        self.temperature = temperature
        self.label_weight = label_weight
        self.teacher_weight = teacher_weight
        # the student's divergence from its teacher in the first training step (NaN until then), for the diagnostic
        self.register_buffer('initial_kl', torch.tensor(float('nan')))

    @torch.no_grad()
    def teacher_probs(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The teachers' averaged probabilities at ``temperature``."""
        probs = [F.softmax(t(x).float() / temperature, dim=-1) for t in self.on_device(x)]
        return torch.stack(probs).mean(0)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> TaskOutput:
        logits = self.model(x)
        components, stats = {}, {}
        if self.variant == 'cwtm':
            teacher = self.teacher_probs(x)
            confidence = teacher.max(-1).values
            weights = confidence / confidence.sum()
            ce = F.cross_entropy(logits.float(), target, reduction='none', label_smoothing=self.label_smoothing)
            term = (weights * ce).sum()
            components['cwtm_ce'] = term.detach()
            loss = self.teacher_weight * term
        else:
            teacher = probs = self.teacher_probs(x, self.temperature)
            if self.variant == 'dkpp':
                probs = permute_dark_knowledge(probs, self.generator)
            term = soft_cross_entropy(logits, probs, self.temperature)
            components['kd'] = term.detach()
            loss = self.teacher_weight * term
            if self.label_weight:
                ce = self.cross_entropy(logits, target)
                loss = loss + self.label_weight * ce
                components['ce'] = ce.detach()
        # KL(teacher || student) at the distillation temperature (1 for cwtm), whatever the variant distils
        T = 1.0 if self.variant == 'cwtm' else self.temperature
        log_t = teacher.clamp_min(1e-12).log()
        kl = (teacher * (log_t - F.log_softmax(logits.detach().float() / T, -1))).sum(-1).mean()
        if self.training:
            if torch.isnan(self.initial_kl):
                self.initial_kl.fill_(float(kl))
            stats['teacher_kl_vs_init'] = kl / self.initial_kl.clamp_min(torch.finfo(torch.float32).tiny)
        stats['teacher_kl'] = kl
        return dict(loss=loss, output=logits.detach(), components=components, stats=stats,
                    mechanism=dict(teacher=self.teacher_weight * term))

    def mechanism(self, train: dict[str, float], val: dict) -> dict[str, dict]:
        """The share of the student's gradient from its teacher's term (0 at ``teacher_weight=0``), and the student's
        divergence from its teacher, KL(teacher || student) on the training batches, over its value for the untrained
        student (1: nothing learnt from the teacher)."""
        return dict(
            share_teacher=dict(value=train.get('share_teacher'), null=0.0,
                               note="share of the student's gradient from the teacher's term"),
            teacher_kl_vs_init=dict(value=train.get('teacher_kl_vs_init'), null=1.0,
                                    note="KL(teacher || student) over the untrained student's (1: nothing learnt)"))


class BornAgainEnsemble(EnsembleModel):
    """BAN ensemble: several generations of born-again students, their probabilities averaged
    (``combine='mean_probs'``). Build it from generation folders with ``create_bane`` or
    ``timm.create_model('bane', generations=[...])``; see ``EnsembleModel`` for the arguments."""
    default_combine = 'mean_probs'


def create_bane(generations: Sequence[str | Path], **kwargs) -> BornAgainEnsemble:
    """A BAN ensemble of trained generations.

    Args:
        generations: Two or more folders written by ``train.py`` (or ``local-dir:`` / ``hf-hub:`` sources) of
            students of one architecture and class count.
        **kwargs: Further ``timm.create_model`` arguments of the ensemble (``combine``, ...).

    Raises:
        ValueError: Fewer than two generations, or generations of different architectures or class counts.
    """
    from ..models.teachers import load_teacher
    if isinstance(generations, (str, Path)) or len(generations) < 2:
        raise ValueError(f'A BAN ensemble needs at least 2 generation folders, got {generations!r}.')
    models = [load_teacher(str(g)) for g in generations]
    archs = {_architecture(g, m) for g, m in zip(generations, models)}
    classes = {m.num_classes for m in models}
    if len(archs) != 1 or len(classes) != 1:
        raise ValueError(f'The generations of a BAN ensemble must share one architecture and class count; got'
                         f' architectures {sorted(archs)} and class counts {sorted(classes)}.')
    first = models[0]
    num_classes = kwargs.pop('num_classes', first.num_classes)
    if num_classes != first.num_classes:
        raise ValueError(f'The generations predict {first.num_classes} classes; num_classes={num_classes} was asked.')
    from timm.models import get_model_args
    args = {k: v for k, v in get_model_args(first).items() if k != 'num_classes'}
    args.update(kwargs)
    ref = next(first.parameters())
    model = timm.create_model('bane', base_model=archs.pop(), num_members=len(models), num_classes=num_classes,
                              **args).to(ref.device)
    for member, trained in zip(model.members, models):
        member.load_state_dict(trained.state_dict())
    # the preprocessing the generations were trained and saved with, not the base architecture's default
    from ..models.builder import BASE_CFG_KEYS
    model.pretrained_cfg = dict(model.pretrained_cfg, **{
        k: v for k, v in first.pretrained_cfg.items() if k in BASE_CFG_KEYS and v is not None})
    return model.eval()


def _architecture(source, model: nn.Module) -> str:
    folder = Path(str(source).removeprefix('local-dir:'))
    if (folder / RunFolder.CONFIG).is_file():
        return json.loads((folder / RunFolder.CONFIG).read_text())['architecture']
    return model.pretrained_cfg.get('architecture') or type(model).__name__


def _create_ban(variant: str, pretrained: bool = False, **kwargs) -> BornAgainStudent:
    return create_ensemble(BornAgainStudent, variant, pretrained, **kwargs)


def _create_bane(variant: str, pretrained: bool = False, **kwargs) -> BornAgainEnsemble:
    generations = kwargs.pop('generations', None)
    if generations is not None:
        for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
            kwargs.pop(key, None)
        return create_bane(generations, **kwargs)
    return create_ensemble(BornAgainEnsemble, variant, pretrained, **kwargs)


_PAPER = dict(paper_ids='arXiv:1805.04770', paper_name='Born-Again Neural Networks')
default_cfgs = {}
register_student_variants(__name__, 'ban', _create_ban, 'Born-again student', **_PAPER)
register_ensemble_variants(__name__, 'bane', _create_bane, 'BAN ensemble of born-again generations', bases=(),
                           **_PAPER)
