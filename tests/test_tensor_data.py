"""The batched in-memory path against timm's per-image transforms: same crop-box and flip distributions, the same
pixels for a given crop, exact evaluation inputs, seeded batches."""
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from timm_ensembles import data as te_data
from timm_ensembles.data.tensors import (
    BatchAugmentDataset,
    PreprocessedDataset,
    random_resized_crop_boxes,
    resized_crops,
)


def _total_variation(a: np.ndarray, b: np.ndarray) -> float:
    values = np.union1d(a, b)
    pa = np.array([(a == v).mean() for v in values])
    pb = np.array([(b == v).mean() for v in values])
    return 0.5 * float(np.abs(pa - pb).sum())


@pytest.mark.parametrize('size, scale, ratio', [
    ((28, 28), (0.5, 1.0), (3 / 4, 4 / 3)),
    ((28, 28), (0.08, 1.0), (3 / 4, 4 / 3)),
    ((8, 8), (0.5, 1.0), (3 / 4, 4 / 3)),
    ((6, 30), (0.6, 1.0), (3 / 4, 4 / 3)),  # wide: most attempts miss, the centred fallback is drawn often
])
def test_crop_boxes_follow_timms_distribution(size, scale, ratio):
    n = 20000
    height, width = size
    img = Image.new('L', (width, height))
    def timm_boxes(seed):
        random.seed(seed)
        return np.array([RandomResizedCropAndInterpolation.get_params(img, scale, ratio) for _ in range(n)])

    ref, ref2 = timm_boxes(0), timm_boxes(1)
    gen = torch.Generator().manual_seed(0)
    ours = random_resized_crop_boxes(n, height, width, scale, ratio, generator=gen).numpy()
    assert ours.shape == (n, 4) and (ours[:, 2] >= 1).all() and (ours[:, 3] >= 1).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    # every marginal (top, left, height, width) and the joint box size differ from timm's draws no more than two
    # samples of timm's own do (the sampling noise of 20,000 draws)
    joint = lambda a: a[:, 2] * 1000 + a[:, 3]  # noqa: E731
    for pick in (*(lambda a, k=k: a[:, k] for k in range(4)), joint):
        noise = _total_variation(pick(ref), pick(ref2))
        assert _total_variation(pick(ref), pick(ours)) <= 1.5 * noise + 0.005
    # the same support: no box size drawn 10 times by one path is missing from the other
    for a, b in ((ours, ref), (ref, ours)):
        sizes, counts = np.unique(joint(a), return_counts=True)
        assert set(sizes[counts >= 10]) <= set(joint(b))


def test_fallback_is_the_centred_crop():
    # no box of area >= 0.99 fits a 4x40 image within aspect 3/4..4/3: every draw is the fallback
    boxes = random_resized_crop_boxes(50, 4, 40, (0.99, 1.0), (3 / 4, 4 / 3))
    img = Image.new('L', (40, 4))
    expected = RandomResizedCropAndInterpolation.get_params(img, (0.99, 1.0), (3 / 4, 4 / 3))
    assert expected == (0, 17, 4, 5)
    assert (boxes == torch.tensor(expected)).all()


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('out', [28, 32, 16])
def test_a_crop_resamples_to_pils_pixels(interpolation, out):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    images[:8] = np.clip(np.arange(28)[None, :] * 9, 0, 255)  # smooth ramps too
    gen = torch.Generator().manual_seed(1)
    boxes = random_resized_crop_boxes(64, 28, 28, (0.08, 1.0), (3 / 4, 4 / 3), generator=gen)
    flip = torch.arange(64) % 3 == 0
    ours = resized_crops(torch.from_numpy(images).float(), boxes, (out, out), flip, interpolation)
    mode = TF.InterpolationMode(interpolation)
    diffs = []
    for k in range(64):
        top, left, h, w = boxes[k].tolist()
        ref = TF.resized_crop(Image.fromarray(images[k]), top, left, h, w, [out, out], mode)
        if flip[k]:
            ref = TF.hflip(ref)
        diffs.append(np.abs(ours[k].numpy() - np.asarray(ref, dtype=np.float32)))
    diffs = np.stack(diffs)
    if out >= 28:  # up-sampling (every crop of a 28 px image): PIL's fixed-point coefficients, one level at most
        assert diffs.max() <= 1 and (diffs > 0).mean() < 0.02
    else:  # down-sampling: newer Pillows may run the vertical pass first, which moves a few clipped pixels
        assert diffs.mean() < 0.1 and (diffs > 1).mean() < 0.01


def test_flips_mirror_the_crop_at_the_requested_rate():
    torch.manual_seed(0)
    images = torch.rand(4, 10, 10) * 255
    boxes = torch.tensor([[1, 2, 7, 6]] * 4)
    plain = resized_crops(images, boxes, (12, 12), torch.zeros(4, dtype=torch.bool))
    mirrored = resized_crops(images, boxes, (12, 12), torch.ones(4, dtype=torch.bool))
    assert torch.equal(mirrored, plain.flip(-1))
    ds = BatchAugmentDataset(np.zeros((20000, 4, 4), np.uint8), np.zeros(20000), (1, 4, 4), (0.,), (1.,), hflip=0.3)
    torch.manual_seed(0)
    # a one-pixel-wide bright column shows which way the crop came out
    ds.images[:, :, 0] = 255
    ds.scale = (1.0, 1.0)
    ds.ratio = (1.0, 1.0)
    x, _ = ds.__getitems__(list(range(20000)))
    flipped = (x[:, 0, :, -1] > 0.5).all(1).float().mean().item()
    assert flipped == pytest.approx(0.3, abs=0.015)


def _idx_sets(tmp_path, n_train=300, n_test=50, side=12):
    rng = np.random.default_rng(0)
    folder = tmp_path / 'idx'
    folder.mkdir()
    for stem, n in (('train', n_train), ('t10k', n_test)):
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        header = (0x803).to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in images.shape)
        (folder / f'{stem}-images-idx3-ubyte').write_bytes(header + images.tobytes())
        (folder / f'{stem}-labels-idx1-ubyte').write_bytes((0x801).to_bytes(4, 'big') + n.to_bytes(4, 'big')
                                                           + labels.tobytes())
    return te_data.create_datasets(f'idx:{folder}')


@pytest.mark.parametrize('chans', [1, 3])
def test_loaders_of_in_memory_sets_take_the_batched_path(tmp_path, chans):
    train_ds, val_ds, _ = _idx_sets(tmp_path)
    cfg = dict(input_size=(chans, 16, 16), interpolation='bicubic', mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7),
               crop_pct=1.0)
    train_loader, val_loader = te_data.create_loaders(train_ds, val_ds, cfg, batch_size=32, workers=2, hflip=0.5)
    assert isinstance(train_loader.dataset, BatchAugmentDataset) and train_loader.num_workers == 0
    assert isinstance(val_loader.dataset, PreprocessedDataset) and val_loader.num_workers == 0
    assert len(train_loader) == 300 // 32
    # evaluation inputs are exactly those of timm's eval transform, in order
    xs, ys = zip(*val_loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (50, chans, 16, 16)
    assert torch.equal(x, torch.stack([val_ds[i][0] for i in range(50)]))
    assert y.tolist() == val_ds.targets.tolist()
    # training batches: shape, labels in sampler order, normalisation per channel; seeded like the per-image path
    torch.manual_seed(3)
    a = list(train_loader)
    torch.manual_seed(3)
    train_loader.generator.manual_seed(0)
    b = list(train_loader)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    x, y = a[0]
    assert x.shape == (32, chans, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    mean, std = (0.2, 0.3, 0.4)[:chans] if chans == 3 else (0.3,), (0.5, 0.6, 0.7)[:chans] if chans == 3 else (0.6,)
    for c in range(chans):
        levels = x[:, c] * std[c] * 255 + mean[c] * 255
        assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.min() >= -1e-3 and levels.max() <= 255.001
    if chans == 3:  # the gray image stands for three equal channels
        assert torch.allclose(x[:, 0] * 0.5 + 0.2, x[:, 1] * 0.6 + 0.3, atol=1e-5)
    # the labels are those of the samples the sampler drew
    seen = []
    getitems = train_loader.dataset.__getitems__
    train_loader.dataset.__getitems__ = lambda idx: (seen.append(list(idx)), getitems(idx))[1]
    x, y = next(iter(train_loader))
    assert [int(train_ds.targets[i]) for i in seen[0]] == y.tolist() and len(set(seen[0])) == 32


def test_other_sources_and_transforms_keep_the_per_image_path(tmp_path):
    train_ds, val_ds, _ = _idx_sets(tmp_path)
    cfg = dict(input_size=(1, 16, 16), interpolation='nearest', mean=(0.5,), std=(0.5,), crop_pct=1.0)
    train_loader, val_loader = te_data.create_loaders(train_ds, val_ds, cfg, batch_size=32, workers=0)
    assert train_loader.dataset is train_ds  # no batched nearest resampling: timm's transform per image
    assert isinstance(val_loader.dataset, PreprocessedDataset)  # evaluation is deterministic whatever the mode
    cfg['interpolation'] = 'bilinear'
    train_loader, _ = te_data.create_loaders(train_ds, val_ds, cfg, batch_size=32, workers=0,
                                             train_transform=lambda img: TF.to_tensor(img))
    assert train_loader.dataset is train_ds
    train_loader, _ = te_data.create_loaders(train_ds, val_ds, cfg, batch_size=32, workers=0, train_transform=False)
    assert isinstance(train_loader.dataset, PreprocessedDataset)


def _erasing_batches(re_prob, re_mode='pixel', n=64, seed=0):
    """One batch of the same images, crops and flips, with and without timm's random erasing."""
    images = np.random.default_rng(0).integers(1, 256, (n, 12, 12), dtype=np.uint8)
    batches = []
    for prob in (0., re_prob):
        ds = BatchAugmentDataset(images, np.zeros(n), (3, 16, 16), (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), scale=(0.5, 1.0),
                                 re_prob=prob, re_mode=re_mode)
        torch.manual_seed(seed)
        random.seed(seed)
        batches.append(ds.__getitems__(list(range(n)))[0])
    return batches


@pytest.mark.parametrize('re_mode', ['pixel', 'const'])
def test_batch_random_erasing_erases_one_box_of_every_image_at_reprob_1(re_mode):
    plain, erased = _erasing_batches(1.0, re_mode)
    boxes = []
    for k in range(len(plain)):
        changed = (plain[k] != erased[k]).any(0)  # [H, W]
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        assert len(rows) and len(cols), f'image {k} was not erased'
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        # one box, nothing outside it; about 2% to a third of the image (timm's areas, in whole pixels)
        assert changed[top:bottom, left:right].all() and changed.sum() == (bottom - top) * (right - left)
        assert 3 <= changed.sum() <= 100
        boxes.append(erased[k][:, top:bottom, left:right].flatten())
    boxes = torch.cat(boxes)
    if re_mode == 'const':
        assert (boxes == 0).all()
    else:  # timm's per-pixel standard normal noise, in every channel
        assert abs(boxes.mean()) < 0.1 and 0.9 < boxes.std() < 1.1


def test_batch_random_erasing_follows_reprob_and_the_seed():
    plain, erased = _erasing_batches(0., n=32)
    assert torch.equal(plain, erased)  # reprob 0: the batch is the batch without erasing
    plain, erased = _erasing_batches(0.3, n=4000)
    rate = (plain != erased).flatten(1).any(1).float().mean().item()
    assert rate == pytest.approx(0.3, abs=0.03)
    _, again = _erasing_batches(0.3, n=4000)
    assert torch.equal(erased, again)  # the same seeds give the same boxes and noise
    _, other = _erasing_batches(0.3, n=4000, seed=1)
    assert not torch.equal(erased, other)


@pytest.mark.parametrize('chans', [1, 3])
def test_auto_augment_and_colour_jitter_take_timms_per_image_transform(tmp_path, chans, caplog):
    """RandAugment and colour jitter are PIL operations drawn per image: in-memory sets leave the batched path for
    timm's transform (which works on gray 'L' images too); random erasing alone stays batched."""
    train_ds, val_ds, _ = _idx_sets(tmp_path)
    cfg = dict(input_size=(chans, 16, 16), interpolation='bicubic', mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7),
               crop_pct=1.0)
    for kwargs, name in ((dict(auto_augment='rand-m9-mstd0.5-inc1'), 'RandAugment'),
                         (dict(color_jitter=0.4), 'ColorJitter')):
        caplog.clear()
        with caplog.at_level('INFO', logger='timm_ensembles.data'):
            train_loader, val_loader = te_data.create_loaders(train_ds, val_ds, cfg, batch_size=32, workers=0,
                                                              re_prob=0.5, **kwargs)
        assert train_loader.dataset is train_ds
        names = [type(t).__name__ for t in train_ds.transform.transforms]
        assert name in names and names[-1] == 'RandomErasing'
        assert "per-image transform" in caplog.text and len(caplog.records) == 1
        torch.manual_seed(0)
        x, y = next(iter(train_loader))
        assert x.shape == (32, chans, 16, 16) and torch.isfinite(x).all()
        assert isinstance(val_loader.dataset, PreprocessedDataset)  # evaluation as before
    train_loader, _ = te_data.create_loaders(train_ds, val_ds, cfg, batch_size=32, workers=0, re_prob=0.5,
                                             re_mode='rand', re_count=2)
    fast = train_loader.dataset
    assert isinstance(fast, BatchAugmentDataset)
    erasing = fast.random_erasing
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.5, 'rand', 2)
