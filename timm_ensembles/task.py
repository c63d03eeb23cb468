"""The task contract: a training objective as an ``nn.Module`` holding its model.

In the spirit of ``timm.task`` (timm >= 1.0.23), but not built on it and named apart from it (``Task`` says why).

``task(x, target)`` returns a dict with ``loss`` (what to backpropagate), ``output`` (``[B, C]`` logits for training
accuracy), ``components`` (named loss terms, detached, for logging), ``stats`` (other named scalars, averaged over the
epoch like the components) and ``mechanism`` (the method's own terms, weighted as they enter ``loss`` and not
detached: the training loop measures the share of the model's gradient each one gives, ``share_<name>``, on some
steps). ``mechanism(train, val)`` turns an epoch's numbers into the method's diagnostics, each with the value it
takes when the mechanism does nothing.

A task owns every training-only part (teachers, discriminators, extra heads) and their optimisation
(``create_optimizer``); the model it holds is what gets exported. A training script asks
``timm_ensembles.create_task(model)`` for the task and never branches on the method.
"""
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from .utils.checks import check_option, check_range

# check_option: the tasks' own option check, kept importable from here where a task of its own found it
__all__ = ['Task', 'CrossEntropyTask', 'TaskOutput', 'check_option']

TaskOutput = dict[str, Any]


class Task(nn.Module):
    """Base class of training objectives.

    Not ``timm.task.TrainingTask`` nor a subclass of it, and so named apart from it: ``Task`` (timm's base is
    ``TrainingTask``) and ``CrossEntropyTask`` (``ClassificationTask`` is timm's). timm's contract is made for
    timm's train.py: the task owns its EMA (``setup_ema``, ``update_ema``), its DDP wrapping
    (``prepare_distributed``) and compilation, and hands out the trained part and its checkpoint state
    (``get_trainable_module``, ``get_eval_model``, ``get_checkpoint_state``). Here the trainer is Accelerate's and
    owns those (the EMA of ``export_model()``, ``accelerator.prepare``, the run's checkpoint), while a task owns
    what timm's has no place for: its optimizer and parameter groups (``create_optimizer``), the exported model and
    further exports, the method's diagnostics (``mechanism``) and the choice left to validation
    (``select_on_validation``). Subclassing ``TrainingTask`` would promise hooks that nothing here calls and that
    would do the wrong thing if called (an EMA beside the trainer's); sharing its class names would give a user who
    imports both two ``ClassificationTask`` classes that take different arguments.

    Subclasses implement ``forward(x, target) -> TaskOutput`` and may override the hooks below.

    Attributes:
        find_unused_parameters: Whether some trainable parameters can miss a gradient in a step (DDP must be
            told; it costs an extra graph traversal, so tasks that use every parameter every step say False).
        accepts_soft_targets: Whether ``forward`` also takes ``[B, C]`` class probabilities as ``target`` (mixup and
            cutmix give those); a task that says False is refused them before training.
    """
    find_unused_parameters: bool = False
    accepts_soft_targets: bool = False

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        check_option('label_smoothing', label_smoothing, float, low=0)
        check_range('label_smoothing', label_smoothing, 'in [0, 1)', lt=1)
        self.model = model
        self.label_smoothing = label_smoothing
        self.epoch = 0
        self.data_config: dict[str, Any] | None = None
        # kept out of the module tree: it is not a submodule and must not be pickled with the task
        self.__dict__['_optimizer'] = None

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the task's label smoothing, computed in fp32; ``target`` is ``[B]`` class indices or
        ``[B, C]`` probabilities."""
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)

    def set_data_config(self, data_config: dict[str, Any]) -> None:
        """Told by the training script how its batches are preprocessed (``mean``, ``std``, ``input_size``), before
        training; tasks with teachers map the batches to each teacher's own preprocessing."""
        self.data_config = dict(data_config)

    def set_label_names(self, label_names: list[str] | None) -> None:
        """Told the dataset's class names, where it has them, before training; tasks that learn from other models
        check that those predict the same classes."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the training loop before each epoch (0-based); tasks with phases switch here."""
        self.epoch = epoch

    def param_groups(self, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
        """Parameter groups of everything the task trains (no weight decay on biases and norms, as timm).

        Args:
            weight_decay: Weight decay of the weights that take it.
            layer_decay: timm's layer-wise learning-rate decay of the model (``lr_scale`` per layer, from its
                ``group_matcher``: for an ensemble, layer k of every member alike); the task's own trained parts
                beside the model (e.g. MEAL's discriminators) keep the full rate. None: no layer decay.
        """
        if layer_decay is None:
            return param_groups_weight_decay(self, weight_decay,
                                             no_weight_decay_list={f'model.{n}' for n in self._no_weight_decay()})
        groups = param_groups_layer_decay(self.model, weight_decay, layer_decay=layer_decay,
                                          no_weight_decay_list=self._no_weight_decay())
        # the parameter names are timm's bookkeeping; the groups are split by parameter further down (FDL, MEAL)
        groups = [{k: v for k, v in g.items() if k != 'param_names'} for g in groups]
        in_model = {id(p) for p in self.model.parameters()}
        rest = [g for g in param_groups_weight_decay(self, weight_decay)
                if any(id(p) not in in_model for p in g['params'])]
        for g in rest:
            g['params'] = [p for p in g['params'] if id(p) not in in_model]
        return groups + rest

    def _no_weight_decay(self) -> set:
        """The model's own ``no_weight_decay`` names (relative to the model)."""
        nwd = getattr(self.model, 'no_weight_decay', None)
        return set(nwd()) if callable(nwd) else set()

    def create_optimizer(
            self, opt: str = 'sgd', lr: float = 0.1, weight_decay: float = 0.0, layer_decay: float | None = None,
            **kwargs,
    ) -> torch.optim.Optimizer:
        """Build the optimizer of everything the task trains, with timm's optimizer factory.

        The task keeps a reference, so that terms whose step size is defined relative to the learning rate
        can read the current one. A group's ``lr_scale`` (layer decay, a task's own scaled parts) applies from the
        first step; timm's schedulers keep ``initial_lr`` as the group's base and apply ``lr_scale`` themselves.
        Keyword arguments go to ``timm.optim.create_optimizer_v2``.

        Args:
            opt: timm optimizer name.
            lr: Base learning rate.
            weight_decay: Weight decay (not on biases and norms).
            layer_decay: Layer-wise learning-rate decay (see ``param_groups``); None for none.
        """
        # a task written before layer decay overrides param_groups(weight_decay) alone: it still trains without it
        groups = self.param_groups(weight_decay, layer_decay) if layer_decay is not None else \
            self.param_groups(weight_decay)
        optimizer = create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)
        for group in optimizer.param_groups:
            if 'lr_scale' in group:
                group['initial_lr'] = group['lr']
                group['lr'] = group['lr'] * group['lr_scale']
        self.__dict__['_optimizer'] = optimizer
        return optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.__dict__['_optimizer']

    def export_model(self) -> nn.Module:
        """The model to save and publish: inference parts only."""
        return self.model

    def select_on_validation(self, metrics: dict[str, Any]) -> str | None:
        """Told, after the last epoch, the final metrics on held-out validation data (``evaluate`` of the exported
        model); a task may then make a choice its method leaves to validation (FDL: the ensemble head or the averaged
        probabilities). Called only when the run's validation data is not its test set (``train.py --holdout``).

        Returns:
            What was chosen and why, for the log; None when there was nothing to choose.
        """
        return None

    def mechanism(self, train: dict[str, float], val: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The method's own diagnostics after an epoch: whether its mechanism acts, read from one line.

        Args:
            train: The epoch's training means (components, stats, and ``share_<name>``: the share of the model's
                gradient from each ``mechanism`` term of ``forward``, where the loop measured it).
            val: The epoch's validation metrics (``evaluate``).

        Returns:
            ``{name: dict(value=float or None, null=float or None, note=str)}``: ``null`` is the value when the
            mechanism does nothing (its weight 0), None for a quantity without one (shown for what it is);
            ``value`` None, with the reason in ``note``, where it cannot be computed.
        """
        return {}

    def exports(self) -> dict[str, nn.Module]:
        """Further models to save beside ``export_model``, by sub-folder name (e.g. one head as a plain timm model)."""
        return {}

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> TaskOutput:
        raise NotImplementedError


class CrossEntropyTask(Task):
    """Cross-entropy on ``model(x)``: the task of any plain timm model (the single-network baseline).

    Named for its loss, not ``ClassificationTask``: that is ``timm.task.ClassificationTask`` (a ``TrainingTask``
    taking a criterion, with its own EMA and DDP hooks), a different class that a user may import beside this one.

    Args:
        model: Any classifier.
        label_smoothing: Label smoothing of the cross-entropy.
    """
    accepts_soft_targets = True  # every cross-entropy of it takes probabilities (mixup, cutmix)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> TaskOutput:
        output = self.model(x)
        loss = self.cross_entropy(output, target)
        return dict(loss=loss, output=output, components=dict(ce=loss.detach()))

