"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): ``fit_temperature``
fits T on held-out logits, ``calibrate`` fits it on a model's own predictions and sets it (``train.py --calibrate``).

Below the analysis so that the trainer can calibrate; ``timm_ensembles.analysis.uncertainty`` re-exports both.
"""
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..metrics import as_float64, check_targets
from ..utils.checks import check_whole
from .engine import MemberPredictor

__all__ = ['fit_temperature', 'calibrate']


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of ``softmax(logits / T)`` (Guo et al.'s temperature scaling).

    Fit it on held-out data, not on the training set. ``logits`` are the model's output logits; for an ensemble that
    averages probabilities, they are the log of the averaged probabilities, ``metrics.ensemble_probs(logits).log()``
    (any logits that give the same softmax do: a constant per sample does not change ``softmax(logits / T)``).

    ``log T`` is optimised (so that T stays positive) by ``torch.optim.LBFGS`` with a strong-Wolfe line search, in
    float64, from T = 1. The NLL is convex in 1 / T, so its minimum is unique when it exists; it does not exist, and
    a ValueError says so, when the target has the highest logit on every sample (the NLL falls as T -> 0) or, on
    average, the target's logit is no higher than its sample's mean logit (the NLL falls as T -> inf).

    Args:
        logits: ``[N, C]`` finite logits of one model (or log-probabilities), C >= 2.
        targets: ``[N]`` class indices.
        max_iter: Most LBFGS iterations.

    Returns:
        The temperature; calibrated probabilities are ``softmax(logits / T)``.
    """
    logits = as_float64(logits, 'logits')
    if logits.ndim != 2:
        hint = ' (for [N, M, C] member logits, pass metrics.ensemble_probs(logits).log())' if logits.ndim == 3 else ''
        raise ValueError(f'fit_temperature expects [N, C] logits of one model{hint}, got shape'
                         f' {tuple(logits.shape)}.')
    num_samples, num_classes = logits.shape
    if num_samples < 1 or num_classes < 2:
        raise ValueError(f'fit_temperature needs at least 1 sample and 2 classes, got shape {tuple(logits.shape)}.')
    if not torch.isfinite(logits).all():
        raise ValueError('fit_temperature needs finite logits; for the log of probabilities that can be 0, clamp them'
                         ' first (probs.clamp_min(1e-300).log()).')
    targets = check_targets(targets, num_samples, num_classes, logits.device)
    check_whole('max_iter', max_iter, 'a positive integer', ge=1)
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    # d NLL / d(1/T) at 1/T = 0 (uniform softmax) is mean(mean_c z - z_y); at 1/T -> inf it is mean(max_c z - z_y).
    # The NLL being convex in 1/T, a finite T > 0 minimises it exactly when the first is < 0 and the second > 0
    if logits.mean(1).sub(target_logits).mean() >= 0:
        raise ValueError('fit_temperature: the NLL has no minimum at a finite temperature, it falls as T -> inf (on'
                         " average the target's logit is no higher than its sample's mean logit: the uniform"
                         ' prediction is best).')
    if torch.equal(target_logits, logits.max(1).values):
        raise ValueError('fit_temperature: the NLL has no minimum at a positive temperature, it falls as T -> 0 (the'
                         ' target has the highest logit on every sample). Fit it on held-out data the model gets'
                         ' wrong at times.')
    # callers evaluate under no_grad or inference_mode; the fit needs autograd, and tensors made in inference mode
    # cannot be saved for backward, hence the clones
    with torch.inference_mode(False), torch.enable_grad():
        logits, targets = logits.clone(), targets.clone()
        log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn='strong_wolfe',
                                      tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), targets)
            loss.backward()
            return loss

        optimizer.step(closure)
    return log_t.detach().exp().item()



def calibrate(model: torch.nn.Module, loader: Iterable, accelerator=None) -> dict[str, float]:
    """Fit the temperature of ``model`` on held-out data and set it (``model.set_temperature``).

    The model's own prediction on every batch (its ``combine`` of the members, or its output) is gathered in eval
    mode with the temperature at 1, ``fit_temperature`` fits T on it, and the model divides its logits by T from then
    on (recorded in its ``model_args``, so an exported model reloads calibrated).

    Args:
        model: A model of this package (it has ``set_temperature``; a plain timm model has no place to keep T: wrap
            it, e.g. ``timm_ensembles.ensemble_of([model])``).
        loader: Held-out ``(x, target)`` batches: validation data the model was not trained on, never the test set.
        accelerator: As ``engine.MemberPredictor`` takes it (device, autocast, gathering across processes).

    Returns:
        ``{'temperature': T, 'nll_before': ..., 'nll_after': ...}`` on the loader's data.
    """
    if not hasattr(model, 'set_temperature'):
        raise ValueError(f'{type(model).__name__} has no set_temperature, so it cannot keep a temperature: calibrate'
                         ' a model of timm_ensembles (a plain timm model wrapped as ensemble_of([model]) is one).')
    previous = model.temperature
    model.set_temperature(1.0)
    try:
        outputs = [(out.logits.double().cpu(), out.target.long().cpu())
                   for out in MemberPredictor(model, loader, accelerator, gather=accelerator is not None)]
    finally:
        model.set_temperature(previous)
    if not outputs:
        raise ValueError('calibrate: the loader gave no batch.')
    # log(mean probs) of an ensemble can hold -inf where a probability underflowed; any very negative finite value
    # gives the same softmax
    logits = torch.cat([o for o, _ in outputs]).clamp_min(-1e30)
    targets = torch.cat([t for _, t in outputs])
    temperature = fit_temperature(logits, targets)
    model.set_temperature(temperature)
    return dict(temperature=temperature, nll_before=F.cross_entropy(logits, targets).item(),
                nll_after=F.cross_entropy(logits / temperature, targets).item())
