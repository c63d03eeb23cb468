"""Corruptions of evaluation batches (dataset shift) against values worked out by hand."""
import colorsys
import math

import pytest
import torch

from timm_ensembles.analysis import shift
from timm_ensembles.analysis.shift import CORRUPTIONS, SEVERITY_PARAMS, CorruptedLoader, corrupt

# CIFAR-10's statistics, as a data config carries them
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def normalise(pixels, mean=MEAN, std=STD):
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def pixels_of(x, mean=MEAN, std=STD):
    return x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


def centred_grid(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel offsets (x right, y down) from the image centre, which torchvision rotates about."""
    c = (side - 1) / 2
    y, x = torch.meshgrid(torch.arange(side) - c, torch.arange(side) - c, indexing='ij')
    return x.double(), y.double()


# --- identity, shape, dtype, range


@pytest.mark.parametrize('name', CORRUPTIONS)
def test_severity_zero_is_the_input_itself(name):
    x = normalise(torch.rand(2, 3, 8, 8))
    assert corrupt(x, name, 0, seed=3, mean=MEAN, std=STD) is x


@pytest.mark.parametrize('name', CORRUPTIONS)
@pytest.mark.parametrize('dtype', [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize('chans', [1, 3])
def test_shape_dtype_and_pixel_range_preserved(name, dtype, chans):
    mean, std = MEAN[:chans], STD[:chans]
    x = normalise(torch.rand(3, chans, 10, 12), mean, std).to(dtype)
    before = x.clone()
    out = corrupt(x, name, 5, mean=mean, std=std)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(x, before)  # the input is left as it was
    pixels = pixels_of(out.double(), mean, std)
    tol = 1e-2 if dtype == torch.float16 else 1e-5  # the round trip through the normalisation
    assert pixels.min() >= -tol and pixels.max() <= 1 + tol


def test_pixel_space_input_without_normalisation():
    x = torch.full((2, 3, 6, 6), 0.98)
    out = corrupt(x, 'brightness', 5)
    # value 0.98 + 0.3 is clipped at 1: a grey pixel becomes white, and nothing is normalised
    torch.testing.assert_close(out, torch.ones_like(x))


# --- determinism


def test_noise_same_seed_same_output_whatever_the_global_rng():
    x = normalise(torch.rand(2, 3, 8, 8))
    torch.manual_seed(1)
    a = corrupt(x, 'gaussian_noise', 3, seed=7, mean=MEAN, std=STD, batch_index=2)
    torch.manual_seed(2)
    torch.rand(100)  # whatever ran before
    b = corrupt(x, 'gaussian_noise', 3, seed=7, mean=MEAN, std=STD, batch_index=2)
    assert torch.equal(a, b)


def test_noise_differs_with_seed_batch_index_and_severity():
    x = torch.full((2, 3, 8, 8), 0.5)  # mid-grey: no pixel is clamped, all the noise shows
    base = corrupt(x, 'gaussian_noise', 3, seed=0)
    noise = base - x
    for other in (corrupt(x, 'gaussian_noise', 3, seed=1), corrupt(x, 'gaussian_noise', 3, seed=0, batch_index=1),
                  corrupt(x, 'gaussian_noise', 4, seed=0)):
        other_noise = other - x
        assert not torch.equal(other, base)
        # not the same draw rescaled either: independent noise is uncorrelated
        corr = torch.corrcoef(torch.stack([noise.flatten(), other_noise.flatten()]))[0, 1]
        assert abs(corr) < 0.25


def test_noise_has_cifar10c_standard_deviation_in_pixel_space():
    # CIFAR-10-C's gaussian_noise: sigma 0.04, 0.06, 0.08, 0.09, 0.10 on pixels in [0, 1]
    x = normalise(torch.full((4, 3, 32, 32), 0.5, dtype=torch.float64))
    for severity, sigma in enumerate((0.04, 0.06, 0.08, 0.09, 0.10), start=1):
        noise = pixels_of(corrupt(x, 'gaussian_noise', severity, mean=MEAN, std=STD)) - 0.5
        # 12288 draws: the sample standard deviation is within ~1.3 % (2 standard errors) of sigma
        assert abs(noise.std().item() - sigma) < 0.02 * sigma
        assert abs(noise.mean().item()) < 3 * sigma / math.sqrt(noise.numel())


# --- severity


@pytest.mark.parametrize('name', [n for n in CORRUPTIONS if n != 'rotation'])
@pytest.mark.parametrize('chans', [1, 3])
def test_change_grows_with_severity(name, chans):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, chans, 28, 28, generator=g)
    mean, std = MEAN[:chans], STD[:chans]
    x = normalise(pixels, mean, std)
    change = [(pixels_of(corrupt(x, name, s, mean=mean, std=std), mean, std) - pixels).abs().mean().item()
              for s in range(6)]
    assert change[0] < 1e-6  # the normalisation round trip only
    assert all(a < b for a, b in zip(change, change[1:])), change


def ramp_batch(side: int, chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random linear ramps 0.5 + a * x + b * y (a random direction per image and channel), within (0, 1), and the
    coefficients [B, C, 2]."""
    g = torch.Generator().manual_seed(0)
    coef = torch.randn(3, chans, 2, generator=g, dtype=torch.float64)
    # the largest |a x + b y| on the square is |(a, b)| * (side - 1) / 2 * sqrt 2: keep it below 0.45
    coef *= 0.45 / (coef.norm(dim=-1, keepdim=True) * (side - 1) / 2 * math.sqrt(2))
    x, y = centred_grid(side)
    return 0.5 + coef[..., 0, None, None] * x + coef[..., 1, None, None] * y, coef


@pytest.mark.parametrize('chans', [1, 3])
def test_rotation_by_the_severity_angle_worked_by_hand(chans):
    # Rotating counter-clockwise by t moves output pixel p's content from s = R(-t) p; with x right and y down,
    # s = (x cos t - y sin t, x sin t + y cos t). A linear ramp is interpolated exactly by bilinear sampling, so
    # inside the image's inscribed disc (less one pixel, where no sample reaches the black fill) the output is the
    # ramp at s.
    side = 15
    ramps, coef = ramp_batch(side, chans)
    x, y = centred_grid(side)
    disc = x ** 2 + y ** 2 <= ((side - 1) / 2 - 1) ** 2
    out = corrupt(ramps, 'rotation', 1)  # pixel space: no normalisation in the way
    angle = math.radians(15)
    sx, sy = x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)
    expected = 0.5 + coef[..., 0, None, None] * sx + coef[..., 1, None, None] * sy
    torch.testing.assert_close(out[..., disc], expected[..., disc], atol=1e-6, rtol=0)
    # and it moved: 15 degrees, not 0
    assert (out - ramps)[..., disc].abs().max() > 0.05


def test_rotation_of_a_point_worked_by_hand():
    # 45 degrees counter-clockwise (severity 3), 7x7 image, one lit pixel 2 right of the centre. Output pixel
    # (1 right, 1 up) takes its value from s = R(-45) (1, -1) = (sqrt 2, 0): 1 - (2 - sqrt 2) = sqrt 2 - 1 of
    # the lit pixel (bilinear, along x only). Its mirror (1 right, 1 down) samples (0, sqrt 2), far from it: 0.
    img = torch.zeros(1, 1, 7, 7)
    img[0, 0, 3, 3 + 2] = 1
    out = corrupt(img, 'rotation', 3)[0, 0]
    assert out[3 - 1, 3 + 1].item() == pytest.approx(math.sqrt(2) - 1, abs=1e-6)
    assert out[3 + 1, 3 + 1].item() == 0
    assert out[3, 3 + 2].item() == 0  # the pixel itself has moved away
    # the centre pixel alone stays where it is, and spills (1 - sqrt 2 / 2)^2 onto each of its 4 neighbours, whose
    # sources lie sqrt 2 / 2 away from it along both axes; the diagonal neighbours' sources are sqrt 2 away: 0
    img = torch.zeros(1, 1, 7, 7)
    img[0, 0, 3, 3] = 1
    out = corrupt(img, 'rotation', 3)[0, 0]
    assert out[3, 3].item() == pytest.approx(1, abs=1e-6)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        assert out[3 + dy, 3 + dx].item() == pytest.approx((1 - math.sqrt(2) / 2) ** 2, abs=1e-6)
    for dy, dx in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        assert out[3 + dy, 3 + dx].item() == pytest.approx(0, abs=1e-6)


def test_rotation_change_grows_with_severity_inside_the_disc():
    # On a whole image the change is not monotone in the angle: the black corners are largest at 45 degrees, and
    # random pixels decorrelate at the first step. What the angle controls is how far content moves: on a ramp,
    # |ramp(s) - ramp(p)| grows with |s - p| = 2 sin(t / 2) |p|, inside the disc the corners do not reach.
    side = 28
    ramps, _ = ramp_batch(side, 3)
    x, y = centred_grid(side)
    disc = x ** 2 + y ** 2 <= ((side - 1) / 2 - 1) ** 2
    x_norm = normalise(ramps.float())
    change = [(pixels_of(corrupt(x_norm, 'rotation', s, mean=MEAN, std=STD)) - ramps)[..., disc].abs().mean().item()
              for s in range(1, 6)]
    assert all(a < b for a, b in zip(change, change[1:])), change
    assert SEVERITY_PARAMS['rotation'] == (15.0, 30.0, 45.0, 60.0, 75.0)


# --- each corruption's formula


def test_contrast_two_pixel_grey_image_worked_by_hand():
    # torchvision's adjust_contrast: factor * x + (1 - factor) * mean of the grey image, clamped to [0, 1].
    # Pixels 0.2 and 0.6: mean 0.4; severity 2 (factor 0.5): 0.1 + 0.2 = 0.3 and 0.3 + 0.2 = 0.5
    img = torch.tensor([[[[0.2, 0.6]]]], dtype=torch.float64)
    out = corrupt(img, 'contrast', 2)
    torch.testing.assert_close(out, torch.tensor([[[[0.3, 0.5]]]], dtype=torch.float64))


def test_contrast_two_pixel_rgb_image_worked_by_hand():
    # A red and a blue pixel: grey levels 0.2989 and 0.114 (ITU-R 601, torchvision's weights), mean 0.20645; every
    # channel is blended towards that one grey mean (not its own), severity 1 (factor 0.75):
    # 0.75 * 1 + 0.25 * 0.20645 = 0.8016125 and 0.25 * 0.20645 = 0.0516125
    img = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(1, 3, 1, 2)
    hi, lo = 0.8016125, 0.0516125
    expected = torch.tensor([[hi, lo], [lo, lo], [lo, hi]], dtype=torch.float64).view(1, 3, 1, 2)
    torch.testing.assert_close(corrupt(img, 'contrast', 1), expected)
    # through the normalisation, the same in pixel space
    out = corrupt(normalise(img, MEAN, STD), 'contrast', 1, mean=MEAN, std=STD)
    torch.testing.assert_close(pixels_of(out, MEAN, STD), expected)


def test_blur_of_a_point_worked_by_hand():
    # CIFAR-10-C severity 5: sigma 1 at 32 px, kernel truncated at radius int(4 sigma + 0.5) = 4; a lit pixel at the
    # centre keeps the product of the centre weights of the two 1-D kernels, (1 / sum_k exp(-k^2 / 2 sigma^2))^2.
    # At 28 px, sigma scales to 0.875 and the radius is int(3.5 + 0.5) = 4.
    for side, sigma in ((32, 1.0), (28, 0.875)):
        img = torch.zeros(1, 1, side, side, dtype=torch.float64)
        img[0, 0, side // 2, side // 2] = 1
        out = corrupt(img, 'gaussian_blur', 5)
        w0 = 1 / sum(math.exp(-k * k / (2 * sigma ** 2)) for k in range(-4, 5))
        assert out[0, 0, side // 2, side // 2].item() == pytest.approx(w0 ** 2, rel=1e-6)
        assert out.sum().item() == pytest.approx(1, rel=1e-6)  # nothing lost, the point is far from the border
        assert out[0, 0, side // 2, side // 2 + 5].item() == 0  # beyond the radius


def test_blur_keeps_a_constant_image():
    # the kernel sums to one and reflection padding continues the constant: nothing changes, borders included
    img = torch.full((2, 3, 6, 6), 0.3, dtype=torch.float64)
    torch.testing.assert_close(corrupt(img, 'gaussian_blur', 5), img)


def test_brightness_against_colorsys_hsv():
    # CIFAR-10-C's brightness: HSV value + delta, clipped at 1, hue and saturation kept; Python's colorsys computes
    # the same round trip independently
    pixels = [(0.2, 0.4, 0.1), (0.0, 0.0, 0.0), (0.95, 0.5, 0.0), (0.3, 0.3, 0.3), (1.0, 1.0, 1.0)]
    img = torch.tensor(pixels, dtype=torch.float64).T.reshape(1, 3, 1, len(pixels))
    for severity, delta in enumerate((0.05, 0.1, 0.15, 0.2, 0.3), start=1):
        expected = []
        for rgb in pixels:
            h, s, v = colorsys.rgb_to_hsv(*rgb)
            expected.append(colorsys.hsv_to_rgb(h, s, min(v + delta, 1.0)))
        expected = torch.tensor(expected, dtype=torch.float64).T.reshape(1, 3, 1, len(pixels))
        torch.testing.assert_close(corrupt(img, 'brightness', severity), expected)
    # worked by hand at severity 2: value 0.4 -> 0.5 scales (0.2, 0.4, 0.1) by 1.25; black becomes grey 0.1
    out = corrupt(img, 'brightness', 2)[0, :, 0]
    torch.testing.assert_close(out[:, 0], torch.tensor([0.25, 0.5, 0.125], dtype=torch.float64))
    torch.testing.assert_close(out[:, 1], torch.full((3,), 0.1, dtype=torch.float64))


# --- the loader


def batches(num=3):
    g = torch.Generator().manual_seed(0)
    # the same images in every batch: only the batch index tells their noise apart
    x = normalise(torch.rand(2, 3, 8, 8, generator=g))
    return [(x, torch.tensor([i, i + 1])) for i in range(num)]


def test_corrupted_loader_deterministic_and_per_batch():
    data = batches()
    loader = CorruptedLoader(data, 'gaussian_noise', 4, seed=5, mean=MEAN, std=STD)
    assert len(loader) == 3
    first, second = list(loader), list(loader)
    assert len(first) == 3
    for i, ((xa, ya), (xb, yb)) in enumerate(zip(first, second)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya, data[i][1])  # targets pass through
        torch.testing.assert_close(xa, corrupt(data[i][0], 'gaussian_noise', 4, 5, MEAN, STD, batch_index=i),
                                   rtol=0, atol=0)
    assert not torch.equal(first[0][0], first[1][0])  # same images, different batches: different noise


def test_corrupted_loader_wraps_a_dataloader():
    ds = torch.utils.data.TensorDataset(torch.rand(5, 1, 8, 8), torch.arange(5))
    dl = torch.utils.data.DataLoader(ds, batch_size=2)
    loader = CorruptedLoader(dl, 'rotation', 2)
    assert len(loader) == len(dl) == 3
    out = list(loader)
    assert [x.shape[0] for x, _ in out] == [2, 2, 1]
    torch.testing.assert_close(out[2][0], corrupt(ds.tensors[0][4:], 'rotation', 2))


def test_corrupted_loader_without_len_has_none():
    loader = CorruptedLoader((b for b in batches()), 'contrast', 1, mean=MEAN, std=STD)
    with pytest.raises(TypeError):
        len(loader)
    assert len(list(loader)) == 3


def test_corrupted_loader_severity_zero_passes_batches_through():
    data = batches()
    for (x, y), (cx, cy) in zip(data, CorruptedLoader(data, 'rotation', 0, mean=MEAN, std=STD)):
        assert cx is x and cy is y


# --- bad input


@pytest.mark.parametrize('kwargs, match', [
    (dict(name='fog'), 'gaussian_noise, gaussian_blur, contrast, rotation, brightness'),
    (dict(severity=6), r'integer in 0\.\.5'),
    (dict(severity=-1), r'integer in 0\.\.5'),
    (dict(severity=1.5), r'integer in 0\.\.5'),
    (dict(severity=True), r'integer in 0\.\.5'),
    (dict(mean=(0.5,), std=(0.5,)), r'one value per channel of the batch \(3\), got 1'),
    (dict(mean=MEAN, std=STD + (0.2,)), r'one value per channel of the batch \(3\), got 4'),
    (dict(mean=MEAN, std=(0.2, 0.0, 0.2)), 'std must be positive'),
    (dict(mean=MEAN, std=None), 'mean and std come together'),
    (dict(seed=1.5), 'seed must be an integer'),
    (dict(batch_index=-1), 'batch_index must be an integer >= 0'),
])
def test_bad_arguments(kwargs, match):
    args = dict(name='gaussian_noise', severity=1, seed=0, mean=MEAN, std=STD) | kwargs
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=match):
        corrupt(x, **args)
    # the loader refuses its arguments at once, and the channel counts at the first batch
    if 'batch_index' not in kwargs:
        with pytest.raises(ValueError, match=match):
            list(CorruptedLoader([(x, torch.zeros(1))], **args))


def test_bad_arguments_at_severity_zero_too():
    with pytest.raises(ValueError, match='valid ones are'):
        corrupt(torch.zeros(1, 3, 4, 4), 'fog', 0)
    with pytest.raises(ValueError, match='one value per channel'):
        corrupt(torch.zeros(1, 3, 4, 4), 'contrast', 0, mean=(0.5,), std=(0.5,))


@pytest.mark.parametrize('x, match', [
    (torch.zeros(3, 4, 4), r'\[B, C, H, W\], got shape \(3, 4, 4\)'),
    (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 'float tensor'),
    ([[0.5]], 'got list'),
])
def test_bad_images(x, match):
    with pytest.raises(ValueError, match=match):
        corrupt(x, 'gaussian_noise', 1)


def test_contrast_needs_grey_or_rgb():
    with pytest.raises(ValueError, match='1- or 3-channel images'):
        corrupt(torch.rand(1, 2, 4, 4), 'contrast', 1)
    # the others take any number of channels
    assert corrupt(torch.rand(1, 2, 8, 8), 'gaussian_blur', 1).shape == (1, 2, 8, 8)


def test_public_names():
    assert set(shift.__all__) == {'CORRUPTIONS', 'MAX_SEVERITY', 'SEVERITY_PARAMS', 'corrupt', 'CorruptedLoader'}
    assert set(SEVERITY_PARAMS) == set(CORRUPTIONS)
    assert all(len(p) == shift.MAX_SEVERITY for p in SEVERITY_PARAMS.values())
