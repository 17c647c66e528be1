"""The seven image augmentations of Dong et al. (2022), Table 4, as batched torchvision v2 transforms.

Every operation takes a float image in [0, 1] shaped (C, H, W) or a batch (B, C, H, W) -- a plain
tensor or a ``tv_tensors.Image`` -- and returns one of the same shape, dtype, device, type and range.
On a batch, each sample draws its own parameters, including whether the op acts on it at all
(probability ``p``); the draws come from torch's global generator of the batch's device and the work
runs there, as whole-batch tensor operations (CUDA when the batch is on CUDA).

The ops, in Table 4's order (the order ``build_augmentation`` composes them in):

1. ``RandomRotation``      angle uniform in 10..45 degrees with a random sign, bilinear; corners
                            filled from the image mirrored at its edges (or a constant, or its minimum).
2. ``FixedRotation90``     exactly ``torch.rot90(x, 1, dims=(-2, -1))``; square images only.
3. ``SharpnessEnhancement`` unsharp mask: ``clamp(x + amount * (x - gaussian_blur(x)), 0, 1)``, fixed
                            amount and sigma.
4. ``RandomHorizontalFlip`` exact mirror, ``torch.flip(x, dims=(-1,))``.
5. ``GaussianBlur``        sigma uniform in a range (the same for both axes), fixed kernel size,
                            reflect-padded borders (``kornia.filters.gaussian_blur2d``).
6. ``HistogramEqualization`` torchvision's ``equalize`` (quantised to 256 levels, deterministic).
7. ``RandomBrightness``    the seed scales V of HSV; on grayscale V is the intensity, so this
                            multiplies by a factor uniform in a range and clamps to [0, 1].
"""

from __future__ import annotations

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

# Samples ``expand_dataset`` augments per call: big enough to amortise per-call overhead, small
# enough that a chunk of float copies stays far below memory limits at any ROI size used here.
_EXPANSION_CHUNK = 256


def _like(output: Tensor, reference: Tensor) -> Tensor:
    """Give ``output`` the tv_tensor type of ``reference`` (tensor arithmetic returns plain tensors)."""
    return tv_tensors.wrap(output, like=reference) if isinstance(reference, tv_tensors.TVTensor) else output


def _uniform(count: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.empty(count, device=device).uniform_(low, high)


class PerSampleTransform(v2.Transform):
    """Base for the ops here: each sample of a batch draws its own parameters and is changed with
    probability ``p`` (it is returned untouched otherwise).

    Subclasses draw their parameters in ``sample_params`` (one value per sample, shape (N,)) and
    change the chosen samples, a (n, C, H, W) batch, in ``apply``.
    """

    _transformed_types = (tv_tensors.Image, F.is_pure_tensor)

    def __init__(self, p: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if not flat_inputs:  # nothing to transform, so nothing to draw
            return {}
        images = flat_inputs[0]
        count = 1 if images.ndim == 3 else len(images)
        chosen = torch.rand(count, device=images.device) < self.p
        return {"chosen": chosen, **self.sample_params(count, images.device)}

    def sample_params(self, count: int, device: torch.device) -> dict[str, Tensor]:
        return {}

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        plain = inpt.as_subclass(Tensor)
        if plain.ndim not in (3, 4):
            raise ValueError(f"expected a (C, H, W) image or a (B, C, H, W) batch, got shape {tuple(plain.shape)}")
        batch = plain.reshape(-1, *plain.shape[-3:])
        chosen = params["chosen"].nonzero().squeeze(1)
        op_params = {name: value for name, value in params.items() if name != "chosen"}
        if len(chosen) == 0:
            return inpt
        if len(chosen) == len(batch):
            out = self.apply(batch, op_params)
        else:
            # Most ops act on a quarter or half of a batch: compute them on the chosen samples only.
            chosen_params = {name: value[chosen] for name, value in op_params.items()}
            changed = self.apply(batch.index_select(0, chosen), chosen_params)
            out = batch.clone().index_copy_(0, chosen, changed)
        return _like(out.reshape(plain.shape), inpt)


def _rotate(images: Tensor, angles: Tensor, padding_mode: Literal["zeros", "reflection"]) -> Tensor:
    """Bilinear rotation of each image about its centre by its own angle (degrees, counter-clockwise).

    One ``affine_grid`` + ``grid_sample`` for the whole batch. The matrix maps output to input
    positions in the normalised coordinates of ``align_corners=True`` (edge pixel centres at -1 and
    1), rescaled so that the rotation is rigid in pixels for non-square images as well: the same
    mapping as torchvision's ``F.rotate``. (kornia's ``rotate`` gives the same result but builds its
    sampling grid with generic homography code, about ten times slower on CPU at ROI sizes.)
    """
    height, width = images.shape[-2:]
    # A one-pixel side has no extent in normalised coordinates, so nothing there to rescale.
    aspect = (height - 1) / (width - 1) if height > 1 and width > 1 else 1.0
    radians = torch.deg2rad(angles.to(images.dtype))
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    theta = torch.stack([torch.stack([cos, -sin * aspect, zero], 1), torch.stack([sin / aspect, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=True)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def _rotate_with_constant_fill(images: Tensor, angles: Tensor, fill: float) -> Tensor:
    """``_rotate`` filling uncovered pixels with ``fill`` the way torchvision's ``F.rotate`` does: a
    channel of ones is rotated alongside and the result blended with ``fill`` by it."""
    ones = images.new_ones(len(images), 1, *images.shape[-2:])
    both = _rotate(torch.cat([images, ones], dim=1), angles, "zeros")
    rotated, coverage = both[:, :-1], both[:, -1:]
    return (rotated - fill) * coverage + fill


class RandomRotation(PerSampleTransform):
    """Rotate by an angle whose magnitude is uniform in ``degrees`` and whose sign is random.

    ``fill`` decides what the corners uncovered by the rotation show: ``"reflect"`` (default) the
    image's own content, mirrored at its edges, so no corner is a constant value that never occurs
    at evaluation (black is lucent lung in MONOCHROME2, an emphysema-like cue); a number in [0, 1]
    that constant; ``"min"`` each image's own minimum (per channel).
    """

    def __init__(
        self,
        degrees: tuple[float, float] = (10.0, 45.0),
        fill: float | Literal["reflect", "min"] = "reflect",
        p: float = 1.0,
    ) -> None:
        super().__init__(p)
        low, high = degrees
        if not 0.0 <= low <= high <= 180.0:
            raise ValueError(f"degrees must satisfy 0 <= low <= high <= 180, got {degrees}")
        if fill not in ("reflect", "min") and not 0.0 <= fill <= 1.0:
            raise ValueError(f"fill must be in [0, 1], 'reflect' or 'min', got {fill!r}")
        self.degrees = (float(low), float(high))
        self.fill = fill

    def sample_params(self, count: int, device: torch.device) -> dict[str, Tensor]:
        magnitude = _uniform(count, *self.degrees, device=device)
        sign = torch.where(torch.rand(count, device=device) < 0.5, 1.0, -1.0)
        return {"angle": sign * magnitude}

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        angles = params["angle"]
        if self.fill == "reflect":
            # Sampling beyond an edge reflects about the edge pixels' centres (align_corners=True):
            # the same values as mirror-padding with torch's "reflect" and rotating the padded image.
            rotated = _rotate(images, angles, "reflection")
        elif self.fill == "min":
            # Rotating (x - min) with zero fill and adding min back fills each image with its own minimum.
            minimum = images.amin(dim=(-2, -1), keepdim=True)
            rotated = _rotate_with_constant_fill(images - minimum, angles, 0.0) + minimum
        else:
            rotated = _rotate_with_constant_fill(images, angles, self.fill)
        # Bilinear weights sum to 1 only up to rounding; keep the [0, 1] promise exactly.
        return rotated.clamp_(0.0, 1.0)


class FixedRotation90(PerSampleTransform):
    """Rotate by exactly 90 degrees counter-clockwise; square images only, so the shape is kept."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # Checked before the draw decides, so a non-square input fails every time, not at random.
        height, width = inpt.shape[-2:]
        if height != width:
            raise ValueError(f"FixedRotation90 keeps the shape only for square images, got {height}x{width}")
        return super().transform(inpt, params)

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        return torch.rot90(images, 1, dims=(-2, -1)).contiguous()


class SharpnessEnhancement(PerSampleTransform):
    """Unsharp mask: add back ``amount`` times the detail that a Gaussian filter removes, then clamp."""

    def __init__(self, amount: float = 1.0, kernel_size: int = 5, sigma: float = 1.0, p: float = 1.0) -> None:
        super().__init__(p)
        if amount <= 0 or sigma <= 0:
            raise ValueError(f"amount and sigma must be positive, got amount={amount}, sigma={sigma}")
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.amount, self.kernel_size, self.sigma = amount, kernel_size, sigma

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        blurred = F.gaussian_blur(images, kernel_size=[self.kernel_size] * 2, sigma=[self.sigma] * 2)
        return (images + self.amount * (images - blurred)).clamp_(0.0, 1.0)


class RandomHorizontalFlip(PerSampleTransform):
    """Mirror left-right; like torchvision's, it flips each sample with probability ``p`` = 0.5 by default."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        return torch.flip(images, dims=(-1,))


class GaussianBlur(PerSampleTransform):
    """Gaussian filter of odd ``kernel_size`` with a sigma uniform in ``sigma`` (both axes alike),
    borders reflect-padded as torchvision's ``gaussian_blur`` does."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float], p: float = 1.0) -> None:
        super().__init__(p)
        low, high = sigma
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if not 0.0 < low <= high:
            raise ValueError(f"sigma must satisfy 0 < low <= high, got {sigma}")
        self.kernel_size, self.sigma = kernel_size, (float(low), float(high))

    def sample_params(self, count: int, device: torch.device) -> dict[str, Tensor]:
        return {"sigma": _uniform(count, *self.sigma, device=device)}

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        # Imported here: a ClientApp process that only evaluates never blurs, and kornia's import is
        # most of a second of CPU in every new process.
        from kornia.filters import gaussian_blur2d

        sigma = params["sigma"].to(images.dtype)
        return gaussian_blur2d(images, self.kernel_size, torch.stack([sigma, sigma], dim=1), border_type="reflect")


class HistogramEqualization(PerSampleTransform):
    """Histogram equalisation of each image and channel (deterministic).

    torchvision quantises float input to 256 levels (exact for images that came from uint8), equalises
    with PIL's lookup table and returns floats on the k/255 grid; it does a batch at once.
    """

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        return F.equalize(images)


class RandomBrightness(PerSampleTransform):
    """Multiply intensity by a factor uniform in ``factor_range`` and clamp to [0, 1]."""

    def __init__(self, factor_range: tuple[float, float] = (0.75, 1.25), p: float = 1.0) -> None:
        super().__init__(p)
        low, high = factor_range
        if not 0.0 <= low <= high:
            raise ValueError(f"factor_range must satisfy 0 <= low <= high, got {factor_range}")
        self.factor_range = (float(low), float(high))

    def sample_params(self, count: int, device: torch.device) -> dict[str, Tensor]:
        return {"factor": _uniform(count, *self.factor_range, device=device)}

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        return (images * params["factor"].to(images.dtype).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


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

    The result takes an image or a batch; on a batch every sample draws its own parameters and its
    own coin per op, on the batch's device.
    """
    ops: dict[OpName, Callable[[], PerSampleTransform]] = {
        "random_rotation": lambda: RandomRotation(
            config.random_rotation.degrees, config.random_rotation.fill, p=config.random_rotation.p
        ),
        "fixed_rotation": lambda: FixedRotation90(p=config.fixed_rotation.p),
        "sharpness": lambda: SharpnessEnhancement(
            config.sharpness.amount, config.sharpness.kernel_size, config.sharpness.sigma, p=config.sharpness.p
        ),
        "horizontal_flip": lambda: RandomHorizontalFlip(p=config.horizontal_flip.p),
        "gaussian_blur": lambda: GaussianBlur(
            config.gaussian_blur.kernel_size, config.gaussian_blur.sigma, p=config.gaussian_blur.p
        ),
        "histogram_equalization": lambda: HistogramEqualization(p=config.histogram_equalization.p),
        "brightness": lambda: RandomBrightness(config.brightness.factor, p=config.brightness.p),
    }
    transforms = [ops[name]() for name in OP_NAMES if name in config.enabled]
    return v2.Compose(transforms) if transforms else v2.Identity()


def augment_batch(transform: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
    """Augment a (B, C, H, W) batch where it lies (its device), every sample with its own draw.

    ``transform`` must draw per sample when given a batch, as ``build_augmentation``'s ops do; a
    transform that draws once per call would treat the whole batch alike.
    """
    if batch.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(batch.shape)}")
    return transform(batch)


def expand_dataset(
    images: Tensor, labels: Tensor, target_size: int, transform: Callable[[Tensor], Tensor], seed: int
) -> tuple[Tensor, Tensor]:
    """Grow a data set offline to ``target_size`` samples, as the seed grew 520 ROIs to 12,000 images.

    The originals come first, unchanged; then augmented copies cycle through the originals in order
    (copy j is an augmentation of original j mod N). Cycling uniformly keeps the class proportions:
    class imbalance is left to the loss weighting of training rather than to duplicated minority ROIs.
    ``images`` is float in [0, 1] or uint8 (as stored); the result has the same dtype. ``transform``
    gets batches of copies and must draw per sample (as ``build_augmentation``'s ops do). The copies
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
    # The ops draw their parameters from the global generator of the images' device (the CPU for
    # stored ROIs); fork it so the caller's random state is untouched and the copies depend on
    # ``seed`` alone.
    with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
        torch.manual_seed(seed)
        copies = [transform(floats[chunk]) for chunk in sources.to(images.device).split(_EXPANSION_CHUNK)]
    augmented = F.to_dtype(torch.cat(copies), images.dtype, scale=True) if copies else images[:0]
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
