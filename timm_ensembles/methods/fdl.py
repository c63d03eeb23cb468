"""FDL ensembles: identical networks trained jointly so that their features differ.

Paper: "Knowledge Diversification in Ensembles of Identical Neural Networks", Das & Dutta Roy, BMVC 2022.
Reference code: github.com/bishshoy/FDL.

N members of one architecture see the same minibatch. Each minimises its cross-entropy; the feature difference
loss L_FDL (mean squared difference of intermediate features, averaged over layers and member pairs) is
*maximised*; the similarity term S = (L_CE^i - L_CE^j)^2 keeps the members' losses close; an ensemble head
(a linear map over the concatenated member logits) is trained on the detached member logits.

How this implementation relates to the reference code (``resnet_expt_x3.py``), which steps one SGD optimiser per
term on every batch (member CE at the member learning rate; S with its own SGD at the member learning rate and
momentum; -L_FDL with SGD at a fixed lr 1e-4, momentum 0.85, never scheduled; the head with SGD lr 1e-2):

* One forward and one backward pass per step instead of five forward passes, the terms summed with weights that
  reproduce the reference's step sizes: S has weight 1 (same lr and momentum as the members, and SGD momentum is
  linear in the gradient, so the sum equals the two optimisers); -L_FDL has weight
  ``(fdl_lr / (1 - fdl_momentum)) / (lr / (1 - momentum))`` with the optimiser's *current* lr and momentum, so
  its steady-state step is the reference's fixed ``fdl_lr`` step whatever the schedule does to the members' lr;
  the head's loss has weight ``(head_lr / (1 - head_momentum)) / (lr / (1 - momentum))`` likewise. The tiny FDL
  step is what keeps the unbounded -L_FDL term stable. An adaptive optimiser (Adam, ...) rescales every gradient, so
  there the weights must be given (``fdl_weight``, ``head_weight``); they fix the weights with SGD too.
* Differences that remain: gradients of all terms are taken at the same weights (the reference re-runs the
  forward pass after each step); weight decay is applied once per step (the reference applies it in each of
  its optimisers); momentum buffers are shared, matched in steady state but not transiently.
* Features are taken in the same forward pass as the logits (the reference runs a second pass). By default they
  are the stage outputs of timm's ``forward_intermediates`` (``feature_taps='stages'``); the paper's choice,
  the output of every convolution, is ``feature_taps='convs'``.
* The head is trained on the detached logits of the training forward pass (members in train mode); the reference
  runs a separate pass with the members in eval mode, available as ``head_input='eval'`` (one more forward pass).
  The head is trained from the first epoch (it cannot affect the members, and training it in every step keeps
  every parameter used, which DDP needs); the reference starts it with the joint phase.
* Phases: the first ``member_warmup_epochs`` (1, as the reference) train each member on its cross-entropy
  alone; then the joint phase adds S and -L_FDL. The reference restarts its lr schedule for the joint phase; here one
  schedule spans the run. For N > 2, S uses one random member pair per step, as the reference; L_FDL averages
  all pairs.
* The head starts as the average of the member logits (the reference initialises it randomly), so ``forward``
  is meaningful before the head is trained.

Registered names: ``fdl`` (``base_model=``, ``num_members=``) and ``fdl_<base>x<N>``.
"""
from collections.abc import Sequence

import torch

from .._builder import create_ensemble, register_ensemble_variants
from .._ensemble import FEATURE_TAPS, EnsembleModel
from .._registry import register_task
from .._task import Task, TaskOutput
from ..losses import feature_difference_loss, loss_similarity, member_cross_entropy

__all__ = ['FDLEnsemble', 'FDLTask']


class FDLEnsemble(EnsembleModel):
    """FDL ensemble; ``forward`` is its ensemble head (``combine='linear'``), the average of the member logits
    until the head is trained.

    See ``EnsembleModel`` for the arguments.
    """
    default_combine = 'linear'


@register_task(FDLEnsemble)
class FDLTask(Task):
    """The FDL objective and its phases.

    Args:
        model: An ``FDLEnsemble`` (any ``EnsembleModel`` works).
        feature_taps: 'stages' (timm's ``forward_intermediates``, default) or 'convs' (every convolution output,
            as the paper).
        feature_indices: Which stages with ``feature_taps='stages'`` (``forward_intermediates``' ``indices``);
            None for all.
        member_warmup_epochs: Epochs of phase 0, where each member trains on its cross-entropy alone.
        fdl_lr: The reference's fixed learning rate of the -L_FDL step (1e-4 for CIFAR-10, 1e-5 for CIFAR-100).
        fdl_momentum: The reference's momentum of the -L_FDL step.
        fdl_weight: A fixed weight for -L_FDL instead of the learning-rate coupling above.
        head_weight: A fixed weight for the head's cross-entropy instead of the learning-rate coupling.
        similarity_weight: Weight of S (1: the reference steps S at the members' learning rate and momentum).
        head_lr: The reference's learning rate of the ensemble head.
        head_momentum: The reference's momentum of the ensemble head.
        head_input: 'train' (detached logits of the training pass) or 'eval' (a separate pass, members in eval
            mode, as the reference).
        label_smoothing: Label smoothing of the cross-entropies.
    """

    def __init__(
            self,
            model: EnsembleModel,
            feature_taps: str = 'stages',
            feature_indices: int | Sequence[int] | None = None,
            member_warmup_epochs: int = 1,
            fdl_lr: float = 1e-4,
            fdl_momentum: float = 0.85,
            fdl_weight: float | None = None,
            head_weight: float | None = None,
            similarity_weight: float = 1.0,
            head_lr: float = 1e-2,
            head_momentum: float = 0.9,
            head_input: str = 'train',
            label_smoothing: float = 0.0,
    ):
        super().__init__(model, label_smoothing=label_smoothing)
        if not isinstance(model, EnsembleModel):
            raise TypeError(f'FDLTask trains an ensemble of this package, got {type(model).__name__}.')
        if feature_taps not in FEATURE_TAPS:
            raise ValueError(f"Unknown feature_taps '{feature_taps}', expected one of {FEATURE_TAPS}.")
        if head_input not in ('train', 'eval'):
            raise ValueError(f"Unknown head_input '{head_input}', expected 'train' or 'eval'.")
        if member_warmup_epochs < 0:
            raise ValueError(f'member_warmup_epochs must be >= 0, got {member_warmup_epochs}.')
        for name, m in (('fdl_momentum', fdl_momentum), ('head_momentum', head_momentum)):
            if not 0 <= m < 1:
                raise ValueError(f'{name} must be in [0, 1), got {m}.')
        self.feature_taps = feature_taps
        self.feature_indices = feature_indices
        self.member_warmup_epochs = member_warmup_epochs
        self.fdl_lr = fdl_lr
        self.fdl_momentum = fdl_momentum
        self.fdl_weight = fdl_weight
        self.head_weight = head_weight
        self.similarity_weight = similarity_weight
        self.head_lr = head_lr
        self.head_momentum = head_momentum
        self.head_input = head_input
        # The S pair is drawn from a generator of the task's own, seeded from the global RNG at construction
        # (which train.py seeds alike on every process) and reseeded each epoch: every DDP process then takes
        # the same pair in every step, and a resumed run the same pairs as an uninterrupted one.
        self._pair_seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        self._pair_generator = torch.Generator().manual_seed(self._pair_seed)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self._pair_generator.manual_seed(self._pair_seed + epoch)

    @property
    def phase(self) -> str:
        return 'warmup' if self.epoch < self.member_warmup_epochs else 'joint'

    def _step_ratio(self, term_lr: float, term_momentum: float) -> float:
        """Weight that makes a term's steady-state SGD step ``term_lr / (1 - term_momentum)``."""
        if self.optimizer is None:
            raise RuntimeError(
                'FDLTask sets its term weights from the optimizer\'s learning rate: build the optimizer with'
                ' task.create_optimizer(...), or pass fixed weights (fdl_weight=..., head_weight=...).'
            )
        group = self.optimizer.param_groups[0]
        if 'momentum' not in group:
            raise RuntimeError(
                f'FDLTask\'s default term weights reproduce the reference\'s SGD steps, which have no meaning for'
                f' {type(self.optimizer).__name__} (an adaptive optimiser rescales every gradient): pass fixed'
                f' weights, e.g. --task-kwargs fdl_weight=1e-3 head_weight=1.0, or use --opt sgd / momentum.'
            )
        momentum = group['momentum'] or 0.0
        effective_lr = max(group['lr'], 1e-12) / (1.0 - momentum)
        return term_lr / (1.0 - term_momentum) / effective_lr

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> TaskOutput:
        model = self.model
        joint = self.phase == 'joint'
        if joint:
            logits, features = model.forward_members_with_features(x, self.feature_taps, self.feature_indices)
        else:
            logits = model.forward_members(x)
        ce = member_cross_entropy(logits, target, self.label_smoothing)
        loss = ce.sum()
        components = dict(ce=ce.detach().mean())
        stats = {}
        if joint:
            # S on one random member pair per step, as the reference does for N > 2
            i, j = (0, 1) if model.num_members == 2 else torch.randperm(
                model.num_members, generator=self._pair_generator)[:2].tolist()
            similarity = loss_similarity(ce[i], ce[j])
            fdl = feature_difference_loss(features)
            fdl_weight = self.fdl_weight if self.fdl_weight is not None else self._step_ratio(
                self.fdl_lr, self.fdl_momentum)
            loss = loss + self.similarity_weight * similarity - fdl_weight * fdl
            components.update(similarity=similarity.detach(), fdl=fdl.detach())
            stats['fdl_weight'] = fdl_weight
        output = model.combine(logits.detach())
        if model.head.fc is not None:
            head_logits = output if self.head_input == 'train' else model.combine(self._eval_member_logits(x))
            head_ce = self.cross_entropy(head_logits, target)
            head_weight = self.head_weight if self.head_weight is not None else self._step_ratio(
                self.head_lr, self.head_momentum)
            loss = loss + head_weight * head_ce
            components['head_ce'] = head_ce.detach()
        return dict(loss=loss, output=output, components=components, stats=stats)

    @torch.no_grad()
    def _eval_member_logits(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model.forward_members(x)
        finally:
            self.model.train(was_training)


def _create_fdl(variant: str, pretrained: bool = False, **kwargs) -> FDLEnsemble:
    return create_ensemble(FDLEnsemble, variant, pretrained, **kwargs)


default_cfgs = {}
register_ensemble_variants(
    __name__, 'fdl', _create_fdl, 'FDL ensemble',
    paper_name='Knowledge Diversification in Ensembles of Identical Neural Networks (BMVC 2022)')
