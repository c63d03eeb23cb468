"""MEAL: one student learning a zoo of frozen teachers through block-wise similarity and discriminators.

Papers: "MEAL: Multi-Model Ensemble via Adversarial Learning", Shen, He, Xue, AAAI 2019 (arXiv:1812.02425; reference
code AaronHeee/MEAL) and "MEAL V2", Shen & Savvides (arXiv:2009.08453; reference code szq0214/MEAL-V2).

``version='v1'``: every step picks one teacher at random. At several blocks (the last ``num_blocks`` stages of
timm's ``forward_intermediates``, plus the logits) the student's and the teacher's outputs are aligned to one
length by adaptive pooling, so that different architectures compare, and a distance (``'ce'``: cross-entropy between
the softmaxes, the reference's default; ``'kl'``, ``'l1'``, ``'l2'``) is summed over blocks with per-block weights.
One discriminator per block (an MLP, ``L -> L/2 -> L/4 -> 1``) learns to tell teacher from student outputs.

``version='v2'``: final outputs only; the target is the teachers' averaged probabilities; one discriminator on the
log-probabilities (``C -> C/8 -> C/64 -> 1``, at least 8 and 4 wide); no hard labels; start the student from pretrained
weights (``pretrained_base=True``) and train as the paper (no weight decay, small learning rate).

The adversarial game (``adversarial='game'``, default): the discriminators minimise their binary cross-entropy
(teacher 1, student 0) on the student's outputs taken as fixed; the student minimises the non-saturating generator
loss, the binary cross-entropy of the same discriminators (their weights taken as fixed) calling its outputs the
teacher's, in the same backward pass. ``adversarial='joint'`` is the reference codes' behaviour, where the
discriminator loss is simply added and minimised by the student too (documented there as adversarial, but the
student then helps the discriminators); ``'none'`` drops the discriminators.

Why the discriminators see what they see, and the blocks are compared as they are (measured here: with the raw
inputs of an earlier version, every discriminator sat at chance and every block term at ln(width) in every run):

* A discriminator of the **probabilities** cannot tell a near-uniform student from a confident teacher with its
  linear part: both vectors sum to 1, and a teacher whose top class varies from image to image has the same mean
  vector as a uniform student. It sees **log-probabilities** instead (the log-softmax of the logits at the distance's
  temperature), where confidence is linear (their mean is minus the cross-entropy against the uniform distribution).
* The aligned vectors of the **intermediate blocks** (pooled post-activation means, each entry near the others) gave
  near-uniform softmaxes, so the 'ce' distance sat at its floor, the teacher's entropy (about ln(width)), with next to
  no gradient. Each aligned vector is **standardised per sample** (zero mean, unit variance over its entries) before
  the distance and the discriminator: the comparison is of the pattern of a block's activations, whatever their
  scale, and the softmax of a standardised vector is far from uniform.
* With the reference's minimax form (the student ascends the discriminators' loss through a gradient reversal), a
  discriminator that wins leaves the student without gradient (the saturating generator loss of Goodfellow et al.
  2014); the **non-saturating** loss keeps it.
* The discriminators train at the student's learning rate (``disc_lr_scale=1``, the V1 reference's default
  ``--d_lr 0.1`` with ``--lr 0.1``; its VGG script's 1e-3 left them at chance here).

Each discriminator's accuracy at telling the teacher's outputs from the student's (the fraction of the batch's
(teacher, student) pairs it scores in the right order, its AUC: 0.5 is chance) is a training statistic
(``disc_acc<k>``), beside each block term's ratio to its value for the untrained student (``sim<k>_vs_init``, 1
while nothing is learnt) and the gap between the student's and the teacher's predictive entropy (``entropy_gap``,
what the discriminator of the outputs can see); ``share_blocks`` and ``share_adv`` are the shares of the student's
gradient from the block terms and the adversarial term (see ``Task.mechanism``).

Departures: intermediate blocks are aligned over channels (global average pooling, then adaptive pooling of the
channel vector to the student's channel count), where the V1 reference pools the flattened spatial map and averages
the channels: at the small input sizes this package trains on, the last stages are 1x1 maps whose channel average
is one number (``align_mode='spatial'`` gives the reference's alignment, to the student's channel count instead of
the reference's hand-set ``out_dims``). The channels of two networks correspond only by training, so the channel
form asks the student's channel statistics to follow the teacher's, as a hint without regressor. The aligned vectors
are standardised, and the discriminators see log-probabilities and play the non-saturating game (above). The
discriminators' logits are not passed through a ReLU (the V1 reference's last layer is ReLU'd, which stalls them)
and their hidden activations are LeakyReLU(0.2) (ReLU there). V2's discriminator compares the log of the student's
probabilities with the log of the teachers' averaged ones (the reference feeds it the student's logits and the
teachers' averaged logits, whose shift is arbitrary); V2 ignores ``num_blocks``, ``distance`` and ``align_mode``.
Teachers that are ensembles of this package count as their members in V1 (a zoo), and by their own prediction in
V2. The teachers are kept in eval mode (the V1 reference leaves them in train mode by default).

Registered names: ``meal`` (``base_model=``) and ``meal_<base>``.
"""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..losses import soft_cross_entropy
from ..models.builder import create_ensemble, register_student_variants
from ..models.distill import DistillationTask, StudentModel
from ..models.registry import register_task
from ..task import TaskOutput
from ..utils.checks import check_option, check_range

__all__ = ['MEALStudent', 'MEALTask', 'Discriminator', 'align', 'standardise', 'block_distance']

DISTANCES = ('ce', 'kl', 'l1', 'l2')
ADVERSARIAL = ('game', 'joint', 'none')
# the V1 reference's block weights, last intermediate block first (logits weigh 1)
_V1_BLOCK_WEIGHTS = (0.1, 0.05, 0.01, 0.001)


class MEALStudent(StudentModel):
    """A MEAL student: one timm model (see ``StudentModel``), trained by ``MEALTask``."""


class Discriminator(nn.Module):
    """Teacher-or-student classifier of aligned outputs: an MLP with one logit (teacher = 1).

    Args:
        in_features: Length of the aligned outputs.
        hidden: Widths of the hidden layers.
        spectral_norm: Spectral normalisation of every layer (Miyato et al. 2018): the discriminator stays
            1-Lipschitz, so neither it nor the gradient it gives the student can grow without bound. Without it, at
            the student's learning rate on log-probabilities down to -30, a MEAL V1 discriminator diverged within 30
            updates on the studies' recipe and took the student's logits to 1e9.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], spectral_norm: bool = True):
        super().__init__()
        norm = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda layer: layer)
        layers, width = [], in_features
        for h in hidden:
            layers += [norm(nn.Linear(width, h)), nn.LeakyReLU(0.2)]
            width = h
        layers.append(norm(nn.Linear(width, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float()).squeeze(-1)


def align(feature: torch.Tensor, length: int, mode: str = 'channel') -> torch.Tensor:
    """A block's output ``[B, C, H, W]`` (or ``[B, C]``) as a ``[B, length]`` vector, by adaptive average pooling.

    Args:
        feature: The block's output.
        length: The aligned length.
        mode: 'channel': average over space, then pool the channel vector to ``length``; 'spatial' (the V1
            reference): pool the flattened spatial map of every channel to ``length``, then average the channels.
    """
    f = feature.float()
    if f.ndim == 2:
        return F.adaptive_avg_pool1d(f[:, None], length)[:, 0]
    f = f.flatten(2)  # [B, C, HW]
    if mode == 'channel':
        return F.adaptive_avg_pool1d(f.mean(-1)[:, None], length)[:, 0]
    if mode == 'spatial':
        return F.adaptive_avg_pool1d(f, length).mean(1)
    raise ValueError(f"Unknown alignment '{mode}', expected 'channel' or 'spatial'.")


def standardise(vectors: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """Each row of ``[B, L]`` centred and divided by its spread over its entries: the pattern of a block's aligned
    activations, whatever their scale (rows of one entry become zeros).

    The spread is ``sqrt(var + floor * mean(x^2) + 1e-6)``: unit variance where the entries vary, and no division by
    a vanishing variance where they nearly do not (a block whose channel means have all but converged, or died):
    dividing by the variance alone amplifies the gradient by 1 / std, which ran a MEAL student's weights to infinity
    within 42 updates on the studies' recipe. Scaling a row still changes nothing (both terms scale alike).
    """
    x = vectors.float()
    centred = x - x.mean(-1, keepdim=True)
    if vectors.shape[-1] < 2:
        return centred
    spread = (centred.pow(2).mean(-1, keepdim=True) + floor * x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    return centred / spread


def block_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str, temperature: float = 1.0):
    """Distance between aligned outputs ``[B, L]``, averaged over the batch (the teacher's side is a target)."""
    teacher = teacher.detach().float()
    if distance == 'ce':
        return soft_cross_entropy(student, F.softmax(teacher / temperature, -1), temperature)
    if distance == 'kl':
        return F.kl_div(F.log_softmax(student.float() / temperature, -1), F.log_softmax(teacher / temperature, -1),
                        reduction='batchmean', log_target=True) * temperature ** 2
    if distance == 'l1':
        return F.l1_loss(student.float(), teacher)
    if distance == 'l2':
        return F.mse_loss(student.float(), teacher)
    raise ValueError(f"Unknown distance '{distance}', expected one of {DISTANCES}.")


@register_task(MEALStudent)
class MEALTask(DistillationTask):
    """The MEAL objective (V1 or V2) with its discriminators.

    Args:
        model: A ``MEALStudent``.
        teachers: One or more teachers of any architectures (see ``DistillationTask``).
        version: 'v1' (one random teacher per step, block-wise) or 'v2' (averaged teachers, final outputs).
        num_blocks: V1: how many of the last stages of student and teachers are compared besides the logits
            (default: all the student's, at most the fewest any teacher has; 0: logits only).
        distance: 'ce', 'kl', 'l1' or 'l2' (V2 uses 'kl' on the probabilities whatever this says).
        block_weights: Weight of each block's distance, the logits last (default: the V1 reference's
            0.001, 0.01, 0.05, 0.1 for the intermediate blocks, 1 for the logits).
        adversarial: 'game' (default), 'joint' (the reference codes') or 'none'; see the module docstring.
        adv_weights: Weight of the student's adversarial term at each block (default: the default block weights
            above, 1 for the logits); with ``adversarial='joint'`` the weight of each discriminator's loss
            (the references' eta, 1 each there).
        disc_lr_scale: The discriminators' learning rate as a fraction of the student's (default 1: the V1
            reference's default, and V2's reference optimises them together with the student).
        align_mode: 'channel' (default) or 'spatial' (the V1 reference's); see ``align``.
        temperature: Softmax temperature of the 'ce' / 'kl' distances on the logits.
        label_weight: Weight of the labels' cross-entropy (0, as both references).
        label_smoothing: Label smoothing of that cross-entropy.
    """
    accepts_soft_targets = True  # every cross-entropy of it takes probabilities (mixup, cutmix)

    def __init__(self, model: MEALStudent, teachers: Sequence[str | nn.Module] | str | None = None,
                 version: str = 'v1', num_blocks: int | None = None, distance: str = 'ce',
                 block_weights: Sequence[float] | None = None, adversarial: str = 'game',
                 adv_weights: Sequence[float] | None = None, disc_lr_scale: float = 1.0,
                 align_mode: str = 'channel', temperature: float = 1.0, label_weight: float = 0.0,
                 label_smoothing: float = 0.0):
        if version not in ('v1', 'v2'):
            raise ValueError(f"Unknown MEAL version '{version}', expected 'v1' or 'v2'.")
        if distance not in DISTANCES:
            raise ValueError(f"Unknown distance '{distance}', expected one of {DISTANCES}.")
        if adversarial not in ADVERSARIAL:
            raise ValueError(f"Unknown adversarial mode '{adversarial}', expected one of {ADVERSARIAL}.")
        if align_mode not in ('channel', 'spatial'):
            raise ValueError(f"Unknown align_mode '{align_mode}', expected 'channel' or 'spatial'.")
        check_option('temperature', temperature, float, low=1e-12)
        check_option('label_weight', label_weight, float, low=0)
        check_option('disc_lr_scale', disc_lr_scale, float, low=0)
        if num_blocks is not None:
            check_option('num_blocks', num_blocks, int, low=0)
        super().__init__(model, teachers, label_smoothing=label_smoothing)
        self.version = version
        self.distance = distance if version == 'v1' else 'kl'
        self.adversarial = adversarial
        self.align_mode = align_mode
        self.temperature = temperature
        self.label_weight = label_weight
        self.disc_lr_scale = disc_lr_scale
        student = model.student
        num_classes = model.num_classes
        if version == 'v1':
            max_blocks = self._max_blocks(student)
            num_blocks = max_blocks if num_blocks is None else num_blocks
            check_range('num_blocks', num_blocks, f'in 0..{max_blocks} (the stages the student and every teacher'
                        f' have)', ge=0, le=max_blocks)
            channels = [f['num_chs'] for f in student.feature_info][len(student.feature_info) - num_blocks:]
            self.lengths = channels + [num_classes]
        else:
            num_blocks = 0
            self.lengths = [num_classes]
        self.num_blocks = num_blocks
        n = len(self.lengths)
        # each block term's value in the first training step (NaN until then), for the diagnostic
        self.register_buffer('initial_terms', torch.full((n,), float('nan')))
        default_weights = list(reversed(
            [_V1_BLOCK_WEIGHTS[min(i, len(_V1_BLOCK_WEIGHTS) - 1)] for i in range(n - 1)])) + [1.0]
        self.block_weights = list(block_weights) if block_weights is not None else default_weights
        # the student's adversarial term at each block weighs as that block's similarity term does by default
        self.adv_weights = list(adv_weights) if adv_weights is not None else default_weights
        for name, values in (('block_weights', self.block_weights), ('adv_weights', self.adv_weights)):
            if len(values) != n:
                raise ValueError(f'{name} needs {n} values ({num_blocks} blocks and the logits), got {values}.')
        if adversarial != 'none':
            if version == 'v1':
                hidden = [[max(L // 2, 4), max(L // 4, 2)] for L in self.lengths]
            else:
                hidden = [[max(L // 8, 8), max(L // 64, 4)] for L in self.lengths]
            ref = next(student.parameters())
            self.discriminators = nn.ModuleList([Discriminator(L, h).to(ref.device) for L, h in
                                                 zip(self.lengths, hidden)])
        else:
            self.discriminators = None

    def _teacher_units(self) -> list[tuple[nn.Module, nn.Module]]:
        units = []
        for t in self.__dict__['_teacher_models']:
            members = getattr(t, 'members', None)
            if self.version == 'v1' and isinstance(members, nn.ModuleList):
                units += [(m, t) for m in members]  # an ensemble is a zoo of its members
            else:
                units.append((t, t))
        return units

    def _max_blocks(self, student: nn.Module) -> int:
        counts = [len(getattr(student, 'feature_info', []))]
        for unit, _ in self._teacher_units():
            counts.append(len(getattr(unit, 'feature_info', [])) if hasattr(unit, 'forward_intermediates') else 0)
        return min(counts)

    def param_groups(self, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
        groups = super().param_groups(weight_decay, layer_decay)
        if self.discriminators is None:
            return groups
        disc = {id(p) for p in self.discriminators.parameters()}
        out = []
        for g in groups:
            student = [p for p in g['params'] if id(p) not in disc]
            ours = [p for p in g['params'] if id(p) in disc]
            if student:
                out.append(dict(g, params=student))
            if ours:
                # timm's schedulers multiply a group's lr by its lr_scale
                out.append(dict(g, params=ours, lr_scale=self.disc_lr_scale))
        return out

    def _outputs(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The compared blocks' outputs and the logits."""
        if self.num_blocks == 0:
            return [model(x)]
        final, inter = model.forward_intermediates(x, indices=self.num_blocks)
        return list(inter) + [model.forward_head(final)]

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> TaskOutput:
        teachers = self.on_device(x)
        components, stats = {}, {}
        T = self.temperature
        if self.version == 'v1':
            i = int(torch.randint(len(teachers), (1,), generator=self.generator))
            teacher = teachers[i]
            student_out = self._outputs(self.model.student, x)
            with torch.no_grad():
                teacher_out = self._outputs(teacher.teacher, teacher.adapt(x))
            stats['teacher'] = torch.tensor(float(i))
            last = len(student_out) - 1
            # intermediate blocks aligned to a common length and standardised; the logits compared as they are
            s_vecs = [standardise(align(o, L, self.align_mode)) if k < last else o.float()
                      for k, (o, L) in enumerate(zip(student_out, self.lengths))]
            t_vecs = [standardise(align(o, L, self.align_mode)) if k < last else o.float()
                      for k, (o, L) in enumerate(zip(teacher_out, self.lengths))]
            distances = [block_distance(s, t, self.distance, T if k == last else 1.0)
                         for k, (s, t) in enumerate(zip(s_vecs, t_vecs))]
            logits = student_out[-1]
            teacher_log_probs = F.log_softmax(t_vecs[-1] / T, -1)
            # what the discriminators see: the standardised blocks, and log-probabilities for the logits
            s_disc = s_vecs[:-1] + [F.log_softmax(logits.float() / T, -1)]
            t_disc = t_vecs[:-1] + [teacher_log_probs]
        else:
            logits = self.model(x)
            with torch.no_grad():
                probs = torch.stack([F.softmax(t(x).float() / T, -1) for t in teachers]).mean(0)
            distances = [soft_cross_entropy(logits, probs, T) - _entropy(probs) * T ** 2]  # KL(probs || student)
            teacher_log_probs = probs.clamp_min(1e-12).log()
            s_disc, t_disc = [F.log_softmax(logits.float() / T, -1)], [teacher_log_probs]
        loss = logits.new_zeros((), dtype=torch.float32)
        blocks = logits.new_zeros((), dtype=torch.float32)
        for k, (d, w) in enumerate(zip(distances, self.block_weights)):
            blocks = blocks + w * d
            components[f'sim{k}'] = d.detach()
        loss = loss + blocks
        mechanism = dict(blocks=blocks)
        if self.training:
            stats.update(self._relative_to_start(distances))
        # the student's predictive entropy minus the teacher's: what the discriminator of the outputs can tell apart
        student_log_probs = s_disc[-1].detach()
        stats['entropy_gap'] = (_entropy_of_log_probs(student_log_probs) - _entropy_of_log_probs(teacher_log_probs))
        if self.discriminators is not None:
            d_loss, g_loss, accuracy = self.adversarial_loss(s_disc, t_disc)
            loss = loss + d_loss + g_loss
            components['disc'] = d_loss.detach()
            if self.adversarial == 'game':
                components['adv'] = g_loss.detach()
                mechanism['adv'] = g_loss
            else:
                mechanism['adv'] = d_loss  # the student descends the discriminators' own loss
            stats.update({f'disc_acc{k}': a for k, a in enumerate(accuracy)})
        if self.label_weight:
            ce = self.cross_entropy(logits, target)
            loss = loss + self.label_weight * ce
            components['ce'] = ce.detach()
        return dict(loss=loss, output=logits.detach(), components=components, stats=stats, mechanism=mechanism)

    def _relative_to_start(self, distances: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each block term over its value in the first training step (the untrained student's; kept in the task's
        state, so a resumed run compares with the same start): 1 while the student learns nothing from the block."""
        current = torch.stack([d.detach().float() for d in distances]).to(self.initial_terms.device)
        if torch.isnan(self.initial_terms).all():
            self.initial_terms.copy_(current)
        ratio = current / self.initial_terms.clamp_min(torch.finfo(torch.float32).tiny)
        return {f'sim{k}_vs_init': r for k, r in enumerate(ratio)}

    def adversarial_loss(self, student_vecs: list[torch.Tensor], teacher_vecs: list[torch.Tensor]):
        """The discriminators' binary cross-entropy (teacher 1, student 0) and the student's adversarial loss, each
        summed with ``adv_weights``, and each discriminator's accuracy at ranking a teacher's output above a
        student's (its AUC over the batch's pairs, a tensor; 0.5 is chance).

        ``adversarial='game'``: the discriminators learn from the student's outputs taken as fixed; the student's
        loss is the non-saturating one, the discriminators (weights taken as fixed) calling its outputs the teacher's.
        ``'joint'`` (the references'): the discriminators' loss reaches the student too, and its own loss is 0.

        Returns:
            ``(discriminator loss, student loss, [accuracy per discriminator])``.
        """
        d_total = student_vecs[0].new_zeros((), dtype=torch.float32)
        g_total = student_vecs[0].new_zeros((), dtype=torch.float32)
        accuracy = []
        game = self.adversarial == 'game'
        for disc, s, t, w in zip(self.discriminators, student_vecs, teacher_vecs, self.adv_weights):
            real = disc(t.detach())
            fake = disc(s.detach() if game else s)
            bce = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                   + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
            # in the game the weight is the student's: each discriminator learns at its own rate whatever it is
            d_total = d_total + (bce if game else w * bce)
            accuracy.append(_ranked_above(real.detach(), fake.detach()))
            if game:
                fixed = {name: p.detach() for name, p in disc.named_parameters()}
                fooled = functional_call(disc, fixed, (s,))
                g_total = g_total + w * F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
        return d_total, g_total, accuracy

    def mechanism(self, train: dict[str, float], val: dict) -> dict[str, dict]:
        """The discriminators' mean accuracy (chance 0.5), the block terms' mean ratio to the untrained student's
        (1: nothing learnt from the blocks), and the shares of the student's update from the block terms and the
        adversarial term (0 when their weights are 0)."""
        out = {}
        accs = [v for k, v in train.items() if k.startswith('disc_acc')]
        if self.discriminators is not None:
            out['disc_acc'] = dict(value=sum(accs) / len(accs) if accs else None, null=0.5,
                                   note='discriminators telling teacher from student (0.5: chance)')
        ratios = [v for k, v in train.items() if k.endswith('_vs_init')]
        out['sim_vs_init'] = dict(value=sum(ratios) / len(ratios) if ratios else None, null=1.0,
                                  note="block terms over the untrained student's (1: nothing learnt)")
        for term in ('blocks', 'adv'):
            if f'share_{term}' in train:
                out[f'share_{term}'] = dict(value=train[f'share_{term}'], null=0.0,
                                            note=f"share of the student's gradient from the {term} term")
        return out


def _ranked_above(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The fraction of (teacher, student) pairs whose teacher output the discriminator scores higher (ties count
    half): its AUC, whatever its bias. 0.5 is chance, 1 tells every teacher output from every student one."""
    diff = real.float()[:, None] - fake.float()[None, :]
    return (diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()


def _entropy_of_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(-1).mean()


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


def _create_meal(variant: str, pretrained: bool = False, **kwargs) -> MEALStudent:
    return create_ensemble(MEALStudent, variant, pretrained, **kwargs)


default_cfgs = {}
register_student_variants(__name__, 'meal', _create_meal, 'MEAL student', paper_ids='arXiv:1812.02425',
                          paper_name='MEAL: Multi-Model Ensemble via Adversarial Learning')
