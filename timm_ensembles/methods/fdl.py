"""FDL ensembles: identical networks trained jointly so that their features differ.

Paper: "Knowledge Diversification in Ensembles of Identical Neural Networks", Das & Dutta Roy, BMVC 2022.
Reference code: github.com/bishshoy/FDL.

N members of one architecture see the same minibatch. Each minimises its cross-entropy; the feature difference
loss L_FDL (mean squared difference of intermediate features, averaged over layers and member pairs) is
*maximised*; the similarity term S = (L_CE^i - L_CE^j)^2 keeps the members' losses close; an ensemble head
(a linear map over the concatenated member logits) is trained on the detached member logits.

Where this implementation departs from the paper and its reference code (``resnet_expt_x3.py``, which steps one SGD
optimiser per term on every batch: member CE at the member lr; S at the member lr and momentum; -L_FDL at a fixed
lr 1e-4, momentum 0.85; the head at lr 1e-2), and why. This list is the one place these departures are written down;
the documentation (docs/methods/fdl.md) renders it.

* **One loss, one backward pass per step.** The terms are summed: ``sum_m CE_m + S - w L_FDL + CE_head``. S has
  weight 1 (the reference steps it at the members' lr and momentum, and SGD momentum is linear in the gradient, so
  the sum equals the two optimisers). The head trains in a parameter group of its own at ``head_lr`` (1e-2, as the
  reference), its loss weight 1. ``w`` gives -L_FDL the steady-state step ``fdl_lr / (1 - fdl_momentum)`` of the
  reference's separate optimiser relative to the members' ``lr / (1 - momentum)`` *at the schedule's start*, and then
  stays fixed, so the printed loss is the objective and stays on the scale of its terms. Remaining differences:
  gradients of all terms at the same weights (the reference re-runs the forward pass after each step), weight decay
  once per step, shared momentum.
* **S cannot turn a member against its own cross-entropy.** The paper's S = (L_i - L_j)^2 has a gradient that grows
  with the gap; once ``2 w_S |L_i - L_j| > 1`` it outweighs the better member's own cross-entropy, which that member
  then ascends, widening the gap: on a base without normalisation at a common learning rate (the paper's one-layer
  MNIST network, lr 0.1, step schedule) both losses ran to 1e19 within tens of updates of the joint phase, with or
  without -L_FDL (measured). S is quadratic up to ``|L_i - L_j| = 0.1 / w_S`` and linear beyond (same value and
  gradient below that gap, ``losses.loss_similarity``), so that S changes a member's step by at most 20 % (bounded at
  ``1 / (2 w_S)``, where the better member's step can fall to 0 and the worse one's double, the pair at lr 0.1 still
  lost a member); in a run that trains well the gap stays inside (S about 1e-3 on the studies' recipe) and S is the
  paper's. The logged ``similarity`` is the bounded value, the one in the loss.
* **Every term follows the schedule.** The reference never schedules its -L_FDL and head optimisers while the members'
  lr decays, so late in its training -L_FDL dominates (the paper's plot shows L_FDL rising after epoch 200). Here the
  schedule anneals the head's group and -L_FDL's step with the members': the objective is the same function wherever
  an annealing schedule happens to be. (An earlier version coupled ``w`` and the head's weight to the *current* lr:
  they grew a thousandfold as a cosine schedule annealed, and the main job's loss climbed to 134.)
* **A bounded distance where the paper's can run away** (``fdl_distance``). The paper's mean squared difference grows
  without bound with the scale of the features; on a base without normalisation (the paper's own one-layer MNIST
  network) -L_FDL then pushes the features apart by inflating them (tested: at ``fdl_weight=1`` a BatchNorm-free
  pair's 'mse' distance grows 80-fold in one epoch, and the members lose 1-3 points; 'relative' stays below 1.4 and
  costs nothing). (An earlier note said such a pair collapses to chance: that was the unbounded similarity term,
  below.)
  'relative' (the default) divides each layer's term by the members' feature energy (scale-free, at most
  N / (N - 1); see ``losses.feature_difference_loss``): the members are pushed apart in direction, not magnitude.
* **Features before the activation, at a step where the term acts** (``feature_taps='preact'``, ``fdl_lr=0.03``;
  the reference steps -L_FDL at 1e-4 on the outputs of its convolutions, which precede their normalisation and
  activation). The default taps are the stage outputs of timm's ``forward_intermediates`` (blocks for ViTs), each
  taken before the activation module that produced it (``strategies.stage_features``), or the convolutions for a model
  without ``forward_intermediates``. After a ReLU the features are non-negative, so two members' can be at most
  orthogonal: the scale-free distance cannot pass 1, 1.43 times an independent pair's 0.70 on the studies' recipe.
  Before it they can point opposite ways (up to 2). Measured on that recipe (Fashion-MNIST, a narrow resnet10t pair,
  20 epochs; distances on 2,000 test images):

  - at the reference's step the members' features ended as far apart as an independent pair's (the term's share of
    the members' gradient about 1e-4; studies/runs/fmnist-sweep, seed 0);
  - on the stage outputs after the activation (``feature_taps='stages'``, the default before), the features separate
    as the step grows: 0.85 (x1.21) at 1e-2, 0.99 (x1.41) at 1e-1, 1.00 at 3e-1, the ceiling; the members' accuracy
    moves by +0.09, -0.21 and -0.28 (seed 0). Read before the activation, those x1.41 runs are 1.37-1.41 against the
    pair's 0.97-1.02 (x1.37-1.42, seeds 0-4 of the study ``mechanisms``; ``studies/feature_distance.py``);
  - trained on the features before the activation (pilots without the stem's tap, seeds 0-2), at 0.03 the members'
    distance there ends at 1.66-1.69 against the pair's 0.97-1.00, the members within 0.14 points of the pair's
    (-0.02, -0.14, -0.03); at 0.1 it ends at 1.76 (seed 0) with the members 0.38 below. At 0.03, the default, the
    study ``fdl-preact`` (five seeds, every tap) ends it 1.81 ± 0.03 times the pair's (1.77-1.85), the members
    -0.04 ± 0.17 points from the pair's (95 % CI -0.25 to +0.18).

  On every setting the members' disagreement does not rise with their feature distance (at the default 5.39 ± 0.23 %
  of the test images against the pair's 5.65 ± 0.15 %), nor does the ensemble's accuracy (-0.08 ± 0.15 by averaged
  probabilities, 95 % CI -0.26 to +0.10; docs/results.md): the features part, the predictions do not. The paper's
  'mse' distance reaches x1.9 at 3e-3 on the post-activation taps with the members level, but by growing the features
  (scale-free x1.09). A stage that ends in something other than an activation module (pooling after a functional
  ReLU, as in studies/convnet.py's networks) is taken by 'preact' as it is, at 0.03: ``feature_taps='stages'`` gives
  the step measured on post-activation features. With ``feature_taps='convs'`` the default step stays the reference's
  1e-4, where the term does not act (2e-4 of the gradient): a convolution's output precedes its normalisation, whose
  weight can take either sign, so maps pushed to opposite signs need not change what a member computes; on the
  paper's one-layer MNIST network (no normalisation) a member whose map goes negative everywhere dies behind its
  ReLU. Measured on that network with one filter a member (lr 0.1, step schedule): the second member fell to chance
  as the joint phase began at 0.1 and at 1e-3 (one torch thread), not at 0.01 (two threads) or 1e-4; a one-filter pair
  on the digits lost a member at 0.01 and kept both at 1e-3. A step that acts there is the user's choice
  (``--task-kwargs fdl_lr=...``), to be watched in ``member_acc``.
* **Features** come from the same forward pass as the logits (the reference runs two); ``feature_taps='convs'`` takes
  the outputs of the convolutions the reference takes (its rule: every traced node named "conv", which leaves out the
  shortcut projections, named ``downsample``; see ``tapped_convs``).
* **The head** is trained on the detached logits of the training pass (members in train mode) from the first epoch
  (it cannot affect the members, and training it in every step keeps every parameter used, which DDP needs); the
  reference runs a separate pass with the members in eval mode from the joint phase on: ``head_input='eval'``. It
  starts as the average of the member logits (the reference initialises it randomly), so ``forward`` is meaningful
  before the head is trained. ``forward`` returns the head, unless the run validates on held-out data
  (``train.py --holdout N``): then the end of training keeps whichever of the head and the averaged probabilities
  is more accurate there (``select_on_validation``), never choosing on the test set. (Trained on the members'
  training logits, the head can trail the plain average on new data.)
* **Phases**: the first ``member_warmup_epochs`` (1, as the reference) train each member on its cross-entropy alone;
  then the joint phase adds S and -L_FDL. The reference restarts its lr schedule for the joint phase; here one
  schedule spans the run (its member schedule ``1e-5 + 0.1 exp(-0.03 epoch)`` is close to ``--sched step
  --decay-epochs 1 --decay-rate 0.97 --lr 0.1``). For N > 2, S uses one random member pair per step, as the
  reference; L_FDL averages all pairs.
* An adaptive optimiser (Adam, ...) rescales every gradient, so the reference's step sizes mean nothing there: it needs
  ``fdl_weight`` (and a ``head_lr`` of its scale), refused otherwise when the optimiser is built.
* Accuracy is reported at the final epoch; the reference reports the best test accuracy over epochs. With
  ``pretrained_base=True`` the members start identical (but for re-initialised classifiers), where L_FDL and its
  gradient are zero; the paper's members are independently initialised.

Registered names: ``fdl`` (``base_model=``, ``num_members=``) and ``fdl_<base>x<N>``.
"""
import math
from collections.abc import Sequence

import torch

from ..losses import FEATURE_DISTANCES, feature_difference_loss, loss_similarity, member_cross_entropy
from ..models.builder import create_ensemble, register_ensemble_variants
from ..models.ensemble import DEFAULT_FEATURE_TAPS, FEATURE_TAPS, EnsembleModel, tapped_convs
from ..models.registry import register_task
from ..task import Task, TaskOutput
from ..utils.checks import check_option, check_range

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
        feature_taps: 'preact' (the stage outputs of timm's ``forward_intermediates``, each before the activation
            that closes its stage), 'stages' (those outputs as they are) or 'convs' (the outputs of the convolutions
            the reference taps, see ``tapped_convs``); default: 'preact' where the base has
            ``forward_intermediates`` (every timm model), else 'convs' (a model of the user's own).
        feature_indices: Which stages with ``feature_taps='preact'`` or ``'stages'`` (``forward_intermediates``'
            ``indices``); None for all.
        fdl_distance: 'relative' (default: scale-free and bounded, see ``feature_difference_loss``) or 'mse' (the
            paper's, which the features can raise without bound by growing).
        member_warmup_epochs: Epochs of phase 0, where each member trains on its cross-entropy alone.
        fdl_lr: The learning rate of the -L_FDL step, at the schedule's start (default: 0.03 with the 'preact' taps,
            0.1 with 'stages', 1e-4 with 'convs', measured above; the reference's is 1e-4 for CIFAR-10, 1e-5 for
            CIFAR-100); the term's step follows the members' schedule from there.
        fdl_momentum: The reference's momentum of the -L_FDL step.
        fdl_weight: A fixed weight for -L_FDL instead of the one ``fdl_lr`` gives (needed with adaptive optimisers).
        similarity_weight: Weight of S (1: the reference steps S at the members' learning rate and momentum).
        head_lr: Learning rate of the ensemble head's own parameter group (the reference's 1e-2), at the schedule's
            start; the schedule anneals it like the members'.
        head_momentum: Momentum of the head's group (default: the optimizer's).
        head_input: 'train' (detached logits of the training pass) or 'eval' (a separate pass, members in eval
            mode, as the reference; one more forward pass per step).
        label_smoothing: Label smoothing of the cross-entropies.
    """
    accepts_soft_targets = True  # every cross-entropy of it takes probabilities (mixup, cutmix)

    def __init__(
            self,
            model: EnsembleModel,
            feature_taps: str | None = None,
            feature_indices: int | Sequence[int] | None = None,
            fdl_distance: str = 'relative',
            member_warmup_epochs: int = 1,
            fdl_lr: float | None = None,
            fdl_momentum: float = 0.85,
            fdl_weight: float | None = None,
            similarity_weight: float = 1.0,
            head_lr: float = 1e-2,
            head_momentum: float | None = None,
            head_input: str = 'train',
            label_smoothing: float = 0.0,
    ):
        super().__init__(model, label_smoothing=label_smoothing)
        if not isinstance(model, EnsembleModel):
            raise TypeError(f'FDLTask trains an ensemble of this package, got {type(model).__name__}.')
        member = model.members[0]
        if feature_taps is None:
            feature_taps = DEFAULT_FEATURE_TAPS if hasattr(member, 'forward_intermediates') else 'convs'
        if feature_taps not in FEATURE_TAPS:
            raise ValueError(f"Unknown feature_taps '{feature_taps}', expected one of {FEATURE_TAPS}.")
        if fdl_distance not in FEATURE_DISTANCES:
            raise ValueError(f"Unknown fdl_distance '{fdl_distance}', expected one of {FEATURE_DISTANCES}.")
        if head_input not in ('train', 'eval'):
            raise ValueError(f"Unknown head_input '{head_input}', expected 'train' or 'eval'.")
        check_option('member_warmup_epochs', member_warmup_epochs, int, low=0)
        if fdl_lr is not None:
            check_option('fdl_lr', fdl_lr, float, low=0)
        check_option('head_lr', head_lr, float, low=0)
        check_option('similarity_weight', similarity_weight, float, low=0)
        if fdl_weight is not None:
            check_option('fdl_weight', fdl_weight, float, low=0)
        for name, m in (('fdl_momentum', fdl_momentum), ('head_momentum', head_momentum)):
            if m is not None:
                check_option(name, m, float, low=0)
                check_range(name, m, 'in [0, 1)', lt=1)
        if feature_taps in ('preact', 'stages') and not hasattr(member, 'forward_intermediates'):
            raise ValueError(f"Base model '{model.base_model}' has no forward_intermediates() to tap its stages:"
                             f" use --task-kwargs feature_taps=convs.")
        if feature_taps == 'convs' and not tapped_convs(member):
            raise ValueError(f"Base model '{model.base_model}' has no convolutions to tap: use --task-kwargs"
                             f" feature_taps=stages.")
        self.feature_taps = feature_taps
        self.feature_indices = feature_indices
        self.fdl_distance = fdl_distance
        self.member_warmup_epochs = member_warmup_epochs
        self.fdl_lr = fdl_lr if fdl_lr is not None else _DEFAULT_FDL_LR[feature_taps]
        self.fdl_momentum = fdl_momentum
        self.fdl_weight = fdl_weight
        self.similarity_weight = similarity_weight
        self.head_lr = head_lr
        self.head_momentum = head_momentum
        self.head_input = head_input
        self._coupled_fdl_weight: float | None = None
        # the members' validation feature distance at the end of phase 0 (NaN until then), for the diagnostic
        self.register_buffer('phase0_distance', torch.tensor(float('nan'), dtype=torch.float64))
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

    def param_groups(self, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
        """The members' groups, and the ensemble head's own group at ``head_lr`` (its loss has weight 1)."""
        head = self.model.head.fc
        if head is None:
            return super().param_groups(weight_decay, layer_decay)
        head_ids = {id(p) for p in head.parameters()}
        extra = dict(lr=self.head_lr, **({} if self.head_momentum is None else dict(momentum=self.head_momentum)))
        groups = []
        for g in super().param_groups(weight_decay, layer_decay):
            members = [p for p in g['params'] if id(p) not in head_ids]
            ours = [p for p in g['params'] if id(p) in head_ids]
            if members:
                groups.append(dict(g, params=members))
            if ours:
                groups.append(dict(g, params=ours, **extra))
        return groups

    def create_optimizer(self, opt: str = 'sgd', lr: float = 0.1, weight_decay: float = 0.0, **kwargs):
        """The optimizer of the members and the head (see ``Task.create_optimizer``), and the -L_FDL weight.

        The weight gives -L_FDL the reference's steady-state SGD step ``fdl_lr / (1 - fdl_momentum)`` relative to the
        members' ``lr / (1 - momentum)`` at the schedule's start, and stays fixed: the term's step then anneals with
        the schedule, as every other term's does, wherever the schedule is.

        Raises:
            ValueError: An optimizer without momentum buffers (an adaptive one) and no ``fdl_weight``.
        """
        optimizer = super().create_optimizer(opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)
        if self.fdl_weight is None:
            group = optimizer.param_groups[0]
            if 'momentum' not in group:
                raise ValueError(
                    f'FDLTask\'s default -L_FDL weight reproduces the reference\'s SGD step, which has no meaning for'
                    f' {type(optimizer).__name__} (an adaptive optimiser rescales every gradient): pass a fixed'
                    f' weight, e.g. --task-kwargs fdl_weight=1e-3 (and head_lr=<the head\'s lr>), or use --opt sgd.')
            effective_lr = max(lr, 1e-12) / (1.0 - (group['momentum'] or 0.0))
            self._coupled_fdl_weight = self.fdl_lr / (1.0 - self.fdl_momentum) / effective_lr
        return optimizer

    @property
    def fdl_term_weight(self) -> float:
        """The weight of -L_FDL in the loss: ``fdl_weight``, or the one ``create_optimizer`` derived from ``fdl_lr``."""
        if self.fdl_weight is not None:
            return self.fdl_weight
        if self._coupled_fdl_weight is None:
            raise RuntimeError(
                'FDLTask sets its -L_FDL weight from the optimizer\'s learning rate: build the optimizer with'
                ' task.create_optimizer(...), or pass a fixed fdl_weight=...')
        return self._coupled_fdl_weight

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> TaskOutput:
        model = self.model
        joint = self.phase == 'joint'
        mechanism = {}
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
            # bounded where the paper's S would turn a member against its own cross-entropy (see loss_similarity)
            bound = 0.1 / self.similarity_weight if self.similarity_weight > 0 else None
            similarity = loss_similarity(ce[i], ce[j], bound)
            fdl = feature_difference_loss(features, self.fdl_distance)
            fdl_weight = self.fdl_term_weight
            loss = loss + self.similarity_weight * similarity - fdl_weight * fdl
            components.update(similarity=similarity.detach(), fdl=fdl.detach())
            stats['fdl_weight'] = fdl_weight
            mechanism = dict(fdl=-fdl_weight * fdl, similarity=self.similarity_weight * similarity)
        output = model.combine(logits.detach())
        if model.head.fc is not None:
            head_logits = output if self.head_input == 'train' else model.combine(self._eval_member_logits(x))
            head_ce = self.cross_entropy(head_logits, target)
            # weight 1: the head's step size is its parameter group's learning rate
            loss = loss + head_ce
            components['head_ce'] = head_ce.detach()
        return dict(loss=loss, output=output, components=components, stats=stats, mechanism=mechanism)

    def mechanism(self, train: dict[str, float], val: dict) -> dict[str, dict]:
        """The share of the members' gradient from -L_FDL (0 when its weight is 0, and in phase 0), and the members'
        scale-free validation feature distance (``feature_distance_rel``, which features cannot raise by growing)
        over its value at the end of phase 0 (1: no change since the members trained alone; an independent ensemble
        drifts too, so compare with the same run of ``ens_``)."""
        out = dict(share_fdl=dict(value=train.get('share_fdl', 0.0 if self.phase == 'warmup' else None), null=0.0,
                                  note="share of the members' gradient from -L_FDL"))
        distance = val.get('feature_distance_rel')
        note = "validation feature distance (scale-free) over its value at the end of phase 0 (1: unchanged)"
        if distance is None:
            value, note = None, f'the evaluation measured no feature distance for {type(self.model).__name__}'
        elif self.member_warmup_epochs == 0:
            value, note = None, 'no phase 0 to compare with (member_warmup_epochs=0)'
        else:
            if self.epoch == self.member_warmup_epochs - 1:
                self.phase0_distance.fill_(float(distance))
            start = float(self.phase0_distance)
            value = None if math.isnan(start) or start == 0 else distance / start
            if value is None:
                note = 'phase 0 ended before this run recorded its feature distance'
        out['feature_distance_vs_phase0'] = dict(value=value, null=1.0, note=note)
        return out

    def select_on_validation(self, metrics: dict) -> str | None:
        """``forward`` becomes the averaged probabilities when they are more accurate than the trained head on
        held-out validation data (``acc`` is the head's, ``mean_probs_acc`` the average's); the head stays otherwise."""
        model = self.model
        if model.combine_mode != 'linear' or 'mean_probs_acc' not in metrics:
            return None
        head, average = metrics['acc'], metrics['mean_probs_acc']
        if average > head:
            model.set_combine('mean_probs')
            return (f'forward: the averaged probabilities ({average:.2f} %) instead of the ensemble head'
                    f' ({head:.2f} %), more accurate on the validation data')
        return f'forward: the ensemble head ({head:.2f} %), at least as accurate as the averaged probabilities' \
               f' ({average:.2f} %) on the validation data'

    @torch.no_grad()
    def _eval_member_logits(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model.forward_members(x)
        finally:
            self.model.train(was_training)


# the -L_FDL step by taps, measured (see the module docstring)
_DEFAULT_FDL_LR = dict(preact=0.03, stages=0.1, convs=1e-4)


def _create_fdl(variant: str, pretrained: bool = False, **kwargs) -> FDLEnsemble:
    return create_ensemble(FDLEnsemble, variant, pretrained, **kwargs)


default_cfgs = {}
register_ensemble_variants(
    __name__, 'fdl', _create_fdl, 'FDL ensemble',
    paper_name='Knowledge Diversification in Ensembles of Identical Neural Networks (BMVC 2022)')
