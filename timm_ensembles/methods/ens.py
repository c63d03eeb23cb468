"""Independent deep ensembles: N randomly initialised networks, each trained on its own cross-entropy.

The baseline the ensemble methods are compared with: "RIE" (random-initialisation ensemble) in the FDL paper's
tables, the deep ensembles of Lakshminarayanan et al. (2017) and Fort et al. (2019). Every member sees the same
minibatch (as in the FDL paper's RIE); the prediction is the average of the member probabilities.

Registered names: ``ens`` (``base_model=``, ``num_members=``) and ``ens_<base>x<N>``.
"""
import torch

from ..losses import member_cross_entropy
from ..models.builder import create_ensemble, register_ensemble_variants
from ..models.ensemble import EnsembleModel
from ..models.registry import register_task
from ..task import Task, TaskOutput

__all__ = ['DeepEnsemble', 'DeepEnsembleTask']


class DeepEnsemble(EnsembleModel):
    """Independent ensemble; ``forward`` averages the members' probabilities (``combine='mean_probs'``).

    See ``EnsembleModel`` for the arguments.
    """
    default_combine = 'mean_probs'


@register_task(DeepEnsemble)
class DeepEnsembleTask(Task):
    """Each member minimises its own cross-entropy; nothing couples them.

    The loss is the sum of the member cross-entropies, so each member's gradient is exactly that of its own
    loss. A ``linear`` combine head, if chosen, is fitted on the detached member logits.

    Args:
        model: A ``DeepEnsemble`` (or any ``EnsembleModel``).
        label_smoothing: Label smoothing of every cross-entropy.
    """
    accepts_soft_targets = True  # every cross-entropy of it takes probabilities (mixup, cutmix)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> TaskOutput:
        logits = self.model.forward_members(x)
        ce = member_cross_entropy(logits, target, self.label_smoothing)
        loss = ce.sum()
        components = dict(ce=ce.detach().mean())
        if self.model.head.fc is not None:
            head_logits = self.model.combine(logits.detach())
            head_ce = self.cross_entropy(head_logits, target)
            loss = loss + head_ce
            components['head_ce'] = head_ce.detach()
            output = head_logits
        else:
            output = self.model.combine(logits.detach())
        return dict(loss=loss, output=output, components=components)


def _create_ens(variant: str, pretrained: bool = False, **kwargs) -> DeepEnsemble:
    return create_ensemble(DeepEnsemble, variant, pretrained, **kwargs)


default_cfgs = {}
register_ensemble_variants(
    __name__, 'ens', _create_ens, 'Independent deep ensemble', paper_ids='arXiv:1612.01474',
    paper_name='Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles')
