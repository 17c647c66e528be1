"""Model registry: ShuffleNetV2-ECA (Dong et al. 2022) and the torchvision models it was compared with.

Every model is randomly initialised, takes ``(B, in_channels, H, W)`` images (grayscale by default) and
returns logits ``(B, num_classes)`` as a plain tensor in train and eval mode.

ShuffleNetV2-ECA follows torchvision's ``shufflenetv2.py``: an :class:`ECA` module, a unit
(:class:`ECAInvertedResidual`, torchvision's ``InvertedResidual`` with ECA) and one configurable network
(:class:`ShuffleNetV2ECA`, a subclass of torchvision's ``ShuffleNetV2``). The seed combines ShuffleNetV2
with ECA "after each convolution layer"; here that is read per convolution *block*:

* at the end of every convolution branch of every ShuffleNet unit, i.e. after the branch's last
  1x1 conv + BN + ReLU and before the concat and channel shuffle (``branch2`` of every unit, and also
  ``branch1`` of the downsampling units, which is a convolution branch of its own);
* after ``conv5``, on the features that are pooled and classified.

Why there: the untouched half of a stride-1 unit stays an exact identity shortcut (gating it would
attenuate the signal 16 times over), the shuffle then mixes recalibrated and shortcut channels into the
next unit, and ShuffleNet units are memory-bound, so one gate per branch keeps throughput close to the
plain network where a gate after each of the ~50 conv layers would not. The gates add a few dozen
parameters (0.002-0.02 % of the network, by width).

``norm_layer="group"`` builds any of them with GroupNorm in place of every BatchNorm (Opacus'
``ModuleValidator.fix``: ``gcd(32, channels)`` groups, affine as the BatchNorm was): DP-SGD needs
per-sample gradients, and BatchNorm mixes the samples of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2

MODEL_NAMES = ("shufflenet_v2_eca", "shufflenet_v2", "resnet50", "googlenet", "densenet121")
# Architectures whose per-sample gradients Opacus' hooks can follow. torchvision's ResNet50,
# GoogLeNet and DenseNet121 modify a normalisation layer's output in place (`out += identity`,
# `F.relu(x, inplace=True)`), which autograd forbids on the outputs those hooks observe.
DP_SGD_MODELS = ("shufflenet_v2_eca", "shufflenet_v2")
NormLayer = Literal["batch", "group"]

# torchvision's shufflenet_v2_x*_* configurations: repeats of stages 2-4 and output channels of
# conv1, stages 2-4 and conv5.
SHUFFLENET_STAGES_REPEATS = [4, 8, 4]
SHUFFLENET_STAGES_OUT_CHANNELS: dict[float, list[int]] = {
    0.5: [24, 48, 96, 192, 1024],
    1.0: [24, 116, 232, 464, 1024],
    1.5: [24, 176, 352, 704, 1024],
    2.0: [24, 244, 488, 976, 2048],
}


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive 1-D kernel size: |log2(C)/gamma + b/gamma| made odd (Wang et al. 2020, Eq. 12)."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """Efficient channel attention: global average pool, 1-D conv across channels, sigmoid gate.

    No dimensionality reduction; the only parameters are the ``k`` weights of the 1-D convolution.
    The output is ``x`` scaled per (sample, channel) by a gate in (0, 1).
    """

    def __init__(self, channels: int, gamma: int = 2, b: int = 1) -> None:
        super().__init__()
        kernel_size = eca_kernel_size(channels, gamma, b)
        self.channels = channels
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"ECA({self.channels}) expects (B, {self.channels}, H, W), got {tuple(x.shape)}")
        # Global average pool written as sum * (1/HW): the sum's backward is a broadcast view where
        # mean's backward materialises a divided full-size copy (one memory pass less per gate).
        descriptor = x.sum((2, 3)).unsqueeze(1) * (1.0 / (x.shape[2] * x.shape[3]))
        # One conv1d over (B, 1, C) treats the channel descriptor as a 1-D signal: local cross-channel
        # interaction with k neighbours, shared weights for all channels.
        gate = torch.sigmoid(self.conv(descriptor)).squeeze(1)
        return x * gate[:, :, None, None]


class ECAInvertedResidual(InvertedResidual):
    """torchvision's ShuffleNetV2 unit with ECA closing each convolution branch (before concat + shuffle)."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__(inp, oup, stride)
        branch_features = oup // 2
        self.branch2.append(ECA(branch_features))
        if self.stride > 1:
            self.branch1.append(ECA(branch_features))


class ShuffleNetV2ECA(ShuffleNetV2):
    """ShuffleNetV2 built from :class:`ECAInvertedResidual` units, with ECA after ``conv5``."""

    def __init__(
        self,
        stages_repeats: list[int],
        stages_out_channels: list[int],
        num_classes: int = 3,
        in_channels: int = 1,
    ) -> None:
        super().__init__(stages_repeats, stages_out_channels, num_classes, inverted_residual=ECAInvertedResidual)
        self.conv5.append(ECA(stages_out_channels[-1]))
        if in_channels != 3:
            self.conv1[0] = _conv_like(self.conv1[0], in_channels)


def _conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A freshly initialised copy of ``conv`` reading ``in_channels`` channels."""
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _with_stem(
    model: nn.Module, parent: nn.Module, attr: str, in_channels: int, init: Callable[[Tensor], object] | None
) -> nn.Module:
    """Replace ``parent.<attr>`` (the stem conv) by one reading ``in_channels``, initialised as its family."""
    if in_channels != 3:
        stem = _conv_like(getattr(parent, attr), in_channels)
        if init is not None:
            init(stem.weight)
        setattr(parent, attr, stem)
    return model


def _build_shufflenet_v2(num_classes: int, in_channels: int, width: float) -> nn.Module:
    model = ShuffleNetV2(SHUFFLENET_STAGES_REPEATS, SHUFFLENET_STAGES_OUT_CHANNELS[width], num_classes)
    return _with_stem(model, model.conv1, "0", in_channels, None)


def _build_resnet50(num_classes: int, in_channels: int, width: float) -> nn.Module:
    model = models.resnet50(weights=None, num_classes=num_classes)
    init = partial(nn.init.kaiming_normal_, mode="fan_out", nonlinearity="relu")
    return _with_stem(model, model, "conv1", in_channels, init)


def _build_googlenet(num_classes: int, in_channels: int, width: float) -> nn.Module:
    # transform_input re-normalises 3-channel ImageNet input; it has no meaning for grayscale ROIs.
    model = models.googlenet(
        weights=None, num_classes=num_classes, aux_logits=False, init_weights=True, transform_input=False
    )
    init = partial(nn.init.trunc_normal_, mean=0.0, std=0.01, a=-2, b=2)
    return _with_stem(model, model.conv1, "conv", in_channels, init)


def _build_densenet121(num_classes: int, in_channels: int, width: float) -> nn.Module:
    model = models.densenet121(weights=None, num_classes=num_classes)
    return _with_stem(model, model.features, "conv0", in_channels, nn.init.kaiming_normal_)


def _build_shufflenet_v2_eca(num_classes: int, in_channels: int, width: float) -> nn.Module:
    return ShuffleNetV2ECA(SHUFFLENET_STAGES_REPEATS, SHUFFLENET_STAGES_OUT_CHANNELS[width], num_classes, in_channels)


_BUILDERS: dict[str, Callable[[int, int, float], nn.Module]] = {
    "shufflenet_v2_eca": _build_shufflenet_v2_eca,
    "shufflenet_v2": _build_shufflenet_v2,
    "resnet50": _build_resnet50,
    "googlenet": _build_googlenet,
    "densenet121": _build_densenet121,
}
_WIDTHS: dict[str, tuple[float, ...]] = {
    "shufflenet_v2_eca": tuple(SHUFFLENET_STAGES_OUT_CHANNELS),
    "shufflenet_v2": tuple(SHUFFLENET_STAGES_OUT_CHANNELS),
}


# Grad-CAM's layer per architecture: the last convolutional feature block, whose output the
# classifier pools, so the gradients weigh exactly the features the decision was made on. Named by
# module path rather than by position; DenseNet's is its last dense block, not `features` itself,
# because torchvision applies ReLU in place to the output of `features`, overwriting the
# activations Grad-CAM saved from it.
_CAM_TARGET_LAYERS: dict[str, str] = {
    "shufflenet_v2_eca": "conv5",
    "shufflenet_v2": "conv5",
    "resnet50": "layer4",
    "googlenet": "inception5b",
    "densenet121": "features.denseblock4",
}


def cam_target_layer(name: str, model: nn.Module) -> nn.Module:
    """The layer of ``model`` (built by ``build_model(name, ...)``) whose activations Grad-CAM explains."""
    if name not in _CAM_TARGET_LAYERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return model.get_submodule(_CAM_TARGET_LAYERS[name])


def build_model(
    name: str, num_classes: int = 3, in_channels: int = 1, width: float = 1.0, norm_layer: NormLayer = "batch"
) -> nn.Module:
    """A randomly initialised classifier ``name`` returning logits ``(B, num_classes)``.

    ``width`` is the ShuffleNet width multiplier (0.5, 1.0, 1.5, 2.0) and must be 1.0 for the others.
    ``norm_layer`` is ``batch`` (BatchNorm, as published) or ``group`` (GroupNorm instead).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    valid_widths = _WIDTHS.get(name, (1.0,))
    if width not in valid_widths:
        raise ValueError(f"width {width} is not valid for {name}; valid widths: {valid_widths}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if norm_layer not in ("batch", "group"):
        raise ValueError(f"norm_layer must be 'batch' or 'group', got {norm_layer!r}")
    model = _BUILDERS[name](num_classes, in_channels, float(width))
    if norm_layer == "batch":
        return model
    from opacus.validators import ModuleValidator  # Opacus costs seconds to import: only for group norm

    return ModuleValidator.fix(model)
