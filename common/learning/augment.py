"""The seven image augmentations of Dong et al. (2022), Table 4, as composable torchvision v2 transforms.

Every operation takes a float image in [0, 1] shaped (C, H, W) or (B, C, H, W) -- a plain tensor or a
``tv_tensors.Image`` -- and returns one of the same shape, dtype, device, type and range. Called on a
batch, a v2 transform draws *one* random parameter set for the whole batch; ``augment_batch`` gives
every sample its own draw.

The ops, in Table 4's order (the order ``build_augmentation`` composes them in):

1. ``RandomRotation``      angle uniform in 10..45 degrees with a random sign, bilinear.
2. ``FixedRotation90``     exactly ``torch.rot90(x, 1, dims=(-2, -1))``; square images only.
3. ``SharpnessEnhancement`` unsharp mask: ``clamp(x + amount * (x - gaussian_blur(x)), 0, 1)``.
4. ``RandomHorizontalFlip`` torchvision's, exact mirror.
5. ``GaussianBlur``        torchvision's, sigma drawn per call from a range.
6. ``HistogramEqualization`` torchvision's ``equalize`` (quantised to 256 levels, deterministic).
7. ``RandomBrightness``    the seed scales V of HSV; on grayscale V is the intensity, so this
                            multiplies by a factor drawn from a range and clamps (``ColorJitter``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    field_validator,
)
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pneumofed.common.data.store import RoiArrays, RoiDataset

GaussianBlur = v2.GaussianBlur
RandomHorizontalFlip = v2.RandomHorizontalFlip

OpName = Literal[
    "random_rotation",
    "fixed_rotation",
    "sharpness",
    "horizontal_flip",
    "gaussian_blur",
    "histogram_equalization",
    "brightness",
]
OP_NAMES: tuple[OpName, ...] = get_args(OpName)  # Table 4's order


def _like(output: Tensor, reference: Tensor) -> Tensor:
    """Give ``output`` the tv_tensor type of ``reference`` (tensor arithmetic returns plain tensors)."""
    return tv_tensors.wrap(output, like=reference) if isinstance(reference, tv_tensors.TVTensor) else output


class _ImageTransform(v2.Transform):
    """Base for the ops written here: they act on images (plain tensors or ``tv_tensors.Image``) only."""

    _transformed_types = (tv_tensors.Image, F.is_pure_tensor)


class RandomRotation(_ImageTransform):
    """Rotate by an angle whose magnitude is uniform in ``degrees`` and whose sign is random.

    ``fill`` decides what the corners uncovered by the rotation show: ``"reflect"`` (default) the
    image's own content, mirrored at its edges before rotating, so no corner is a constant value that
    never occurs at evaluation (black is lucent lung in MONOCHROME2, an emphysema-like cue); a number
    in [0, 1] that constant; ``"min"`` each image's own minimum (per channel).
    """

    def __init__(
        self, degrees: tuple[float, float] = (10.0, 45.0), fill: float | Literal["reflect", "min"] = "reflect"
    ) -> None:
        super().__init__()
        low, high = degrees
        if not 0.0 <= low <= high <= 180.0:
            raise ValueError(f"degrees must satisfy 0 <= low <= high <= 180, got {degrees}")
        if fill not in ("reflect", "min") and not 0.0 <= fill <= 1.0:
            raise ValueError(f"fill must be in [0, 1], 'reflect' or 'min', got {fill!r}")
        self.degrees = (float(low), float(high))
        self.fill = fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        magnitude = torch.empty(1).uniform_(*self.degrees).item()
        sign = 1.0 if torch.rand(1).item() < 0.5 else -1.0
        return {"angle": sign * magnitude}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        rotate = dict(angle=params["angle"], interpolation=v2.InterpolationMode.BILINEAR)
        plain = inpt.as_subclass(Tensor)
        if self.fill == "reflect":
            # A square of side s rotated by any angle stays inside the centred square of side s * sqrt(2):
            # mirror-pad to that, rotate, and crop the centre back out.
            height, width = plain.shape[-2:]
            pad_y, pad_x = math.ceil(height * (math.sqrt(2) - 1) / 2), math.ceil(width * (math.sqrt(2) - 1) / 2)
            padded = torch.nn.functional.pad(
                plain.reshape(-1, 1, height, width), (pad_x, pad_x, pad_y, pad_y), mode="reflect"
            ).reshape(*plain.shape[:-2], height + 2 * pad_y, width + 2 * pad_x)
            rotated = F.rotate(padded, fill=0.0, **rotate)[..., pad_y : pad_y + height, pad_x : pad_x + width]
        elif self.fill == "min":
            # Rotating (x - min) with zero fill and adding min back fills each image with its own minimum.
            minimum = plain.amin(dim=(-2, -1), keepdim=True)
            rotated = F.rotate(plain - minimum, fill=0.0, **rotate) + minimum
        else:
            rotated = F.rotate(plain, fill=self.fill, **rotate)
        # Bilinear weights sum to 1 only up to rounding; keep the [0, 1] promise exactly.
        return _like(rotated.clamp_(0.0, 1.0), inpt)


class FixedRotation90(_ImageTransform):
    """Rotate by exactly 90 degrees counter-clockwise; square images only, so the shape is kept."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        height, width = inpt.shape[-2:]
        if height != width:
            raise ValueError(f"FixedRotation90 keeps the shape only for square images, got {height}x{width}")
        return _like(torch.rot90(inpt.as_subclass(Tensor), 1, dims=(-2, -1)).contiguous(), inpt)


class SharpnessEnhancement(_ImageTransform):
    """Unsharp mask: add back ``amount`` times the detail that a Gaussian filter removes, then clamp."""

    def __init__(self, amount: float = 1.0, kernel_size: int = 5, sigma: float = 1.0) -> None:
        super().__init__()
        if amount <= 0 or sigma <= 0:
            raise ValueError(f"amount and sigma must be positive, got amount={amount}, sigma={sigma}")
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.amount, self.kernel_size, self.sigma = amount, kernel_size, sigma

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        plain = inpt.as_subclass(Tensor)
        blurred = F.gaussian_blur(plain, kernel_size=[self.kernel_size] * 2, sigma=[self.sigma] * 2)
        return _like((plain + self.amount * (plain - blurred)).clamp_(0.0, 1.0), inpt)


class HistogramEqualization(_ImageTransform):
    """Histogram equalisation of each image and channel (deterministic).

    torchvision quantises float input to 256 levels (exact for images that came from uint8), equalises
    with PIL's lookup table and returns floats on the k/255 grid.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.equalize, inpt)


class RandomBrightness(v2.ColorJitter):
    """Multiply intensity by a factor uniform in ``factor_range`` and clamp to [0, 1]."""

    def __init__(self, factor_range: tuple[float, float] = (0.75, 1.25)) -> None:
        low, high = factor_range
        if not 0.0 <= low <= high:
            raise ValueError(f"factor_range must satisfy 0 <= low <= high, got {factor_range}")
        super().__init__(brightness=(float(low), float(high)))


# ---------------------------------------------------------------------------------------------------
# Configuration


def _ordered_range(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError(f"range must be (low, high) with low <= high, got {value}")
    return value


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {value}")
    return value


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Range = Annotated[tuple[float, float], AfterValidator(_ordered_range)]
KernelSize = Annotated[int, Field(gt=0), AfterValidator(_odd)]


class _OpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RandomRotationConfig(_OpConfig):
    p: Probability = 0.5
    degrees: Range = (10.0, 45.0)
    fill: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["reflect", "min"] = "reflect"

    @field_validator("degrees")
    @classmethod
    def _within_half_turn(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not (0 <= value[0] and value[1] <= 180):
            raise ValueError(f"degrees must lie within [0, 180], got {value}")
        return value


class FixedRotationConfig(_OpConfig):
    p: Probability = 0.25


class SharpnessConfig(_OpConfig):
    p: Probability = 0.25
    amount: PositiveFloat = 1.0
    kernel_size: KernelSize = 5
    sigma: PositiveFloat = 1.0


class HorizontalFlipConfig(_OpConfig):
    p: Probability = 0.5


class GaussianBlurConfig(_OpConfig):
    p: Probability = 0.25
    kernel_size: KernelSize = 5
    sigma: Range = (0.5, 1.5)

    @field_validator("sigma")
    @classmethod
    def _positive_sigma(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] <= 0:
            raise ValueError(f"sigma must be positive, got {value}")
        return value


class HistogramEqualizationConfig(_OpConfig):
    p: Probability = 0.25


class BrightnessConfig(_OpConfig):
    p: Probability = 0.5
    factor: Range = (0.75, 1.25)

    @field_validator("factor")
    @classmethod
    def _non_negative(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] < 0:
            raise ValueError(f"factor must be non-negative, got {value}")
        return value


class AugmentationConfig(BaseModel):
    """Which of Table 4's ops run, with what probability and parameters.

    Defaults: all seven enabled. Random rotation and flip (p = 0.5) move texture without altering
    it, so they are label-safe and applied often. The fixed 90-degree rotation (p = 0.25) turns rib
    edges from roughly horizontal to vertical, an orientation no radiograph shows, so it is rarer.
    The photometric filters (sharpen, blur, equalise; p = 0.25) change the very texture contrast
    that separates nodules, interstitial change and emphysema, and sharpen and blur partly undo each
    other (both together 1 in 16). Brightness (x0.75..1.25, p = 0.5) mimics exposure differences
    between sites. About 4% of samples pass through unchanged.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: tuple[OpName, ...] = OP_NAMES
    random_rotation: RandomRotationConfig = RandomRotationConfig()
    fixed_rotation: FixedRotationConfig = FixedRotationConfig()
    sharpness: SharpnessConfig = SharpnessConfig()
    horizontal_flip: HorizontalFlipConfig = HorizontalFlipConfig()
    gaussian_blur: GaussianBlurConfig = GaussianBlurConfig()
    histogram_equalization: HistogramEqualizationConfig = HistogramEqualizationConfig()
    brightness: BrightnessConfig = BrightnessConfig()

    @field_validator("enabled")
    @classmethod
    def _no_duplicates(cls, value: tuple[OpName, ...]) -> tuple[OpName, ...]:
        duplicates = sorted({name for name in value if value.count(name) > 1})
        if duplicates:
            raise ValueError(f"operations listed more than once: {duplicates}")
        return value


DEFAULT_AUGMENTATION = AugmentationConfig()


def build_augmentation(config: AugmentationConfig) -> Callable[[Tensor], Tensor]:
    """Compose the enabled ops in Table 4's order, each applied with its configured probability.

    The result draws one random parameter set per call: use ``augment_batch`` for batches.
    """
    ops: dict[OpName, Callable[[], v2.Transform]] = {
        "random_rotation": lambda: RandomRotation(config.random_rotation.degrees, config.random_rotation.fill),
        "fixed_rotation": FixedRotation90,
        "sharpness": lambda: SharpnessEnhancement(
            config.sharpness.amount, config.sharpness.kernel_size, config.sharpness.sigma
        ),
        "horizontal_flip": lambda: RandomHorizontalFlip(p=config.horizontal_flip.p),
        "gaussian_blur": lambda: GaussianBlur(config.gaussian_blur.kernel_size, config.gaussian_blur.sigma),
        "histogram_equalization": HistogramEqualization,
        "brightness": lambda: RandomBrightness(config.brightness.factor),
    }
    transforms: list[v2.Transform] = []
    for name in OP_NAMES:
        if name not in config.enabled:
            continue
        op = ops[name]()
        # The flip carries its own probability; every other op always acts once called.
        transforms.append(op if name == "horizontal_flip" else v2.RandomApply([op], p=getattr(config, name).p))
    return v2.Compose(transforms) if transforms else v2.Identity()


def augment_batch(transform: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
    """Apply ``transform`` to each sample of a (B, C, H, W) batch with its own random draw, on the batch's device."""
    if batch.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(batch.shape)}")
    if len(batch) == 0:
        return batch
    return _like(torch.stack([transform(sample) for sample in batch.as_subclass(Tensor)]), batch)


def expand_dataset(
    images: Tensor, labels: Tensor, target_size: int, transform: Callable[[Tensor], Tensor], seed: int
) -> tuple[Tensor, Tensor]:
    """Grow a data set offline to ``target_size`` samples, as the seed grew 520 ROIs to 12,000 images.

    The originals come first, unchanged; then augmented copies cycle through the originals in order
    (copy j is an augmentation of original j mod N). Cycling uniformly keeps the class proportions:
    class imbalance is left to the loss weighting of training rather than to duplicated minority ROIs.
    ``images`` is float in [0, 1] or uint8 (as stored); the result has the same dtype. The copies
    depend only on ``seed``; the global random state is left as it was.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images shaped (N, C, H, W), got {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"expected labels shaped ({len(images)},), got {tuple(labels.shape)}")
    if len(images) == 0:
        raise ValueError("cannot expand an empty data set")
    if target_size < len(images):
        raise ValueError(f"target_size {target_size} is smaller than the data set ({len(images)} samples)")
    if images.dtype not in (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"images must be uint8 or floating point in [0, 1], got {images.dtype}")

    sources = torch.arange(target_size - len(images), device=labels.device) % len(images)
    floats = F.to_dtype(images, torch.float32, scale=True)
    # v2 transforms draw their parameters from the global CPU generator; fork it so the caller's
    # random state is untouched and the copies depend on ``seed`` alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        copies = [transform(floats[index]) for index in sources.tolist()]
    augmented = F.to_dtype(torch.stack(copies), images.dtype, scale=True) if copies else images[:0]
    return torch.cat([images, augmented]), torch.cat([labels, labels[sources]])


def expanded(dataset: RoiDataset, target_size: int, config: AugmentationConfig, seed: int) -> RoiDataset:
    """``dataset`` grown offline to ``target_size`` ROIs by ``expand_dataset`` with the ops of ``config``
    (the seed's protocol); copies keep their source's label and patient key."""
    rows = dataset.indices
    images, labels = expand_dataset(dataset.store.images[rows], dataset.store.labels[rows], target_size,
                                    build_augmentation(config), seed)
    keys = dataset.patient_keys
    sources = [keys[i % len(keys)] for i in range(target_size - len(keys))]
    return RoiDataset(RoiArrays(images, labels, keys + sources))
