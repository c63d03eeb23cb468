"""In-memory image sets as tensors, augmented a whole batch at a time.

For small in-memory sources (the embedded digits, MNIST-format IDX folders) decoding one PIL image per sample and
running timm's transforms on it costs more than a small model's step (MNIST at 28 px: 3,560 img/s for the loader).
Here the images live as one uint8 tensor and a training batch is augmented in a few tensor operations: random
resized-crop boxes drawn as timm's ``RandomResizedCropAndInterpolation.get_params`` draws them (area fraction,
log-uniform aspect ratio, 10 attempts, centre-crop fallback), horizontal flips, the resampling of every crop to the
output size as PIL's ``resize`` does it (its bilinear and bicubic kernels, its antialiasing when down-sampling, its
rounding to whole levels after each pass; two batched matrix products, the resampling being separable),
normalisation and, when asked, timm's own ``RandomErasing`` on the normalised batch (as timm erases after
normalising). Evaluation images are passed through timm's own eval transform once and kept as a float tensor, so
evaluation sees exactly what the per-image path gives.

The crop boxes and flips follow the per-image path's distributions and a given crop up-samples to PIL's pixels
within one level (PIL's fixed-point coefficients); both are tested. The random numbers themselves differ, so a run
on this path is not the same run as on the per-image path.

A dataset's ``__getitems__`` returns a whole batch, which ``torch.utils.data.DataLoader`` passes to ``collate_fn``
(here the identity); samplers, ``accelerate.prepare`` and DDP sharding see an ordinary map-style dataset.
Augmentation draws from torch's global generator in the process that iterates (``num_workers=0``), which the
training script reseeds per epoch and process, so a resumed run repeats its epochs and every process crops its own.
"""
import math
from collections.abc import Sequence

import numpy as np
import torch
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset

__all__ = ['BatchAugmentDataset', 'PreprocessedDataset', 'random_resized_crop_boxes', 'resized_crops',
           'batch_collate', 'FAST_INTERPOLATIONS']

# interpolations of timm's data configs that the batched path resamples as PIL does
FAST_INTERPOLATIONS = ('bilinear', 'bicubic')


def batch_collate(batch):
    """``collate_fn`` of datasets whose ``__getitems__`` already returns the batch ``(x, target)``."""
    return batch


def random_resized_crop_boxes(
        num: int,
        height: int,
        width: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3. / 4., 4. / 3.),
        attempts: int = 10,
        generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop boxes of timm's / torchvision's random resized crop, for ``num`` images of one size, drawn at once.

    Each attempt draws an area fraction uniformly in ``scale`` and a log-uniform aspect ratio in ``ratio``, rounds the
    box to whole pixels and keeps the first that fits, at a uniform position; after ``attempts`` misses, the centred
    crop of the largest box within ``ratio``.

    Returns:
        ``[num, 4]`` int64 tensor of ``(top, left, height, width)``.
    """
    area = height * width
    u_area = torch.rand(num, attempts, generator=generator, dtype=torch.float64)
    u_ratio = torch.rand(num, attempts, generator=generator, dtype=torch.float64)
    target_area = (scale[0] + (scale[1] - scale[0]) * u_area) * area
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # round half to even, as Python's round
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.long().argmax(1), -1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    rows = torch.arange(num)
    found = first >= 0
    pick = first.clamp(min=0)
    h = torch.where(found, h[rows, pick], torch.full((num,), fb_h))
    w = torch.where(found, w[rows, pick], torch.full((num,), fb_w))
    # uniform integer positions in [0, size - box], inclusive as random.randint
    u_top = torch.rand(num, generator=generator, dtype=torch.float64)
    u_left = torch.rand(num, generator=generator, dtype=torch.float64)
    top = torch.where(found, (u_top * (height - h + 1)).floor().long(), torch.full((num,), (height - fb_h) // 2))
    left = torch.where(found, (u_left * (width - w + 1)).floor().long(), torch.full((num,), (width - fb_w) // 2))
    return torch.stack([top, left, h, w], dim=1)


def _pil_filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's resampling kernels (``Resample.c``): the triangle, and the cubic with a = -0.5."""
    x = x.abs()
    if interpolation == 'bilinear':
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


_FILTER_SUPPORT = {'bilinear': 1.0, 'bicubic': 2.0}


def resize_weights(
        start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, interpolation: str,
) -> torch.Tensor:
    """Per-sample matrices that resample the span ``[start, start + length)`` of ``in_size`` pixels to ``out_size``,
    as PIL's ``resize`` of that crop does along one axis.

    PIL maps output pixel ``o`` to the centre ``(o + 0.5) * scale`` of the crop (``scale = length / out_size``),
    weighs the crop's pixels with its kernel stretched by ``max(scale, 1)`` (the antialiasing of down-sampling) and
    normalises the weights of each output pixel over the pixels inside the crop.

    Returns:
        ``[B, out_size, in_size]`` float32.
    """
    start = start.double()[:, None, None]
    length = length.double()[:, None, None]
    scale = length / out_size
    filter_scale = scale.clamp(min=1.0)
    centre = start + (torch.arange(out_size, dtype=torch.float64)[None, :, None] + 0.5) * scale
    pixel = torch.arange(in_size, dtype=torch.float64)[None, None, :]
    weights = _pil_filter((pixel - centre + 0.5) / filter_scale, interpolation)
    # PIL's support window, [int(centre - support + 0.5), int(centre + support + 0.5)), cut to the crop
    support = _FILTER_SUPPORT[interpolation] * filter_scale
    lo = torch.maximum(torch.trunc(centre - support + 0.5), start)
    hi = torch.minimum(torch.trunc(centre + support + 0.5), start + length)
    weights = weights * ((pixel >= lo) & (pixel < hi))
    return (weights / weights.sum(-1, keepdim=True)).float()


def resized_crops(
        images: torch.Tensor,
        boxes: torch.Tensor,
        size: tuple[int, int],
        flip: torch.Tensor | None = None,
        interpolation: str = 'bilinear',
        weight_tables: dict | None = None,
) -> torch.Tensor:
    """Crop ``boxes`` out of ``images`` and resample each crop to ``size`` as PIL does, flipping where ``flip`` is set.

    Two matrix products per batch (the resampling is separable): the horizontal pass, then the vertical, each
    rounded (halves up) and clipped to whole levels 0-255 as PIL's 8-bit passes are. PIL's fixed-point coefficients
    can make a pixel differ by one level; when down-sampling, newer Pillows may run the vertical pass first, which
    moves a few clipped pixels by more.

    Args:
        images: ``[B, H, W]`` float tensor of pixel values 0-255.
        boxes: ``[B, 4]`` ``(top, left, height, width)`` in pixels.
        size: Output ``(height, width)``.
        flip: ``[B]`` bool, mirror the resized crop horizontally.
        interpolation: 'bilinear' or 'bicubic'.
        weight_tables: A dict to cache the resampling matrices of every possible span in (the images of a dataset
            share one size, so a table of ``(in + 1)^2`` matrices per axis replaces computing them per batch).

    Returns:
        ``[B, size[0], size[1]]`` float tensor, 0-255.
    """
    _, height, width = images.shape
    top, left, box_h, box_w = boxes.unbind(1)
    wx = _span_weights(left, box_w, width, size[1], interpolation, weight_tables)  # [B, out_w, W]
    wy = _span_weights(top, box_h, height, size[0], interpolation, weight_tables)  # [B, out_h, H]
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    rows = _to_levels(torch.bmm(images, wx.transpose(1, 2)))  # [B, H, out_w]
    return _to_levels(torch.bmm(wy, rows))


def _to_levels(x: torch.Tensor) -> torch.Tensor:
    # PIL's 8-bit passes round halves up (floor(x + 0.5)), then clip
    return x.add_(0.5).floor_().clamp_(0, 255)


def _span_weights(start, length, in_size, out_size, interpolation, tables: dict | None) -> torch.Tensor:
    if tables is None:
        return resize_weights(start, length, in_size, out_size, interpolation)
    key = (in_size, out_size, interpolation)
    if key not in tables:
        starts, lengths = torch.meshgrid(torch.arange(in_size + 1), torch.arange(in_size + 1), indexing='ij')
        # spans that leave the image are never drawn; their rows are left at zero
        valid = (lengths > 0) & (starts + lengths <= in_size)
        table = torch.zeros(in_size + 1, in_size + 1, out_size, in_size)
        table[valid] = resize_weights(starts[valid], lengths[valid], in_size, out_size, interpolation)
        tables[key] = table
    return tables[key][start, length]


class BatchAugmentDataset(Dataset):
    """uint8 images ``[N, H, W]`` with timm's training augmentation (random resized crop, horizontal flip,
    normalisation, random erasing) applied a batch at a time by ``__getitems__``.

    Args:
        images: uint8 ``[N, H, W]`` (grayscale) tensor or array.
        targets: N integer labels.
        input_size: ``(C, H, W)`` of the output; C of 3 repeats the gray channel, as a PIL 'RGB' conversion does.
        mean: Per-channel mean of the normalisation (0-1 scale).
        std: Per-channel standard deviation.
        scale: Area range of the random resized crop.
        ratio: Aspect-ratio range of the random resized crop.
        hflip: Horizontal flip probability.
        interpolation: 'bilinear' or 'bicubic'.
        re_prob: Probability that timm's ``RandomErasing`` erases boxes of an image (0: off).
        re_mode: Its fill: 'pixel' (per-pixel normal noise), 'rand' (one normal colour per box) or 'const' (zeros).
        re_count: Its maximum number of boxes per image.
    """

    def __init__(
            self,
            images,
            targets,
            input_size: Sequence[int],
            mean: Sequence[float],
            std: Sequence[float],
            scale: Sequence[float] = (0.08, 1.0),
            ratio: Sequence[float] = (3. / 4., 4. / 3.),
            hflip: float = 0.5,
            interpolation: str = 'bilinear',
            re_prob: float = 0.,
            re_mode: str = 'pixel',
            re_count: int = 1,
    ):
        # a copy: IDX arrays are read-only views of the file's bytes
        self.images = images.clone() if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        if self.images.dtype != torch.uint8 or self.images.ndim != 3:
            raise ValueError(f'Expected uint8 images [N, H, W], got {self.images.dtype} {tuple(self.images.shape)}.')
        if interpolation not in FAST_INTERPOLATIONS:
            raise ValueError(f'Unknown interpolation {interpolation!r}, expected one of {list(FAST_INTERPOLATIONS)}.')
        self.channels, self.size = int(input_size[0]), (int(input_size[1]), int(input_size[2]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.scale, self.ratio, self.hflip, self.interpolation = tuple(scale), tuple(ratio), hflip, interpolation
        self._weight_tables: dict = {}
        # timm's own, on the normalised batch as timm applies it; it draws from Python's and torch's global
        # generators, which the training script seeds per epoch, as it does the crops
        self.random_erasing = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device='cpu') \
            if re_prob > 0 else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images[index].float()  # [B, H, W]
        boxes = random_resized_crop_boxes(len(index), images.shape[1], images.shape[2], self.scale, self.ratio)
        flip = torch.rand(len(index)) < self.hflip
        x = resized_crops(images, boxes, self.size, flip, self.interpolation, self._weight_tables).unsqueeze(1)
        if self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        x = (x - self.mean) / self.std
        if self.random_erasing is not None:
            x = self.random_erasing(x)  # in place, image by image; x is this batch's own tensor
        return x, self.targets[index]

    def __getitem__(self, index: int):
        x, y = self.__getitems__([index])
        return x[0], int(y[0])


class PreprocessedDataset(Dataset):
    """The samples of a dataset whose transform is deterministic (timm's eval transform), computed once and kept as
    one tensor.

    Args:
        dataset: Map-style dataset yielding ``(tensor, label)``.
    """

    def __init__(self, dataset: Dataset):
        samples = [dataset[i] for i in range(len(dataset))]
        self.inputs = torch.stack([x for x, _ in samples]) if samples else torch.empty(0)
        self.targets = torch.tensor([int(y) for _, y in samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.inputs[index], self.targets[index]

    def __getitem__(self, index: int):
        return self.inputs[index], int(self.targets[index])
