"""Collaborative multi-head networks: heads of one network that share its low layers and teach each other.

Paper: "Collaborative Learning for Deep Neural Networks", Song & Chai, NeurIPS 2018 (arXiv:1805.11761). No official
code; public ports: qq456cvb/Collaborative-Learning (TensorFlow), DefangChen/OKDDip (``CLILR_ResNet``).

H copies of a timm model are cut at stage boundaries (``models/split.py``). The stages before the split are shared
(intermediate-level representation sharing, "ILR sharing"); each head owns the stages after it and a classifier.
Simple sharing has one split point and H heads; hierarchical sharing is a tree of splits (``hierarchy=[2, 2]``:
2-way at two depths, 4 heads). Each head is trained on ``beta * CE + (1 - beta) * T^2 * KL(q_h || p_h)``, where the
soft target q_h is the softmax at temperature T of the average of the *other* heads' logits, detached. At every
split the gradient flowing into the shared part is divided by the number of branches there (backpropagation
rescaling: identity forward, grad / k backward). All heads are updated in one step (the sum of the head losses).

Inference keeps one head and what it depends on: ``export_head(h)`` returns a plain timm model of the base
architecture whose outputs equal head h's.

Departures from the paper:

* Defaults: T = 2, beta = 0.5. Split points are stage indices of timm's models (blocks for ViTs), defaulting to
  heads that own the last quarter of the stages (``default_splits``); the paper chose split points per network.
* Heads are independently initialised copies of the base (as the paper); with ``pretrained_base`` every head
  starts from timm's weights and only the classifiers (when ``num_classes`` differs) start apart.
* The soft-target term is the KL divergence; the paper writes the cross-entropy against the soft target, which
  differs by the soft target's entropy, a constant of the step (same gradient).

Registered names: ``collab`` (``base_model=``, ``num_heads=``, ``split=``, ``hierarchy=``),
``collab_<base>x2`` (simple sharing) and ``collab_<base>x4`` (hierarchical, 2-way at two depths).
"""
import copy
import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..files.run_folder import RunFolder
from ..models.builder import create_ensemble, register_ensemble_variants
from ..models.ensemble import EnsembleHead, ModelArgsMixin, refuse_script, sub_group_matcher
from ..models.registry import check_base_model, register_task
from ..models.split import SplitLayout, get_split_layout, grad_rescale
from ..task import Task, TaskOutput
from ..utils.checks import check_option, check_range, check_whole, is_whole
from ..utils.timm_compat import get_global_pool

__all__ = ['CollaborativeNet', 'CollaborativeTask', 'default_splits']

COMBINE_MODES = ('head', 'mean_logits', 'mean_probs')


def default_splits(num_stages: int, num_levels: int) -> list[int]:
    """Split points when none are given: each level of the tree owns ``max(1, num_stages // 4)`` stages."""
    per_level = max(1, num_stages // 4)
    splits = [num_stages - per_level * (num_levels - i) for i in range(num_levels)]
    if splits[0] < 0:
        raise ValueError(f'A hierarchy of {num_levels} levels needs more than the {num_stages} stages of the base'
                         f' model; give the split points with split=[...].')
    return splits


class CollaborativeNet(ModelArgsMixin, nn.Module):
    """H classifier heads of one timm model, sharing its first stages.

    ``forward(x)`` gives ``[B, C]`` logits: those of head ``head_index`` (``combine='head'``, the default; only that
    head's path runs, so inference costs what the base model costs), or the average over heads
    (``combine='mean_logits'`` or ``'mean_probs'``). ``forward_members(x)`` gives every head's logits ``[B, H, C]``.

    Args:
        base_model: Any timm model name of a family with a split layout (ResNet, EfficientNet, MobileNetV3,
            ConvNeXt, VisionTransformer, VGG, DenseNet; others via ``register_split_layout``).
        num_heads: Number of heads H (>= 2).
        split: Where the heads branch: the number of stages shared (0: only the stem, n: every stage, the heads
            are then the classifiers), one per level of the hierarchy. Default: ``default_splits``.
        hierarchy: Branching factor at each split, e.g. ``[2, 2]`` (their product is ``num_heads``). Default:
            ``[num_heads]``, simple sharing.
        combine: What ``forward`` returns: 'head', 'mean_logits' or 'mean_probs'.
        head_index: The designated head (``forward`` with ``combine='head'``, ``export_head()``).
        pretrained_base: Initialise every head from timm's pretrained weights of ``base_model``; each head's
            classifier is then re-initialised on its own, or the heads would be identical and teach each other
            nothing.
        num_classes: Number of classes.
        in_chans: Number of input channels.
        device: Device to build the parameters on.
        dtype: Parameter dtype.
        **kwargs: Passed to ``timm.create_model`` of the base (``img_size``, drop rates, ...).
    """
    # the heads reach the layers they share through the owning head's modules, made at each call: FSDP makes the
    # network one unit, with no unit inside it (models/sharding.py)
    shares_modules_by_views = True

    def __init__(
            self,
            base_model: str,
            num_heads: int = 2,
            split: int | Sequence[int] | None = None,
            hierarchy: Sequence[int] | None = None,
            combine: str = 'head',
            head_index: int = 0,
            pretrained_base: bool = False,
            num_classes: int = 1000,
            in_chans: int = 3,
            device: str | torch.device | None = None,
            dtype: torch.dtype | None = None,
            **kwargs: Any,
    ):
        super().__init__()
        check_base_model(base_model, what='base model')
        if not is_whole(num_heads, ge=2):
            raise ValueError(f'A collaborative network needs num_heads >= 2 (an integer), got {num_heads!r}.')
        if combine not in COMBINE_MODES:
            raise ValueError(f"Unknown combine mode '{combine}', expected one of {COMBINE_MODES}.")
        hierarchy = [num_heads] if hierarchy is None else list(hierarchy)
        if not hierarchy or not all(is_whole(b, ge=2) for b in hierarchy):
            raise ValueError(f'hierarchy must list branching factors >= 2, one per split, got {hierarchy!r}.')
        if math.prod(hierarchy) != num_heads:
            raise ValueError(f'hierarchy {hierarchy} gives {math.prod(hierarchy)} heads, but num_heads={num_heads};'
                             f' the product of the branching factors must be num_heads (e.g. [2, 2] for 4 heads).')
        self._check_head_index(head_index, num_heads, 'head_index')

        self.base_model = base_model
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.combine_mode = combine
        self._head_index = head_index
        self.backward_rescale = True  # the task may turn it off (an ablation of the paper)
        self.grad_checkpointing = False
        self._base_args = dict(in_chans=in_chans, **kwargs)
        # one create_model call per head: each draws its own initialisation from the global RNG
        heads = [timm.create_model(base_model, pretrained=pretrained_base, num_classes=num_classes, device=device,
                                   dtype=dtype, **self._base_args) for _ in range(num_heads)]
        if pretrained_base:
            for head in heads:
                head.reset_classifier(num_classes)
        # what export_head rebuilds before replaying a later reset_classifier
        self._built_classes, self._built_pool = num_classes, self._pool_of(heads[0])
        self.layout: SplitLayout = get_split_layout(heads[0], base_model)
        n = self.layout.num_stages
        if split is None:
            split = default_splits(n, len(hierarchy))
        splits = [split] if is_whole(split, numpy=True) else split
        if (not isinstance(splits, Sequence) or len(splits) != len(hierarchy)
                or not all(is_whole(s, numpy=True) for s in splits)):
            raise ValueError(f'split must give one stage index per level of the hierarchy {hierarchy}, got {split!r}.')
        splits = [int(s) for s in splits]
        if any(s < 0 or s > n for s in splits) or any(a >= b for a, b in zip(splits, splits[1:])):
            raise ValueError(
                f"Invalid split {split!r} for '{base_model}': valid split points are 0 (after the stem, if it has one)"
                f' to {n} (after its last stage; the heads are then the classifiers), one per level, strictly'
                f' increasing.'
            )
        self.hierarchy = hierarchy
        self.splits = splits
        # heads in one subtree at level l share its segments; group[l] is that subtree's size
        self._group = [math.prod(hierarchy[level:]) for level in range(len(hierarchy) + 1)]
        self._segment_level = [sum(s < j for s in splits) for j in range(self.layout.num_segments)]
        for h, head in enumerate(heads):
            for j in range(self.layout.num_segments):
                if self._owner(h, j) != h:
                    _drop_segment(head, self.layout, j)
        self.heads = nn.ModuleList(heads)
        self._mean = EnsembleHead(num_heads, num_classes, 'mean_probs' if combine == 'head' else combine)

    def __prepare_scriptable__(self) -> nn.Module:
        refuse_script(self, 'it runs its shared segments and heads in Python that TorchScript does not compile (its'
                            ' designated head, a plain network, scripts: torch.jit.script(model.export_head()))')

    @staticmethod
    def _check_head_index(index: Any, num_heads: int, what: str) -> None:
        check_whole(what, index, f'a head index in 0..{num_heads - 1}', ge=0, le=num_heads - 1)

    @staticmethod
    def _pool_of(model: nn.Module) -> str | None:
        return get_global_pool(model)

    @property
    def head_index(self) -> int:
        """The designated head: what ``forward`` (with ``combine='head'``), the feature path and ``export_head``
        use."""
        return self._head_index

    @head_index.setter
    def head_index(self, index: int) -> None:
        self._check_head_index(index, self.num_heads, 'head_index')
        self._head_index = index

    def _owner(self, head: int, segment: int) -> int:
        """The head whose module holds ``segment`` for ``head``: the first head of the subtree sharing it."""
        group = self._group[self._segment_level[segment]]
        return head // group * group

    def _defining_args(self) -> dict[str, Any]:
        return dict(base_model=self.base_model, num_heads=self.num_heads, split=list(self.splits),
                    hierarchy=list(self.hierarchy), combine=self.combine_mode, head_index=self.head_index)

    # ---- timm model interface ----
    @property
    def num_features(self) -> int:
        return self.heads[self.head_index].num_features

    @property
    def head_hidden_size(self) -> int:
        return getattr(self.heads[self.head_index], 'head_hidden_size', self.num_features)

    @property
    def global_pool(self) -> str | None:
        return self._pool_of(self.heads[self.head_index])

    def get_classifier(self) -> tuple[nn.Module, ...]:
        """Every head's classifier, the designated head's first (timm accepts a tuple)."""
        order = [self.head_index] + [h for h in range(self.num_heads) if h != self.head_index]
        return tuple(self.heads[h].get_classifier() for h in order)

    # ---- features: the designated head's, as the base model gives them ----
    def _path_model(self, head: int | None = None) -> nn.Module:
        """A model of the base architecture whose every segment is the module that ``head`` runs (its own, or the
        shared one of the head that owns it): the same parameters, no copy. timm's feature API (``feature_info``,
        ``forward_intermediates``, ``prune_intermediate_layers``) then works as on the exported head."""
        head = self.head_index if head is None else head
        view = _shallow(self.heads[head])
        layout = self.layout
        for segment in range(layout.num_segments):
            owner = self.heads[self._owner(head, segment)]
            if segment == 0:
                paths = layout.stem
            elif segment <= layout.num_stages:
                paths = layout.stages[segment - 1]
            else:
                paths = [*layout.tail, *layout.head_paths]
            for path in paths:
                _share(view, owner, path)
        return view

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """The designated head's feature levels: a collaborative net's feature maps are those of the network it
        exports (``export_head``)."""
        info = self.heads[self.head_index].feature_info
        return info.get_dicts() if hasattr(info, 'get_dicts') else list(info)

    @property
    def output_fmt(self) -> str:
        return getattr(self.heads[self.head_index], 'output_fmt', 'NCHW')

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        """timm's ``forward_intermediates`` of the designated head's network (see ``feature_info``)."""
        return (getattr(self, '_pruned_path', None) or self._path_model()).forward_intermediates(x, *args, **kwargs)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep only the designated head's path up to its last intermediate taken (``features_only=True``); the
        heads themselves are left as they are."""
        path = self._path_model()
        kept = path.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        self.__dict__['_pruned_path'] = path  # outside the module tree: the parameters stay the heads'
        return kept

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The base's parameter groups in every head (layer k of every head in group k: ``layer_decay`` by depth,
        the shared stages counted once where they are stored)."""
        return sub_group_matcher(self.heads[0], r'^heads\.\d+\.', coarse)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        for head in self.heads:
            if global_pool is None:
                head.reset_classifier(num_classes)
            else:
                head.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        self.temperature = 1.0  # fitted to the old classes
        self._mean = EnsembleHead(self.num_heads, num_classes, self._mean.mode)
        self._mean.train(self.training)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = set()
        for h, head in enumerate(self.heads):
            own = [n for n, _ in head.named_parameters()]
            if hasattr(head, 'no_weight_decay'):
                # entries may be fnmatch patterns (timm matches them so): keep those that match a weight this head owns
                names |= {f'heads.{h}.{n}' for n in head.no_weight_decay() if fnmatch.filter(own, n)}
        return names

    # ---- forward ----
    def _run(self, head: int, segment: int, x: torch.Tensor) -> torch.Tensor:
        model = self.heads[self._owner(head, segment)]
        # stages only, as timm's checkpoint_seq (a checkpointed BatchNorm updates its statistics twice)
        if self.grad_checkpointing and torch.is_grad_enabled() and 0 < segment <= self.layout.num_stages:
            return checkpoint(self.layout.run, model, segment, x, use_reentrant=False)
        return self.layout.run(model, segment, x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features of the designated head: its path through the shared stages and its own."""
        for j in range(self.layout.num_segments):
            x = self._run(self.head_index, j, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.heads[self.head_index].forward_head(x, pre_logits=pre_logits)
        return x if pre_logits or self.num_classes <= 0 else self._tempered(x)

    def forward_members_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unpooled features of every head, each shared segment run once."""
        outputs = {0: x}  # first head of a subtree -> its input at the current level
        for level in range(len(self.hierarchy) + 1):
            group = self._group[level]
            segments = [j for j, lv in enumerate(self._segment_level) if lv == level]
            parent_group = self._group[level - 1] if level else group
            new = {}
            for owner in range(0, self.num_heads, group):
                z = outputs[owner // parent_group * parent_group]
                if level and self.backward_rescale:
                    # the branches' gradients sum at the split: divide by their number
                    z = grad_rescale(z, 1.0 / self.hierarchy[level - 1])
                for j in segments:
                    z = self._run(owner, j, z)
                new[owner] = z
            outputs = new
        return [outputs[h] for h in range(self.num_heads)]

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's logits, ``[B, H, C]``."""
        features = self.forward_members_features(x)
        return torch.stack([head.forward_head(f) for head, f in zip(self.heads, features)], dim=1)

    def combine(self, member_logits: torch.Tensor) -> torch.Tensor:
        """``forward``'s logits from every head's logits ``[B, H, C]`` (pooled features with ``num_classes=0``,
        averaged over heads by the mean modes, so that their width stays ``num_features``)."""
        if self.combine_mode == 'head':
            return member_logits[:, self.head_index]
        if self.num_classes <= 0:
            return member_logits.mean(1)
        return self._mean(member_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.combine_mode == 'head':
            return self.forward_head(self.forward_features(x))
        return self._tempered(self.combine(self.forward_members(x)))

    # ---- export ----
    @torch.no_grad()
    def export_head(self, index: int | None = None) -> nn.Module:
        """A plain timm model of the base architecture holding head ``index``'s weights (default: the designated
        head), its outputs equal to that head's. It loads with timm alone, without this package."""
        index = self.head_index if index is None else index
        self._check_head_index(index, self.num_heads, 'The exported head')
        ref = next(self.parameters())
        model = timm.create_model(self.base_model, pretrained=False, device=ref.device, dtype=ref.dtype,
                                  num_classes=self._built_classes, **self._base_args)
        if (self.num_classes, self.global_pool) != (self._built_classes, self._built_pool):
            # replay the reset_classifier the heads went through, so that the export has their structure
            model.reset_classifier(self.num_classes, self.global_pool)
        states = {}
        state = {}
        for name in model.state_dict():
            owner = self._owner(index, self.layout.segment_of(name))
            if owner not in states:
                states[owner] = self.heads[owner].state_dict()
            state[name] = states[owner][name]
        model.load_state_dict(state, strict=True)
        return model.train(self.training)


def _drop_segment(model: nn.Module, layout: SplitLayout, segment: int) -> None:
    """Remove the parameters and buffers of one segment from a head that uses another head's (no duplicates in
    the state dict): the largest submodule holding only that segment's weights becomes an ``nn.Identity``."""
    names = [n for n, _ in model.state_dict(keep_vars=True).items()]
    owned = {n for n in names if layout.segment_of(n) == segment}
    done: set[str] = set()
    for name in sorted(owned):
        if any(name == d or name.startswith(d + '.') for d in done):
            continue
        parts = name.split('.')
        for k in range(1, len(parts) + 1):
            prefix = '.'.join(parts[:k])
            under = [n for n in names if n == prefix or n.startswith(prefix + '.')]
            if all(n in owned for n in under):
                break
        parent_path, _, attr = prefix.rpartition('.')
        parent = model.get_submodule(parent_path) if parent_path else model
        if attr in parent._modules:
            parent._modules[attr] = nn.Identity()
        elif attr in parent._parameters:
            parent._parameters[attr] = None
        else:
            parent._buffers[attr] = None
        done.add(prefix)


@register_task(CollaborativeNet)
class CollaborativeTask(Task):
    """The collaborative-learning objective: per head ``beta * CE + (1 - beta) * T^2 * KL(q_h || p_h)``, summed.

    Args:
        model: A ``CollaborativeNet``.
        beta: Weight of the hard-label cross-entropy (the paper's beta).
        temperature: Softmax temperature T of the soft targets and of the heads in the KL term.
        backward_rescale: Divide the gradient into a shared part by the number of branches at each split (the
            paper's backpropagation rescaling); False for the ablation.
        label_smoothing: Label smoothing of the cross-entropy.
    """
    accepts_soft_targets = True  # every cross-entropy of it takes probabilities (mixup, cutmix)

    def __init__(self, model: CollaborativeNet, beta: float = 0.5, temperature: float = 2.0,
                 backward_rescale: bool = True, label_smoothing: float = 0.0):
        super().__init__(model, label_smoothing=label_smoothing)
        check_option('beta', beta, float, low=0)
        check_option('temperature', temperature, float)
        if not isinstance(backward_rescale, bool):
            raise ValueError(f'backward_rescale must be True or False, got {backward_rescale!r}.')
        check_range('beta (the weight of the cross-entropy)', beta, 'in [0, 1]', ge=0.0, le=1.0)
        check_range('temperature', temperature, '> 0', gt=0)
        self.beta = beta
        self.temperature = temperature
        model.backward_rescale = backward_rescale

    def exports(self) -> dict[str, nn.Module]:
        return {RunFolder.EXPORTED: self.model.export_head()}

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> TaskOutput:
        logits = self.model.forward_members(x)
        ce = torch.stack([self.cross_entropy(logits[:, h], target) for h in range(logits.shape[1])])
        kl = collaborative_soft_loss(logits, self.temperature)
        loss = (self.beta * ce + (1.0 - self.beta) * kl).sum()
        output = self.model.combine(logits.detach())
        return dict(loss=loss, output=output, components=dict(ce=ce.detach().mean(), kl=kl.detach().mean()),
                    mechanism=dict(consensus=(1.0 - self.beta) * kl.sum()))

    def mechanism(self, train: dict[str, float], val: dict) -> dict[str, dict]:
        """The share of the heads' gradient from the consensus term (0 at ``beta=1``), and the heads' divergence
        from their consensus: the mean ``T^2 KL(q_h || p_h)`` over the epoch's training batches (the ``kl`` term)."""
        return dict(
            share_consensus=dict(value=train.get('share_consensus'), null=0.0,
                                 note="share of the heads' gradient from the consensus term"),
            consensus_kl=dict(value=train.get('kl'), null=None,
                              note='the heads\' divergence from their consensus (lower: closer)'))


def collaborative_soft_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per head ``T^2 * KL(q_h || softmax(z_h / T))`` with ``q_h = softmax(mean of the other heads' logits / T)``,
    detached; averaged over the batch.

    Args:
        logits: ``[B, H, C]`` logits of the heads.
        temperature: T.

    Returns:
        ``[H]`` losses.
    """
    num_heads = logits.shape[1]
    if num_heads < 2:
        raise ValueError(f'Soft targets need at least 2 heads, got {num_heads}.')
    z = logits.float()
    # weights 1/(H-1) on the other heads and exactly 0 on the head itself
    others = (1.0 - torch.eye(num_heads, device=z.device, dtype=z.dtype)) / (num_heads - 1)
    target = torch.einsum('hg,bgc->bhc', others, z.detach())
    log_q = F.log_softmax(target / temperature, dim=-1)
    log_p = F.log_softmax(z / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean(0)
    return kl * temperature ** 2


def _create_collab(variant: str, pretrained: bool = False, **kwargs) -> CollaborativeNet:
    return create_ensemble(CollaborativeNet, variant, pretrained, **kwargs)


default_cfgs = {}
register_ensemble_variants(
    __name__, 'collab', _create_collab, 'Collaborative multi-head network', sizes=(2, 4), size_arg='num_heads',
    size_args={4: dict(hierarchy=[2, 2])}, paper_ids='arXiv:1805.11761',
    paper_name='Collaborative Learning for Deep Neural Networks')


def _shallow(module: nn.Module) -> nn.Module:
    """A shallow copy of a module with a module table of its own (replacing a child changes only the copy)."""
    view = copy.copy(module)
    view._modules = dict(module._modules)
    return view


def _share(view: nn.Module, owner: nn.Module, path: str) -> None:
    """``view.<path>`` becomes ``owner.<path>`` (a module, parameter or buffer: layouts name all three), the parents
    along the path copied shallowly so that neither original tree changes."""
    *parents, leaf = path.split('.')
    node, source = view, owner
    for name in parents:
        child = _shallow(node._modules[name])
        node._modules[name] = child
        node, source = child, source._modules[name]
    for table in ('_modules', '_parameters', '_buffers'):
        if leaf in getattr(source, table):
            if table != '_modules':
                setattr(node, table, dict(getattr(node, table)))
            getattr(node, table)[leaf] = getattr(source, table)[leaf]
            return
    raise KeyError(f"'{path}' is no module, parameter or buffer of the head that owns it.")
