from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from scipy import stats
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pneumofed.common.learning.augment import (
    DEFAULT_AUGMENTATION,
    OP_NAMES,
    AugmentationConfig,
    FixedRotation90,
    GaussianBlur,
    HistogramEqualization,
    PerSampleTransform,
    RandomBrightness,
    RandomHorizontalFlip,
    RandomRotation,
    SharpnessEnhancement,
    augment_batch,
    build_augmentation,
    expand_dataset,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

OPS = {
    "random_rotation": lambda: RandomRotation(),
    "fixed_rotation": lambda: FixedRotation90(),
    "sharpness": lambda: SharpnessEnhancement(amount=2.0),
    "horizontal_flip": lambda: RandomHorizontalFlip(p=1.0),
    "gaussian_blur": lambda: GaussianBlur(5, sigma=(0.5, 1.5)),
    "histogram_equalization": lambda: HistogramEqualization(),
    "brightness": lambda: RandomBrightness((0.5, 1.5)),
}


def smooth_texture(*shape: int, seed: int = 0) -> Tensor:
    """Lung-like texture: blurred noise spread over [0, 1]."""
    noise = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    texture = F.gaussian_blur(noise, kernel_size=[5, 5], sigma=[1.0, 1.0])
    return (texture - texture.min()) / (texture.max() - texture.min())


def laplacian_energy(image: Tensor) -> float:
    """Mean squared discrete Laplacian over the interior: the high-frequency content of an image."""
    lap = (
        image[..., 1:-1, :-2] + image[..., 1:-1, 2:] + image[..., :-2, 1:-1] + image[..., 2:, 1:-1]
    ) - 4 * image[..., 1:-1, 1:-1]
    return lap.pow(2).mean().item()


def reflect_padded_rotation(image: Tensor, angle: float) -> Tensor:
    """The reference for ``fill="reflect"``: mirror-pad to the rotated square's reach, rotate with
    torchvision, crop the centre back out."""
    height, width = image.shape[-2:]
    pad_y, pad_x = math.ceil(height * (math.sqrt(2) - 1) / 2), math.ceil(width * (math.sqrt(2) - 1) / 2)
    padded = torch.nn.functional.pad(image[None], (pad_x, pad_x, pad_y, pad_y), mode="reflect")[0]
    rotated = F.rotate(padded, angle, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)
    return rotated[..., pad_y : pad_y + height, pad_x : pad_x + width].clamp(0, 1)


def drawn_and_applied(op: PerSampleTransform, batch: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """One forward pass split in two: the per-sample parameters ``op`` draws for ``batch``, and its output."""
    params = op.make_params([batch])
    return params, op.transform(batch, params)


def principal_angle(image: Tensor) -> float:
    """Orientation in degrees (counter-clockwise, x right, y up) of the bright structure's main axis."""
    weights = image[0]
    rows, cols = torch.meshgrid(torch.arange(weights.shape[0]), torch.arange(weights.shape[1]), indexing="ij")
    x, y = cols.float(), -rows.float()
    total = weights.sum()
    mx, my = (weights * x).sum() / total, (weights * y).sum() / total
    cxx = (weights * (x - mx) ** 2).sum()
    cyy = (weights * (y - my) ** 2).sum()
    cxy = (weights * (x - mx) * (y - my)).sum()
    return math.degrees(0.5 * math.atan2(2 * cxy.item(), (cxx - cyy).item()))


# ---------------------------------------------------------------------------------------------------
# Every op alone keeps shape, dtype, device, type and range


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 1, 32, 32)])
@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_keeps_shape_dtype_device_and_range(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str
) -> None:
    image = smooth_texture(*shape).to(device, dtype)
    for wrap in (lambda t: t, tv_tensors.Image):
        inp = wrap(image.clone())
        out = OPS[name]()(inp)
        assert out.shape == image.shape
        assert out.dtype == dtype
        assert out.device == image.device
        assert type(out) is type(inp)
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_ops_table_covers_all_seven_in_table_order() -> None:
    assert tuple(OPS) == OP_NAMES
    assert len(OP_NAMES) == 7


@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_rejects_inputs_that_are_neither_an_image_nor_a_batch(name: str) -> None:
    for shape in ((32, 32), (2, 2, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
            OPS[name]()(torch.rand(shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_draws_its_parameters_per_sample_on_the_batchs_device(name: str, device: str) -> None:
    batch = torch.rand(5, 1, 16, 16, device=device)
    params = OPS[name]().make_params([batch])
    assert set(params) >= {"chosen"}
    for value in params.values():
        assert value.shape == (5,) and value.device == batch.device


# ---------------------------------------------------------------------------------------------------
# The ops, one by one


def test_random_rotation_angle_magnitude_is_within_10_to_45_degrees_with_both_signs() -> None:
    line = torch.zeros(1, 64, 64)
    line[0, 32, 12:53] = 1.0
    assert abs(principal_angle(line)) < 0.5
    rotation = RandomRotation((10.0, 45.0))
    torch.manual_seed(0)
    angles = [principal_angle(rotation(line)) for _ in range(60)]
    magnitudes = [abs(a) for a in angles]
    assert min(magnitudes) > 10.0 - 1.0 and max(magnitudes) < 45.0 + 1.0
    assert min(magnitudes) < 20.0 and max(magnitudes) > 35.0  # drawn across the range, not a fixed angle
    assert any(a > 0 for a in angles) and any(a < 0 for a in angles)


@pytest.mark.parametrize(
    ("fill", "size"),
    # The padded reference of "reflect" reaches every rotated pixel only for square images.
    [(0.0, (32, 32)), (0.3, (32, 32)), ("min", (32, 32)), ("reflect", (32, 32)), (0.0, (24, 40)), ("min", (24, 40))],
)
def test_random_rotation_matches_torchvision_rotate_with_each_samples_angle(fill, size: tuple[int, int]) -> None:
    batch = torch.stack([0.2 + 0.6 * smooth_texture(1, *size, seed=seed) for seed in range(6)])
    torch.manual_seed(3)
    params, out = drawn_and_applied(RandomRotation(fill=fill), batch)
    for image, angle, rotated in zip(batch, params["angle"].tolist(), out):
        if fill == "reflect":
            expected = reflect_padded_rotation(image, angle)
        elif fill == "min":
            minimum = image.amin(dim=(-2, -1), keepdim=True)
            expected = F.rotate(image - minimum, angle, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0) + minimum
        else:
            expected = F.rotate(image, angle, interpolation=v2.InterpolationMode.BILINEAR, fill=fill)
        # The sampling grids are computed differently (float32 rounding of positions ~1e-6 px).
        torch.testing.assert_close(rotated, expected.clamp(0, 1), atol=1e-4, rtol=0)


def test_random_rotation_reflect_fill_shows_no_constant_corner_on_non_square_images() -> None:
    batch = 0.3 + 0.4 * smooth_texture(2, 1, 24, 40)
    out = RandomRotation((45.0, 45.0))(batch)
    assert (out.amin(dim=(1, 2, 3)) >= batch.amin(dim=(1, 2, 3)) - 1e-6).all()
    assert out[:, 0, :3, :3].std(dim=(-2, -1)).gt(0).all()


def test_random_rotation_angles_follow_the_configured_distribution_per_sample() -> None:
    # End to end: the angle each sample was turned by, read back from the output, is uniform in
    # magnitude over the range and positive for about half the samples.
    lines = torch.zeros(400, 1, 64, 64)
    lines[:, 0, 32, 12:53] = 1.0
    torch.manual_seed(0)
    out = RandomRotation((10.0, 45.0), fill=0.0)(lines)
    angles = torch.tensor([principal_angle(image) for image in out])
    assert stats.kstest(angles.abs().numpy(), stats.uniform(10.0, 35.0).cdf).pvalue > 0.01
    assert stats.binomtest(int((angles > 0).sum()), len(angles), 0.5).pvalue > 0.01


def test_random_rotation_min_fill_uses_each_images_own_minimum() -> None:
    batch = torch.stack([0.3 + 0.4 * smooth_texture(1, 32, 32, seed=1), 0.6 + 0.2 * smooth_texture(1, 32, 32, seed=2)])
    out = RandomRotation((45.0, 45.0), fill="min")(batch)
    corners = out[:, 0, 0, 0]
    torch.testing.assert_close(corners, batch.amin(dim=(1, 2, 3)))
    assert (out.amin(dim=(1, 2, 3)) >= batch.amin(dim=(1, 2, 3)) - 1e-6).all()
    assert RandomRotation((45.0, 45.0), fill=0.0)(batch)[:, 0, 0, 0].eq(0).all()


def test_random_rotation_fills_corners_from_the_images_own_content_by_default() -> None:
    batch = torch.stack([0.3 + 0.4 * smooth_texture(1, 32, 32, seed=1), 0.6 + 0.2 * smooth_texture(1, 32, 32, seed=2)])
    plain = RandomRotation((45.0, 45.0), fill=0.0)
    torch.manual_seed(5)
    out = RandomRotation((45.0, 45.0))(batch)
    torch.manual_seed(5)
    zero_filled = plain(batch)
    # No corner is a constant: every pixel lies within the images' own value range ...
    assert (out.amin(dim=(1, 2, 3)) >= batch.amin(dim=(1, 2, 3)) - 1e-6).all()
    assert (out.amax(dim=(1, 2, 3)) <= batch.amax(dim=(1, 2, 3)) + 1e-6).all()
    assert out[:, 0, :4, :4].std(dim=(-2, -1)).gt(0).all()
    # ... and inside the inscribed disc the result is the plain rotation.
    ys, xs = torch.meshgrid(torch.arange(32) - 15.5, torch.arange(32) - 15.5, indexing="ij")
    inner = (ys**2 + xs**2).sqrt() < 14
    torch.testing.assert_close(out[..., inner], zero_filled[..., inner])


@pytest.mark.parametrize("shape", [(1, 32, 32), (2, 1, 32, 32)])
def test_fixed_rotation_is_exactly_rot90(shape: tuple[int, ...]) -> None:
    image = smooth_texture(*shape)
    out = FixedRotation90()(image)
    assert torch.equal(out, torch.rot90(image, 1, dims=(-2, -1)))
    assert not torch.equal(out, image)


def test_fixed_rotation_rejects_non_square_images() -> None:
    with pytest.raises(ValueError, match="square"):
        FixedRotation90()(torch.rand(1, 32, 48))
    with pytest.raises(ValueError, match="square"):  # even where no sample's coin says rotate
        FixedRotation90(p=0.0)(torch.rand(4, 1, 32, 48))


@pytest.mark.parametrize(
    ("op", "reference"),
    [
        (FixedRotation90(p=0.5), lambda image: torch.rot90(image, 1, dims=(-2, -1))),
        (RandomHorizontalFlip(p=0.5), lambda image: torch.flip(image, dims=(-1,))),
        (HistogramEqualization(p=0.5), F.equalize),
    ],
    ids=["rot90", "flip", "equalize"],
)
def test_deterministic_ops_are_bit_exact_per_sample_and_leave_the_others_untouched(op, reference) -> None:
    batch = torch.stack([0.1 + 0.5 * smooth_texture(1, 32, 32, seed=seed) for seed in range(32)])
    torch.manual_seed(1)
    params, out = drawn_and_applied(op, batch)
    chosen = params["chosen"]
    assert 0 < int(chosen.sum()) < len(batch)  # both kinds present in this batch
    for image, changed, result in zip(batch, chosen.tolist(), out):
        assert torch.equal(result, reference(image) if changed else image)


@pytest.mark.parametrize("shape", [(1, 32, 32), (2, 1, 32, 32)])
def test_horizontal_flip_is_an_exact_mirror(shape: tuple[int, ...]) -> None:
    image = smooth_texture(*shape)
    assert torch.equal(RandomHorizontalFlip(p=1.0)(image), torch.flip(image, dims=(-1,)))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(image), image)
    assert RandomHorizontalFlip().p == 0.5  # torchvision's default


def test_sharpness_equals_unsharp_mask_formula_on_an_impulse() -> None:
    # A single bright pixel on a flat background: the Gaussian blur of it is the separable kernel.
    amount, sigma, size = 1.5, 1.0, 5
    image = torch.full((1, 32, 32), 0.25)
    image[0, 16, 16] = 0.5
    offsets = torch.arange(size) - size // 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    g = g / g.sum()
    blurred = torch.full_like(image, 0.25)
    blurred[0, 14:19, 14:19] += 0.25 * torch.outer(g, g)
    expected = (image + amount * (image - blurred)).clamp(0, 1)
    out = SharpnessEnhancement(amount=amount, kernel_size=size, sigma=sigma)(image)
    torch.testing.assert_close(out, expected)
    assert out[0, 16, 16] > 0.5 and out[0, 16, 17] < 0.25  # the peak rises, its surround dips


def test_sharpness_increases_local_contrast_and_stays_in_range() -> None:
    image = 0.2 + 0.6 * smooth_texture(1, 64, 64)
    sharpened = SharpnessEnhancement(amount=1.0)(image)
    assert laplacian_energy(sharpened) > 2 * laplacian_energy(image)
    strong = SharpnessEnhancement(amount=50.0)(smooth_texture(1, 64, 64))
    assert strong.min() == 0.0 and strong.max() == 1.0


def test_gaussian_blur_matches_torchvision_with_each_samples_sigma() -> None:
    batch = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    params, out = drawn_and_applied(GaussianBlur(5, sigma=(0.5, 1.5)), batch)
    assert len(set(params["sigma"].tolist())) == 6
    for image, sigma, blurred in zip(batch, params["sigma"].tolist(), out):
        torch.testing.assert_close(blurred, F.gaussian_blur(image, kernel_size=[5, 5], sigma=[sigma, sigma]))


def test_gaussian_blur_reduces_high_frequency_energy() -> None:
    noise = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(0))
    blurred = GaussianBlur(5, sigma=(1.0, 1.5))(noise)
    assert laplacian_energy(blurred) < 0.2 * laplacian_energy(noise)
    torch.testing.assert_close(blurred.mean(), noise.mean(), atol=0.01, rtol=0)


def test_histogram_equalization_flattens_a_low_contrast_histogram() -> None:
    generator = torch.Generator().manual_seed(0)
    grey_levels = (127.5 + 8 * torch.randn(1, 64, 64, generator=generator)).round().clamp(0, 255)
    low_contrast = grey_levels / 255  # as ROIs stored in uint8 arrive
    out = HistogramEqualization()(low_contrast)

    def distance_from_uniform(image: Tensor) -> float:
        levels = torch.linspace(0, 1, 101)
        cdf = (image.flatten()[:, None] <= levels).float().mean(dim=0)
        return (cdf - levels).abs().max().item()

    # Equalisation maps each grey level to one level, so the CDF can miss the diagonal by at most
    # the share of the most frequent input level.
    largest_level_share = torch.unique(low_contrast, return_counts=True)[1].max().item() / low_contrast.numel()
    assert distance_from_uniform(low_contrast) > 0.4
    assert distance_from_uniform(out) < largest_level_share + 0.01 < 0.07
    assert out.min() < 0.02 and out.max() == 1.0
    counts = torch.histc(out, bins=8, min=0, max=1)
    assert counts.std() / counts.mean() < 0.15


def test_histogram_equalization_is_deterministic_per_image_and_on_the_uint8_grid() -> None:
    batch = torch.stack([0.4 + 0.2 * smooth_texture(1, 32, 32, seed=1), 0.1 * smooth_texture(1, 32, 32, seed=2)])
    out = HistogramEqualization()(batch)
    assert torch.equal(out, HistogramEqualization()(batch))
    assert torch.equal(out, F.equalize(batch))
    for index in range(2):  # each image is equalised on its own histogram
        assert torch.equal(out[index], HistogramEqualization()(batch[index]))
    torch.testing.assert_close(out * 255, (out * 255).round(), atol=1e-4, rtol=0)


def test_brightness_scales_by_a_random_factor_within_the_range() -> None:
    image = 0.1 + 0.4 * smooth_texture(1, 32, 32)  # at most 0.5, so a factor <= 2 never clips
    brightness = RandomBrightness((0.6, 1.4))
    torch.manual_seed(0)
    factors = []
    for _ in range(30):
        out = brightness(image)
        ratio = out / image
        torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio))  # one factor for every pixel
        factors.append((out.mean() / image.mean()).item())
    assert min(factors) >= 0.6 - 1e-5 and max(factors) <= 1.4 + 1e-5
    assert max(factors) - min(factors) > 0.4


def test_brightness_scales_each_sample_by_its_own_factor() -> None:
    batch = 0.1 + 0.4 * smooth_texture(6, 1, 16, 16)  # at most 0.5: no clipping below a factor of 2
    torch.manual_seed(4)
    params, out = drawn_and_applied(RandomBrightness((0.6, 1.4)), batch)
    assert len(set(params["factor"].tolist())) == 6
    torch.testing.assert_close(out, batch * params["factor"].view(-1, 1, 1, 1))


def test_brightness_clamps_to_one() -> None:
    out = RandomBrightness((1.5, 2.0))(smooth_texture(1, 32, 32))
    assert out.max() == 1.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RandomRotation((45.0, 10.0)), "degrees"),
        (lambda: RandomRotation(fill=2.0), "fill"),
        (lambda: SharpnessEnhancement(kernel_size=4), "odd"),
        (lambda: SharpnessEnhancement(amount=0.0), "positive"),
        (lambda: RandomBrightness((1.2, 0.8)), "factor_range"),
        (lambda: GaussianBlur(4, sigma=(0.5, 1.0)), "odd"),
        (lambda: GaussianBlur(5, sigma=(0.0, 1.0)), "sigma"),
        (lambda: GaussianBlur(5, sigma=(1.5, 0.5)), "sigma"),
        (lambda: RandomHorizontalFlip(p=1.5), "p must"),
        (lambda: HistogramEqualization(p=-0.1), "p must"),
    ],
)
def test_ops_reject_bad_parameters(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("op", "name", "low", "high"),
    [
        (GaussianBlur(5, sigma=(0.5, 1.5)), "sigma", 0.5, 1.5),
        (RandomBrightness((0.75, 1.25)), "factor", 0.75, 1.25),
        (RandomRotation((10.0, 45.0)), "angle", 10.0, 45.0),  # the magnitude; the sign is tested below
    ],
    ids=["blur-sigma", "brightness-factor", "rotation-angle"],
)
def test_drawn_parameters_are_uniform_over_the_configured_range(op, name: str, low: float, high: float) -> None:
    torch.manual_seed(0)
    drawn = op.make_params([torch.zeros(4000, 1, 2, 2)])[name].abs()
    assert low <= drawn.min() and drawn.max() <= high
    assert stats.kstest(drawn.numpy(), stats.uniform(low, high - low).cdf).pvalue > 0.01
    # The test can fail: the same draws are far from a uniform over a shifted range.
    shifted = stats.uniform(low + 0.1 * (high - low), high - low)
    assert stats.kstest(drawn.numpy(), shifted.cdf).pvalue < 1e-6


def test_rotation_sign_is_a_fair_coin_per_sample() -> None:
    torch.manual_seed(0)
    angles = RandomRotation((10.0, 45.0)).make_params([torch.zeros(4000, 1, 2, 2)])["angle"]
    assert stats.binomtest(int((angles > 0).sum()), len(angles), 0.5).pvalue > 0.01


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_each_sample_is_chosen_with_the_ops_probability(p: float) -> None:
    batch = smooth_texture(1, 8, 8).expand(4000, 1, 8, 8)
    torch.manual_seed(0)
    params, out = drawn_and_applied(FixedRotation90(p=p), batch)
    changed = (out != batch).flatten(1).any(dim=1)
    assert torch.equal(changed, params["chosen"])
    assert stats.binomtest(int(changed.sum()), len(batch), p).pvalue > 0.01


# ---------------------------------------------------------------------------------------------------
# Configuration and composition


def test_default_config_enables_all_seven_in_table_order() -> None:
    assert DEFAULT_AUGMENTATION.enabled == OP_NAMES
    pipeline = build_augmentation(DEFAULT_AUGMENTATION)
    assert [t.p for t in pipeline.transforms] == [getattr(DEFAULT_AUGMENTATION, name).p for name in OP_NAMES]
    assert [type(t) for t in pipeline.transforms] == [
        RandomRotation,
        FixedRotation90,
        SharpnessEnhancement,
        RandomHorizontalFlip,
        GaussianBlur,
        HistogramEqualization,
        RandomBrightness,
    ]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"enabled": ["random_rotation", "mixup"]}, "horizontal_flip"),  # error lists the valid names
        ({"enabled": ["sharpness", "sharpness"]}, "more than once"),
        ({"random_rotation": {"degrees": [45, 10]}}, "low <= high"),
        ({"random_rotation": {"degrees": [10, 270]}}, r"\[0, 180\]"),
        ({"horizontal_flip": {"p": 1.5}}, "less than or equal to 1"),
        ({"gaussian_blur": {"kernel_size": 4}}, "odd"),
        ({"gaussian_blur": {"sigma": [0.0, 1.0]}}, "positive"),
        ({"brightness": {"factor": [-0.5, 1.0]}}, "non-negative"),
        ({"sharpness": {"radius": 2}}, "Extra inputs"),
        ({"elastic": {"p": 0.5}}, "Extra inputs"),
    ],
)
def test_config_rejects_bad_input_with_a_clear_message(payload: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AugmentationConfig.model_validate(payload)


def test_all_disabled_config_is_identity() -> None:
    image = smooth_texture(1, 32, 32)
    for config in (AugmentationConfig(enabled=()), AugmentationConfig(enabled=[])):
        assert torch.equal(build_augmentation(config)(image), image)


def test_only_enabled_ops_are_applied() -> None:
    image = smooth_texture(1, 32, 32)
    flip_only = build_augmentation(AugmentationConfig(enabled=["horizontal_flip"], horizontal_flip={"p": 1.0}))
    assert torch.equal(flip_only(image), torch.flip(image, dims=(-1,)))
    config = AugmentationConfig(
        enabled=["horizontal_flip", "fixed_rotation"],  # listing order does not matter: Table 4's order does
        fixed_rotation={"p": 1.0},
        horizontal_flip={"p": 1.0},
    )
    expected = torch.flip(torch.rot90(image, 1, dims=(-2, -1)), dims=(-1,))
    assert torch.equal(build_augmentation(config)(image), expected)


def test_default_pipeline_leaves_the_expected_share_of_a_batch_unchanged() -> None:
    # Every op has its own coin per sample: a sample passes unchanged with the product of (1 - p).
    unchanged_share = math.prod(1 - getattr(DEFAULT_AUGMENTATION, name).p for name in OP_NAMES)
    batch = torch.stack([0.2 + 0.6 * smooth_texture(1, 16, 16, seed=seed) for seed in range(8)]).repeat(250, 1, 1, 1)
    torch.manual_seed(0)
    out = build_augmentation(DEFAULT_AUGMENTATION)(batch)
    unchanged = int((out == batch).flatten(1).all(dim=1).sum())
    assert stats.binomtest(unchanged, len(batch), unchanged_share).pvalue > 0.01


def test_op_probability_is_honoured() -> None:
    image = smooth_texture(1, 8, 8)
    rotate_quarter = build_augmentation(AugmentationConfig(enabled=["fixed_rotation"], fixed_rotation={"p": 0.25}))
    never = build_augmentation(AugmentationConfig(enabled=["fixed_rotation"], fixed_rotation={"p": 0.0}))
    torch.manual_seed(0)
    rotated = sum(not torch.equal(rotate_quarter(image), image) for _ in range(400))
    assert 70 <= rotated <= 130
    assert all(torch.equal(never(image), image) for _ in range(50))


# ---------------------------------------------------------------------------------------------------
# Batches and offline expansion


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "make",
    [RandomRotation, lambda: GaussianBlur(5, sigma=(0.5, 1.5)), RandomBrightness],
    ids=["rotation", "blur", "brightness"],
)
def test_augment_batch_draws_independently_per_sample(make, device: str) -> None:
    batch = smooth_texture(1, 32, 32).expand(8, 1, 32, 32).contiguous().to(device)
    torch.manual_seed(0)
    out = augment_batch(make(), batch)
    assert out.shape == batch.shape and out.dtype == batch.dtype and out.device == batch.device
    assert len({tuple(sample.flatten()[:64].tolist()) for sample in out.cpu()}) == 8


@pytest.mark.parametrize("device", DEVICES)
def test_augment_batch_with_the_default_pipeline_keeps_shape_dtype_device_and_range(device: str) -> None:
    batch = smooth_texture(16, 1, 64, 64).to(device)
    torch.manual_seed(0)
    out = augment_batch(build_augmentation(DEFAULT_AUGMENTATION), batch)
    assert out.shape == batch.shape and out.dtype == batch.dtype and out.device == batch.device
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert len({tuple(sample.flatten().tolist()) for sample in out.cpu()}) == 16


def test_augment_batch_rejects_a_single_image() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        augment_batch(RandomRotation(), torch.rand(1, 32, 32))


def _toy_dataset(n: int = 10) -> tuple[Tensor, Tensor]:
    images = torch.stack([smooth_texture(1, 16, 16, seed=i) for i in range(n)])
    return images, torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2][:n])


def test_expand_dataset_keeps_originals_and_labels_and_cycles_sources() -> None:
    images, labels = _toy_dataset()
    out_images, out_labels = expand_dataset(images, labels, 25, FixedRotation90(), seed=0)
    assert out_images.shape == (25, 1, 16, 16) and out_labels.shape == (25,)
    assert torch.equal(out_images[:10], images) and torch.equal(out_labels[:10], labels)
    for j in range(15):  # copy j is an augmentation of original j mod N, with that original's label
        assert torch.equal(out_images[10 + j], torch.rot90(images[j % 10], 1, dims=(-2, -1)))
        assert out_labels[10 + j] == labels[j % 10]
    # Whole cycles keep the class proportions exactly.
    _, four_fold_labels = expand_dataset(images, labels, 40, FixedRotation90(), seed=0)
    assert torch.equal(torch.bincount(four_fold_labels), 4 * torch.bincount(labels))


def test_expand_dataset_is_deterministic_from_seed_and_leaves_global_rng_alone() -> None:
    images, labels = _toy_dataset()
    transform = build_augmentation(DEFAULT_AUGMENTATION)
    torch.manual_seed(123)
    first = expand_dataset(images, labels, 40, transform, seed=7)
    after_call = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_call, torch.rand(3))
    second = expand_dataset(images, labels, 40, transform, seed=7)
    other = expand_dataset(images, labels, 40, transform, seed=8)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0][10:], other[0][10:])
    assert not torch.equal(first[0][10:20], images)  # the copies are augmented, not duplicates


def test_expand_dataset_accepts_stored_uint8_pixels() -> None:
    images, labels = _toy_dataset()
    stored = F.to_dtype(images, torch.uint8, scale=True)
    out_images, _ = expand_dataset(stored, labels, 20, FixedRotation90(), seed=0)
    assert out_images.dtype == torch.uint8
    assert torch.equal(out_images[10:], torch.rot90(stored, 1, dims=(-2, -1)))


def test_expand_dataset_to_its_own_size_returns_the_originals() -> None:
    images, labels = _toy_dataset()
    out_images, out_labels = expand_dataset(images, labels, 10, FixedRotation90(), seed=0)
    assert torch.equal(out_images, images) and torch.equal(out_labels, labels)


@pytest.mark.parametrize(
    ("target_size", "labels_length", "message"),
    [(5, 10, "smaller than the data set"), (20, 9, "labels shaped")],
)
def test_expand_dataset_rejects_bad_arguments(target_size: int, labels_length: int, message: str) -> None:
    images, labels = _toy_dataset()
    with pytest.raises(ValueError, match=message):
        expand_dataset(images, labels[:labels_length], target_size, FixedRotation90(), seed=0)
