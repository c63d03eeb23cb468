"""Tests of timm_ensembles.data: the embedded digits, IDX folders, timm sources, subsets and loaders."""
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_ensembles.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    DatasetInfo,
    SubsetDataset,
    create_datasets,
    create_loaders,
    is_embedded,
    read_idx,
    split_holdout,
)

# 2 train images of 3x4 and 3 test images, small enough to check by hand
TRAIN_IMAGES = np.array([
    [[0, 1, 2, 3], [10, 20, 30, 40], [100, 150, 200, 255]],
    [[255, 254, 253, 252], [0, 0, 0, 0], [7, 8, 9, 11]],
], dtype=np.uint8)
TRAIN_LABELS = np.array([3, 0], dtype=np.uint8)
TEST_IMAGES = np.array([
    [[5, 5, 5, 5], [6, 6, 6, 6], [7, 7, 7, 7]],
    [[9, 0, 9, 0], [0, 9, 0, 9], [9, 0, 9, 0]],
    [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]],
], dtype=np.uint8)
TEST_LABELS = np.array([1, 2, 1], dtype=np.uint8)


def _idx_bytes(array: np.ndarray) -> bytes:
    # magic: two zero bytes, 0x08 (unsigned byte), number of dimensions; then big-endian uint32 sizes
    header = struct.pack('>I', 0x0800 | array.ndim) + b''.join(struct.pack('>I', s) for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path, data: bytes, gz: bool):
    path = f'{path}.gz' if gz else str(path)
    with (gzip.open if gz else open)(path, 'wb') as f:
        f.write(data)
    return path


def _write_idx_folder(folder, gz=False, train=(TRAIN_IMAGES, TRAIN_LABELS), test=(TEST_IMAGES, TEST_LABELS)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for prefix, (images, labels) in (('train', train), ('t10k', test)):
        paths[f'{prefix}-images'] = _write(folder / f'{prefix}-images-idx3-ubyte', _idx_bytes(images), gz)
        paths[f'{prefix}-labels'] = _write(folder / f'{prefix}-labels-idx1-ubyte', _idx_bytes(labels), gz)
    return paths


def _config(input_size, mean, std, crop_pct=1.0, interpolation='bilinear'):
    return dict(
        input_size=input_size, interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct,
        crop_mode='center')


# --- embedded digits


@pytest.fixture(scope='module')
def digits():
    return create_datasets()


def test_is_embedded():
    assert is_embedded(None) and is_embedded('') and is_embedded('digits') and is_embedded(' Digits ')
    assert not is_embedded('fashion-mnist') and not is_embedded('torch/cifar10') and not is_embedded('idx:/x')


def test_digits_split_and_info(digits):
    train_ds, val_ds, info = digits
    assert (len(train_ds), len(val_ds)) == (1437, 360)
    assert info == DatasetInfo('digits', 10, [str(i) for i in range(10)], 32, 0.)
    img, label = train_ds[0]
    assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (8, 8)
    assert isinstance(label, int) and 0 <= label < 10
    # '' and 'digits' name the same data
    train2, val2, info2 = create_datasets('', img_mode='L')
    assert info2 == info
    img2 = train2[0][0]
    assert img2.mode == 'L'
    np.testing.assert_array_equal(np.asarray(img)[..., 0], np.asarray(img2))


def test_digits_stratified_and_complete(digits):
    from sklearn.datasets import load_digits
    train_ds, val_ds, _ = digits
    full = load_digits()
    total = np.bincount(full.target, minlength=10)
    val_counts = np.bincount(val_ds.targets, minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * total) <= 1)
    np.testing.assert_array_equal(np.bincount(train_ds.targets, minlength=10) + val_counts, total)
    # the two splits together are exactly the 1797 images, scaled 0..16 -> 0..255
    scaled = np.rint(full.images * 255 / 16).astype(np.uint8)
    assert scaled.max() == 255 and set(np.unique(scaled)) <= {round(v * 255 / 16) for v in range(17)}
    together = sorted(im.tobytes() for im in np.concatenate([train_ds.images, val_ds.images]))
    assert together == sorted(im.tobytes() for im in scaled)


def test_digits_deterministic(digits):
    train_ds, val_ds, _ = digits
    train2, val2, _ = create_datasets('digits')
    np.testing.assert_array_equal(train_ds.targets, train2.targets)
    np.testing.assert_array_equal(val_ds.images, val2.images)


# --- IDX folders


def test_read_idx_by_hand(tmp_path):
    path = tmp_path / 'images'
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes([0, 1, 2, 3, 4, 5, 250, 251, 252,
                                                                                     253, 254, 255]))
    images = read_idx(str(path))
    assert images.dtype == np.uint8 and images.shape == (2, 2, 3)
    assert images[0, 1, 2] == 5 and images[1, 0, 0] == 250 and images[1, 1, 2] == 255
    labels_path = tmp_path / 'labels'
    labels_path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    assert read_idx(str(labels_path)).tolist() == [7, 0, 9]


@pytest.mark.parametrize('gz', [False, True])
def test_idx_folder_round_trip(tmp_path, gz):
    folder = tmp_path / 'my-digits'
    _write_idx_folder(folder, gz=gz)
    for name in (f'idx:{folder}', str(folder)):
        train_ds, val_ds, info = create_datasets(name, img_mode='L')
        assert info == DatasetInfo(f'idx:{folder}', 4, ['0', '1', '2', '3'], 32, 0.)
        assert (len(train_ds), len(val_ds)) == (2, 3)
        img, label = train_ds[0]
        assert img.mode == 'L' and img.size == (4, 3) and label == 3
        assert np.asarray(img)[2, 3] == 255 and np.asarray(img)[1, 2] == 30
        assert np.asarray(train_ds[1][0])[0, 0] == 255 and train_ds[1][1] == 0
        assert [val_ds[i][1] for i in range(3)] == [1, 2, 1]
        np.testing.assert_array_equal(np.asarray(val_ds[2][0]), TEST_IMAGES[2])
    # RGB repeats the gray value in each channel
    train_ds, _, _ = create_datasets(f'idx:{folder}')
    rgb = np.asarray(train_ds[0][0])
    assert rgb.shape == (3, 4, 3) and rgb[2, 2].tolist() == [200, 200, 200]


def test_idx_folder_splits(tmp_path):
    folder = tmp_path / 'd'
    _write_idx_folder(folder)
    train_ds, val_ds, _ = create_datasets(f'idx:{folder}', train_split='t10k', val_split='train')
    assert (len(train_ds), len(val_ds)) == (3, 2)
    with pytest.raises(ValueError, match=r"Split 'extra' does not exist.*'train' or 'validation'"):
        create_datasets(f'idx:{folder}', val_split='extra')


def test_idx_fashion_names(tmp_path):
    folder = tmp_path / 'Fashion-small'
    _write_idx_folder(folder, gz=True)
    # the alias reads root when given, and gives Fashion-MNIST's names and flips (a folder's name does not)
    _, _, info = create_datasets('fashion-mnist', root=str(folder))
    assert info.name == f'idx:{folder}' and info.num_classes == 10
    assert info.class_names == list(FASHION_MNIST_CLASSES) and info.default_hflip == 0.5
    _, _, info = create_datasets(f'idx:{folder}')
    assert info.class_names == ['0', '1', '2', '3'] and info.default_hflip == 0.0  # the folder's 4 classes


def test_idx_bad_magic(tmp_path):
    folder = tmp_path / 'd'
    paths = _write_idx_folder(folder)
    path = Path(paths['train-images'])
    data = bytearray(path.read_bytes())
    data[3] = 2  # 0x00000802
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r'Bad magic number 0x00000802 in IDX file .*train-images-idx3-ubyte.*0x0+803'):
        create_datasets(f'idx:{folder}')
    # a labels file where images are expected
    path.write_bytes(_idx_bytes(TRAIN_LABELS))
    with pytest.raises(ValueError, match=r'Bad magic number 0x00000801 .*expected 0x00000803 \(images\)'):
        create_datasets(f'idx:{folder}')


@pytest.mark.parametrize('gz', [False, True])
def test_idx_truncated(tmp_path, gz):
    folder = tmp_path / 'd'
    paths = _write_idx_folder(folder, gz=gz)
    path = Path(paths['t10k-images'])
    path.write_bytes(path.read_bytes()[:-5])
    match = r't10k-images-idx3-ubyte\.gz is not a valid gzip file or is truncated' if gz else \
        r't10k-images-idx3-ubyte is truncated: its header says shape \(3, 3, 4\) \(52 bytes\) but it has 47 bytes'
    with pytest.raises(ValueError, match=match):
        create_datasets(f'idx:{folder}')
    # too short for the header
    Path(paths['t10k-labels']).write_bytes(gzip.compress(b'\0\0\x08') if gz else b'\0\0\x08\x01\0\0')
    with pytest.raises(ValueError, match=r't10k-labels-idx1-ubyte(\.gz)? is truncated'):
        read_idx(paths['t10k-labels'])


def test_idx_count_mismatch(tmp_path):
    folder = tmp_path / 'd'
    _write_idx_folder(folder, train=(TRAIN_IMAGES, np.array([1, 2, 3], dtype=np.uint8)))
    with pytest.raises(ValueError, match=r'count mismatch: .*train-images-idx3-ubyte holds 2 images but '
                                         r'.*train-labels-idx1-ubyte holds 3 labels'):
        create_datasets(str(folder))


def test_idx_missing_file(tmp_path):
    folder = tmp_path / 'd'
    paths = _write_idx_folder(folder)
    os.remove(paths['t10k-labels'])
    with pytest.raises(FileNotFoundError, match=r'has no t10k-labels-idx1-ubyte \(nor t10k-labels-idx1-ubyte\.gz\)'):
        create_datasets(str(folder))


def test_missing_paths(tmp_path):
    missing = tmp_path / 'nowhere'
    for name in (str(missing), f'idx:{missing}'):
        with pytest.raises(FileNotFoundError) as e:
            create_datasets(name)
        msg = str(e.value)
        assert str(missing) in msg
        for form in ("'digits'", "'fashion-mnist'", "'idx:<folder>'", 'IDX files', "'torch/cifar10'", '--data-dir'):
            assert form in msg
    with pytest.raises(FileNotFoundError, match='does not exist'):
        create_datasets('fashion-mnist', root=str(missing))
    with pytest.raises(FileNotFoundError, match=r"'cifar10' with --data-dir"):
        create_datasets('cifar10', root=str(missing))
    with pytest.raises(ValueError, match=r'torch/cifar10 needs --data-dir'):
        create_datasets('torch/cifar10')


def test_folder_neither_idx_nor_images(tmp_path):
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    (tmp_path / 'empty' / 'notes.txt').write_text('no images here')
    with pytest.raises(ValueError, match=r'empty holds no images \(timm reads .png, .jpg, .jpeg\) and no MNIST'):
        create_datasets(str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match=r'is a file; expected a folder'):
        create_datasets(str(tmp_path / 'empty' / 'notes.txt'))


# --- timm sources (offline)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (('train', 3), ('validation', 2)):
        for cls in ('cat', 'dog'):
            (tmp_path / 'pets' / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(
                    tmp_path / 'pets' / split / cls / f'{i}.png')
    train_ds, val_ds, info = create_datasets(str(tmp_path / 'pets'), img_mode='L')
    assert (len(train_ds), len(val_ds)) == (6, 4)
    assert info.num_classes == 2 and info.class_names == ['cat', 'dog'] and info.default_img_size is None
    assert info.default_hflip == 0.5
    img, label = val_ds[3]
    assert img.mode == 'L' and label == 1
    # a bare name with --data-dir reads the folder, as timm's train.py does
    _, _, info2 = create_datasets('pets', root=str(tmp_path / 'pets'))
    assert info2.class_names == ['cat', 'dog']
    train_loader, val_loader = create_loaders(
        train_ds, val_ds, _config((3, 8, 8), (0.5,) * 3, (0.5,) * 3), batch_size=4, workers=0)
    x, y = next(iter(val_loader))
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]
    assert len(train_loader) == 1  # 6 samples, batch 4, last partial batch dropped


def _image_folder(root, layout: dict[str, tuple[str, ...]], count=2):
    """``root/<split>/<class>/<i>.png``: ``count`` tiny images per class folder of ``layout`` (split -> classes)."""
    for split, classes in layout.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(np.full((4, 4, 3), 50 * i, dtype=np.uint8)).save(root / split / cls / f'{i}.png')
    return root


def test_no_name_with_a_folder_reads_it_as_timm_does(tmp_path):
    """timm's train.py reads --data-dir with its default --dataset '': here too, and the embedded digits only when
    neither names data; timm's split synonyms (val for validation) find the split folders."""
    pets = _image_folder(tmp_path / 'pets', {'train': ('cat', 'dog'), 'val': ('cat', 'dog')}, count=3)
    for name in (None, '', '  '):
        train_ds, val_ds, info = create_datasets(name, root=str(pets))
        assert (len(train_ds), len(val_ds)) == (6, 6)
        assert info.name == str(pets) and info.class_names == ['cat', 'dog'] and info.num_classes == 2
        assert info.split_paths == (str(pets / 'train'), str(pets / 'val'))
    idx = tmp_path / 'idx'
    _write_idx_folder(idx)
    assert create_datasets('', root=str(idx))[2].name == f'idx:{idx}'
    assert create_datasets(None)[2].name == 'digits'
    assert create_datasets('digits', root=str(pets))[2].name == 'digits'  # a name of its own never reads the folder


@pytest.mark.parametrize('layout, splits, message', [
    # timm falls back to the root for a split folder that does not exist: training images would validate
    ({'train': ('cat', 'dog'), 'validation': ('cat', 'dog')}, dict(val_split='valdation'),
     r"--val-split 'valdation': \S+ has no 'valdation' folder; the folders there are train, validation: name the"
     r' split folders with --train-split and --val-split \(timm would read the whole folder in its place'),
    ({'.': ('cat', 'dog')}, {}, r"--train-split 'train': \S+ has no 'train' folder; its folders \(cat, dog\) are"
                                r' class folders, and class folders alone have no validation split'),
    ({'train': ('cat', 'dog'), 'validation': ('cat',)}, {},
     r"the splits hold different classes: \S+/validation has no class folder 'dog'\. Training and validation need"),
    ({'train': ('cat', 'dog'), 'validation': ('cat', 'dog', 'cow')}, {},
     r"the splits hold different classes: \S+/train has no class folder 'cow'"),
    ({'train': ('cat',), 'validation': ('cat',)}, {},
     r"\S+/train holds one class only \('cat'\): a classifier needs two or more class folders in each split"),
    ({'train': ('cat', 'dog'), 'validation': ('cat', 'dog')}, dict(val_split='.'),
     r"--val-split '\.' \(\S+\): the validation folder contains the training folder, so both would read the same"),
    ({'train': ('cat', 'dog'), 'validation': ('cat', 'dog')}, dict(train_split='.'),
     r'the training folder contains the validation folder'),
    ({'train': ('cat', 'dog'), 'validation': ('cat', 'dog')}, dict(train_split='val'),
     r"--train-split 'val' and --val-split 'validation' are the same folder"),
])
def test_image_folder_splits_that_would_leak_or_differ_are_refused(tmp_path, layout, splits, message):
    root = _image_folder(tmp_path / 'data', layout)
    with pytest.raises(ValueError, match=message) as e:
        create_datasets('', root=str(root), **splits)
    assert '\n' not in str(e.value)


def test_an_empty_class_folder_is_named(tmp_path):
    root = _image_folder(tmp_path / 'data', {'train': ('cat', 'dog'), 'validation': ('cat', 'dog')})
    for png in (root / 'train' / 'dog').iterdir():
        png.unlink()
    (root / 'validation' / '.ipynb_checkpoints').mkdir()  # hidden and empty: no class for timm, no error
    with pytest.raises(ValueError, match=rf"--train-split 'train': the class folder {root}/train/dog holds no images"):
        create_datasets('', root=str(root))


def test_torch_mnist_offline(tmp_path):
    # torchvision's MNIST reads the raw IDX files from <root>/MNIST/raw
    _write_idx_folder(tmp_path / 'MNIST' / 'raw')
    train_ds, val_ds, info = create_datasets('torch/mnist', root=str(tmp_path))
    assert (len(train_ds), len(val_ds)) == (2, 3)
    assert info.num_classes == 10 and info.class_names[0] == '0 - zero'
    assert info.default_img_size == 32 and info.default_hflip == 0.
    img, label = train_ds[0]
    assert img.mode == 'RGB' and label == 3 and np.asarray(img)[2, 3].tolist() == [255] * 3
    train_ds, val_ds, _ = create_datasets('torch/mnist', root=str(tmp_path), train_subset=1)
    _, val_loader = create_loaders(train_ds, val_ds, _config((1, 3, 4), (0.,), (1.,)), batch_size=2, workers=0)
    x, y = next(iter(val_loader))
    assert x.shape == (2, 1, 3, 4) and torch.allclose(x[0, 0], torch.tensor(TEST_IMAGES[0] / 255., dtype=torch.float32))


# --- subsets


def test_subsets(digits):
    train_ds, val_ds, _ = create_datasets(train_subset=100, val_subset=30)
    assert isinstance(train_ds, SubsetDataset) and (len(train_ds), len(val_ds)) == (100, 30)
    assert np.all(np.abs(np.bincount(train_ds.targets, minlength=10) - 10) <= 1)
    assert np.all(np.bincount(val_ds.targets, minlength=10) == 3)
    train2, _, _ = create_datasets(train_subset=100)
    np.testing.assert_array_equal(train_ds.indices, train2.indices)
    # the subset selects from the same fixed split
    full_train = digits[0]
    np.testing.assert_array_equal(train_ds.targets, full_train.targets[train_ds.indices])
    # fewer samples than classes still works
    assert len(create_datasets(train_subset=3)[0]) == 3
    # the whole split is the dataset itself
    assert len(create_datasets(val_subset=360)[1]) == 360


@pytest.mark.parametrize('kwargs, match', [
    (dict(train_subset=0), r'train_subset=0 is invalid: .*>= 1'),
    (dict(val_subset=-5), r'val_subset=-5 is invalid'),
    (dict(train_subset=1438), r'train_subset=1438 is larger than the dataset: use a size between 1 and 1437'),
    (dict(val_subset=361), r'val_subset=361 is larger than the dataset: use a size between 1 and 360'),
    (dict(train_subset=2.5), r'train_subset=2.5 is invalid'),
])
def test_subset_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_datasets(**kwargs)


# --- loaders


def test_loaders_shape_and_batches(digits):
    train_ds, val_ds, _ = create_datasets(train_subset=100)
    cfg = _config((3, 32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_pct=0.875, interpolation='bicubic')
    train_loader, val_loader = create_loaders(train_ds, val_ds, cfg, batch_size=32, val_batch_size=100, workers=0)
    assert len(train_loader) == 3 and len(val_loader) == 4  # 100 // 32 (drop_last), ceil(360 / 100)
    x, y = next(iter(train_loader))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs = [x for x, _ in val_loader]
    assert [len(x) for x in xs] == [100, 100, 100, 60]
    # in order, unshuffled
    assert torch.equal(torch.cat([y for _, y in val_loader]), torch.as_tensor(val_ds.targets))
    # the training shuffle follows the seed
    a = [y for _, y in create_loaders(train_ds, val_ds, cfg, 32, workers=0, seed=1)[0]]
    b = [y for _, y in create_loaders(train_ds, val_ds, cfg, 32, workers=0, seed=1)[0]]
    c = [y for _, y in create_loaders(train_ds, val_ds, cfg, 32, workers=0, seed=2)[0]]
    assert all(torch.equal(i, j) for i, j in zip(a, b)) and not all(torch.equal(i, j) for i, j in zip(a, c))
    # worker processes see the same order (the generator drives the sampler)
    train_loader, _ = create_loaders(train_ds, val_ds, cfg, 32, workers=1, seed=1)
    assert all(torch.equal(i, y) for i, (_, y) in zip(a, train_loader))
    # a dataset no larger than one batch keeps its only batch
    small_train, _, _ = create_datasets(train_subset=20)
    assert len(create_loaders(small_train, val_ds, cfg, batch_size=32, workers=0)[0]) == 1


def test_loaders_normalisation_by_hand(tmp_path):
    folder = tmp_path / 'd'
    _write_idx_folder(folder)
    train_ds, val_ds, _ = create_datasets(f'idx:{folder}')
    # 1 input channel: the datasets switch to 'L'; image size = input size and crop_pct 1 leave pixels untouched
    _, val_loader = create_loaders(train_ds, val_ds, _config((1, 3, 4), (0.5,), (0.25,)), 3, workers=0)
    x, y = next(iter(val_loader))
    assert x.shape == (3, 1, 3, 4) and y.tolist() == [1, 2, 1]
    # pixel (1, 2) of the third test image is 7: (7 / 255 - 0.5) / 0.25
    assert x[2, 0, 1, 2].item() == pytest.approx((7 / 255 - 0.5) / 0.25, abs=1e-6)
    assert x[1, 0, 0, 0].item() == pytest.approx((9 / 255 - 0.5) / 0.25, abs=1e-6)
    # 3 channels, per-channel statistics
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    _, val_loader = create_loaders(train_ds, val_ds, _config((3, 3, 4), mean, std), 3, workers=0)
    x, _ = next(iter(val_loader))
    assert x.shape == (3, 3, 3, 4)
    for k in range(3):
        assert x[2, k, 2, 3].item() == pytest.approx((12 / 255 - mean[k]) / std[k], abs=1e-6)
    # an RGB (ImageNet) config on 1-channel input uses the channel averages
    _, val_loader = create_loaders(train_ds, val_ds, _config((1, 3, 4), mean, std), 3, workers=0)
    x, _ = next(iter(val_loader))
    assert x[2, 0, 2, 3].item() == pytest.approx((12 / 255 - 0.2) / 0.875 * 3, abs=1e-5)


def test_train_transform_no_extra_aug(tmp_path):
    folder = tmp_path / 'd'
    # constant images: crops, resizes and flips leave them unchanged, so any change would be colour / erasing aug
    images = np.full((4, 8, 8), 51, dtype=np.uint8)
    _write_idx_folder(folder, train=(images, np.arange(4, dtype=np.uint8)), test=(images[:2], np.zeros(2, np.uint8)))
    train_ds, val_ds, _ = create_datasets(f'idx:{folder}')
    train_loader, _ = create_loaders(
        train_ds, val_ds, _config((3, 16, 16), (0.,) * 3, (1.,) * 3), batch_size=2, hflip=1.0, workers=0)
    names = [type(t).__name__ for t in train_ds.transform.transforms]
    assert names[0] == 'RandomResizedCropAndInterpolation' and 'RandomHorizontalFlip' in names
    assert not any('Jitter' in n or 'Erasing' in n or 'Augment' in n for n in names)
    for x, _ in train_loader:
        assert x.shape == (2, 3, 16, 16) and torch.allclose(x, torch.full_like(x, 0.2), atol=1e-6)
    # False trains on the eval transform
    create_loaders(train_ds, val_ds, _config((3, 16, 16), (0.,) * 3, (1.,) * 3), 2, train_transform=False, workers=0)
    assert repr(train_ds.transform) == repr(val_ds.transform)  # the eval transform


def test_augmentation_options_reach_timms_train_transform(tmp_path, caplog):
    """auto_augment, colour jitter and random erasing are timm's create_transform's, on an image folder's images."""
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for cls in ('cat', 'dog'):
            (tmp_path / 'pets' / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / 'pets' / split / cls / f'{i}.png')

    def transforms(chans=3, **kwargs):
        train_ds, val_ds, _ = create_datasets(str(tmp_path / 'pets'))
        cfg = _config((chans, 16, 16), (0.5,) * chans, (0.5,) * chans)
        train_loader, _ = create_loaders(train_ds, val_ds, cfg, batch_size=4, workers=0, **kwargs)
        torch.manual_seed(0)
        x, _ = next(iter(train_loader))
        assert x.shape == (4, chans, 16, 16) and torch.isfinite(x).all()
        return {type(t).__name__: t for t in train_ds.transform.transforms}

    tfs = transforms(auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='const', re_count=2)
    assert list(tfs)[-1] == 'RandomErasing' and 'ColorJitter' not in tfs
    assert [op.name for op in tfs['RandAugment'].ops][:3] == ['AutoContrast', 'Equalize', 'Invert']  # timm's list
    assert tfs['RandAugment'].ops[0].magnitude == 9 and tfs['RandAugment'].ops[0].magnitude_std == 0.5
    erasing = tfs['RandomErasing']
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, 'const', 2)
    for chans in (3, 1):  # timm's colour jitter works on gray 'L' images too
        jitter = transforms(chans, color_jitter=0.3)['ColorJitter']
        assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.7, 1.3)) and not jitter.hue
    # as in timm, an auto-augment policy turns colour jitter off (but for 3a): said once
    with caplog.at_level('WARNING', logger='timm_ensembles.data'):
        tfs = transforms(auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.3)
    assert 'ColorJitter' not in tfs and 'colour jitter 0.3 is not applied' in caplog.text
    assert 'AutoAugment' in transforms(auto_augment='original') and 'AugMixAugment' in transforms(
        auto_augment='augmix-m5-w4-d2')
    # RandAugment's increasing posterize keeps 0 bits at magnitude 10, which Pillow 13 refuses: a black image
    posterize = next(op for op in transforms(auto_augment='rand-m10-inc1')['RandAugment'].ops
                     if op.name == 'PosterizeIncreasing')
    posterize.prob = 1.0
    for mode, color in (('RGB', (200, 100, 50)), ('L', 200)):
        assert not posterize(Image.new(mode, (8, 8), color)).getbbox()  # all zero


# --- the real Fashion-MNIST, when installed


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason=f'{FASHION_MNIST_DIR} not installed')
def test_fashion_mnist_installed():
    train_ds, val_ds, info = create_datasets('fashion-mnist', train_subset=1000)
    assert info == DatasetInfo(f'idx:{FASHION_MNIST_DIR}', 10, list(FASHION_MNIST_CLASSES), 32, 0.5)
    assert len(train_ds) == 1000 and len(val_ds) == 10000
    assert np.all(np.bincount(train_ds.targets, minlength=10) == 100)  # Fashion-MNIST is balanced: 6000 a class
    full_train = train_ds.dataset
    assert len(full_train) == 60000 and full_train.images.shape == (60000, 28, 28)
    # the first image of both parts is an ankle boot
    assert full_train[0][1] == 9 and val_ds[0][1] == 9
    assert np.bincount(val_ds.targets).tolist() == [1000] * 10


def test_hub_dataset_name_reads_a_local_hf_dataset(tmp_path):
    """`hfds/<name>` goes through timm to `datasets.load_dataset`, here on a local image folder (no network)."""
    for split in ('train', 'test'):
        for c in ('cat', 'dog'):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / split / c / f'{i}.png')
    train_ds, val_ds, info = create_datasets(f'hfds/{tmp_path}', val_split='test')
    assert (len(train_ds), len(val_ds)) == (6, 6)
    assert info.num_classes == 2 and info.class_names == ['cat', 'dog']
    img, label = train_ds[0]
    assert img.mode == 'RGB' and img.size == (8, 8) and label in (0, 1)


def test_holdout_comes_from_what_the_training_subset_leaves_out(digits):
    train_ds, _, _ = create_datasets(train_subset=300)
    kept = set(train_ds.indices.tolist())
    train_after, holdout = split_holdout(train_ds, 200)
    assert train_after is train_ds and len(holdout) == 200
    assert not kept & set(holdout.indices.tolist())  # the training data is unchanged
    # stratified: 10 classes of about the same size, 20 each give or take the rounding
    counts = np.bincount(holdout.targets, minlength=10)
    assert counts.sum() == 200 and np.abs(counts - 20).max() <= 1
    # its own copy of the images' dataset: setting its transform leaves the training set's alone
    holdout.transform = lambda img: 'eval'
    train_ds.transform = lambda img: 'train'
    assert holdout[0][0] == 'eval' and train_ds[0][0] == 'train'
    # without a subset, the held-out samples leave the training set
    full, _, _ = create_datasets()
    rest, holdout = split_holdout(full, 100)
    assert len(rest) + len(holdout) == len(full) and not set(rest.indices) & set(holdout.indices)
    with pytest.raises(ValueError, match='holdout=2000 is more than the 1137 training samples left'):
        split_holdout(train_ds, 2000)
    with pytest.raises(ValueError, match='holdout=0 is invalid'):
        split_holdout(train_ds, 0)
