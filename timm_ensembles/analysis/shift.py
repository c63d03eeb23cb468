"""Dataset shift for evaluation: corruptions of an evaluation set at severities 1 to 5.

In the spirit of CIFAR-10-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions
and Perturbations", 2019), as Fort et al. ("Deep Ensembles: A Loss Landscape Perspective", 2019) use it to plot
accuracy and calibration against the severity of the shift, and of the rotated MNIST of Ovadia et al. ("Can You
Trust Your Model's Uncertainty?", 2019). The corruptions are computed on the fly on batches, not read from the
published data sets, so that they apply to any evaluation set of this package (MNIST, CIFAR, ...).

Batches are in the model's input space, ``(pixel - mean) / std`` per channel with the data config's ``mean`` and
``std`` (``data.match_channels(data_config)`` gives one value per input channel), as the loaders of this package
yield them. A corruption un-normalises to pixels in [0, 1], corrupts there, clamps to [0, 1] as a real image is, and
normalises again.

Parameters per severity (:data:`SEVERITY_PARAMS`); CIFAR-10-C's are those of its generating script,
``make_cifar_c.py`` of https://github.com/hendrycks/robustness (``ImageNet-C/create_c/``), made for 32 px images:

* ``gaussian_noise``: additive noise of standard deviation 0.04, 0.06, 0.08, 0.09, 0.10 (CIFAR-10-C), independent
  per pixel and channel;
* ``gaussian_blur``: Gaussian of standard deviation 0.4, 0.6, 0.7, 0.8, 1.0 pixels at 32 px (CIFAR-10-C), scaled
  with the image side (``min(H, W) / 32``) so that it blurs the same fraction of the image at any input size, the
  kernel truncated at 4 standard deviations (as scikit-image's ``gaussian`` that CIFAR-10-C called); torchvision
  pads by reflection where scikit-image repeated the edge pixel;
* ``contrast``: factor 0.75, 0.5, 0.4, 0.3, 0.15 (CIFAR-10-C) of torchvision's ``adjust_contrast``: each image
  blended towards its mean grey level, ``factor * x + (1 - factor) * mean(grey(x))``; CIFAR-10-C blended each channel
  towards its own mean, the same for grey images and a slight change of colour balance for colour ones;
* ``rotation``: 15, 30, 45, 60, 75 degrees, counter-clockwise, bilinear, corners outside the image black (not in
  CIFAR-10-C; the rotated MNIST of Ovadia et al. steps by 15 degrees). Below 90 degrees every severity is a tilt
  of upright content; from 90 on, digits and objects start to look like other classes (a lying 1, a 6 turned
  into a 9), which is label noise rather than shift;
* ``brightness``: the HSV value (the largest channel) raised by 0.05, 0.1, 0.15, 0.2, 0.3 (CIFAR-10-C), clipped at 1,
  hue and saturation kept, which scales each pixel's channels by ``min(v + delta, 1) / v``.

Severity 0 is the clean set: the batch is returned as it is.

Determinism: the randomness of a corruption (the noise) comes from a ``torch.Generator`` of its own, seeded from
``(seed, corruption, severity, batch index)`` and drawn on the CPU, so that a batch gets the same corruption whatever
ran before, whatever the global random state and on any device.
"""
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..utils.checks import check_whole

__all__ = ['CORRUPTIONS', 'MAX_SEVERITY', 'SEVERITY_PARAMS', 'corrupt', 'CorruptedLoader']

CORRUPTIONS = ('gaussian_noise', 'gaussian_blur', 'contrast', 'rotation', 'brightness')
MAX_SEVERITY = 5
# the parameter of each corruption at severities 1..5 (see the module docstring for the source of each)
SEVERITY_PARAMS = {
    'gaussian_noise': (0.04, 0.06, 0.08, 0.09, 0.10),  # noise standard deviation, pixels in [0, 1]
    'gaussian_blur': (0.4, 0.6, 0.7, 0.8, 1.0),  # blur standard deviation in pixels of a 32 px image
    'contrast': (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor (1: unchanged)
    'rotation': (15.0, 30.0, 45.0, 60.0, 75.0),  # degrees, counter-clockwise
    'brightness': (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
}
# the image side CIFAR-10-C's blur widths were made for
_REFERENCE_SIDE = 32
# kernel radius in standard deviations: scikit-image's default truncation, which CIFAR-10-C's blur used
_BLUR_TRUNCATE = 4.0


def _check_name(name: Any) -> str:
    if name not in CORRUPTIONS:
        raise ValueError(f'Unknown corruption {name!r}: valid ones are {", ".join(CORRUPTIONS)}.')
    return name


def _check_severity(severity: Any) -> int:
    return int(check_whole('severity', severity, f'an integer in 0..{MAX_SEVERITY} (0: no corruption)', ge=0,
                           le=MAX_SEVERITY, numpy=True))


def _check_seed(seed: Any) -> int:
    return int(check_whole('seed', seed, 'an integer', numpy=True))


def _channel_stats(values: Sequence[float] | None, num_chans: int, key: str, x: torch.Tensor) -> torch.Tensor | None:
    if values is None:
        return None
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() != num_chans:
        raise ValueError(f'{key} must have one value per channel of the batch ({num_chans}), got {values.numel()}'
                         f' values: {values.tolist()}. data.match_channels(data_config) gives the matching ones.')
    if key == 'std' and not bool((values > 0).all()):
        raise ValueError(f'std must be positive, got {values.tolist()}.')
    return values.to(device=x.device, dtype=x.dtype).view(1, num_chans, 1, 1)


def _generator(seed: int, name: str, severity: int, batch_index: int) -> torch.Generator:
    # a stable hash (Python's hash() of a str changes between processes) of everything that names this batch's
    # corruption, so that batches, severities and corruptions draw independent noise
    key = f'{seed}/{name}/{severity}/{batch_index}'.encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], 'little'))


def _gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    # drawn on the CPU: the same numbers on any device (CUDA generators draw other ones)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return x + std * noise.to(device=x.device, dtype=x.dtype)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    side = min(x.shape[-2:])
    sigma = sigma * side / _REFERENCE_SIDE
    # reflection padding needs a radius below the image side
    radius = min(int(_BLUR_TRUNCATE * sigma + 0.5), side - 1)
    if radius < 1:
        return x
    size = 2 * radius + 1
    return TF.gaussian_blur(x, kernel_size=[size, size], sigma=[sigma, sigma])


def _brightness(x: torch.Tensor, delta: float) -> torch.Tensor:
    # HSV -> RGB is linear in the value v (every channel is v * (1 - s * f_c(h))), so raising v with h and s kept
    # scales the channels by the ratio of the values. A black pixel (v = 0) has s = 0 by convention and becomes grey.
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + delta).clamp(max=1)
    scale = new_value / value.clamp(min=torch.finfo(x.dtype).tiny)
    return torch.where(value > 0, x * scale, new_value.expand_as(x))


def _corrupt_pixels(x: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    param = SEVERITY_PARAMS[name][severity - 1]
    if name == 'gaussian_noise':
        return _gaussian_noise(x, param, generator)
    if name == 'gaussian_blur':
        return _gaussian_blur(x, param)
    if name == 'contrast':
        return TF.adjust_contrast(x, param)
    if name == 'rotation':
        return TF.rotate(x, param, interpolation=InterpolationMode.BILINEAR, fill=0.0)
    return _brightness(x, param)


def corrupt(
        x: torch.Tensor,
        name: str,
        severity: int,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_index: int = 0,
) -> torch.Tensor:
    """Corrupt a batch of images at a severity.

    Args:
        x: Float ``[B, C, H, W]`` images, normalised ``(pixel - mean) / std`` (or pixels in [0, 1] when ``mean``
            and ``std`` are None).
        name: One of :data:`CORRUPTIONS`.
        severity: 0 (none: ``x`` itself is returned) to :data:`MAX_SEVERITY`.
        seed: Seed of the corruption's randomness (with ``name``, ``severity`` and ``batch_index``).
        mean: The normalisation's mean, one value per channel; None: ``x`` is in pixel space.
        std: The normalisation's standard deviation, one value per channel; None: ``x`` is in pixel space.
        batch_index: The batch's index in its loader, so that each batch draws its own noise.

    Returns:
        The corrupted batch, normalised as ``x`` was, of its shape, dtype and device.

    Raises:
        ValueError: Unknown corruption, severity outside 0..5, ``x`` not a float ``[B, C, H, W]`` tensor, ``mean``
            or ``std`` not one value per channel (or only one of them given), contrast of an image of other than 1
            or 3 channels.
    """
    name = _check_name(name)
    severity = _check_severity(severity)
    seed = _check_seed(seed)
    batch_index = int(check_whole('batch_index', batch_index, 'an integer >= 0', ge=0, numpy=True))
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        what = f'shape {tuple(x.shape)}, dtype {x.dtype}' if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'x must be a float tensor of images [B, C, H, W], got {what}.')
    if (mean is None) != (std is None):
        raise ValueError('mean and std come together: give both (normalised input) or neither (pixels in [0, 1]).')
    num_chans = x.shape[1]
    if name == 'contrast' and num_chans not in (1, 3):
        raise ValueError(f'contrast works on 1- or 3-channel images (grey or RGB), got {num_chans} channels.')
    # float32 at least: torchvision's kernels and the clamping to [0, 1] are too coarse in half precision
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    mean_t = _channel_stats(mean, num_chans, 'mean', work)
    std_t = _channel_stats(std, num_chans, 'std', work)
    if severity == 0:
        return x

    pixels = work if mean_t is None else work * std_t + mean_t
    pixels = _corrupt_pixels(pixels, name, severity, _generator(seed, name, severity, batch_index)).clamp(0, 1)
    out = pixels if mean_t is None else (pixels - mean_t) / std_t
    return out.to(x.dtype)


class CorruptedLoader:
    """A loader of ``(x, target, ...)`` batches whose images are corrupted, each batch with its index in the seed.

    Iterating twice gives the same batches when the wrapped loader does (an evaluation loader, in order).

    Args:
        loader: An iterable of ``(x, target, ...)`` batches, ``x`` as :func:`corrupt` takes it.
        name: One of :data:`CORRUPTIONS`.
        severity: 0 (none) to :data:`MAX_SEVERITY`.
        seed: Seed of the corruption's randomness.
        mean: The loader's normalisation mean, one value per channel; None: pixels in [0, 1].
        std: The loader's normalisation standard deviation, one value per channel; None: pixels in [0, 1].
    """

    def __init__(
            self,
            loader: Iterable,
            name: str,
            severity: int,
            seed: int = 0,
            mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None,
    ):
        # checked now rather than at the first batch
        self.loader = loader
        self.name = _check_name(name)
        self.severity = _check_severity(severity)
        self.seed = _check_seed(seed)
        if (mean is None) != (std is None):
            raise ValueError('mean and std come together: give both (normalised input) or neither (pixels in [0, 1]).')
        self.mean = None if mean is None else tuple(float(v) for v in torch.as_tensor(mean).flatten().tolist())
        self.std = None if std is None else tuple(float(v) for v in torch.as_tensor(std).flatten().tolist())

    def __iter__(self) -> Iterator[tuple]:
        for batch_index, (x, *rest) in enumerate(self.loader):
            yield (corrupt(x, self.name, self.severity, self.seed, self.mean, self.std, batch_index), *rest)

    def __len__(self) -> int:
        # a TypeError, as len() of the loader itself, when it has no length
        return len(self.loader)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.name!r}, severity={self.severity}, seed={self.seed})'
