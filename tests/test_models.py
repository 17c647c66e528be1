from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pneumofed.common.learning.models import (
    ECA,
    MODEL_NAMES,
    SHUFFLENET_STAGES_OUT_CHANNELS,
    ECAInvertedResidual,
    build_model,
    eca_kernel_size,
)


def paper_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """Wang et al. 2020, Eq. 12: k = |log2(C)/gamma + b/gamma|_odd (nearest odd number)."""
    t = int(abs(math.log2(channels) / gamma + b / gamma))
    return t if t % 2 == 1 else t + 1


def eca_modules(model: nn.Module) -> list[ECA]:
    return [m for m in model.modules() if isinstance(m, ECA)]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_model_returns_plain_logits_in_train_and_eval_mode(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, in_channels=in_channels)
    images = torch.rand(2, in_channels, 64, 64)
    for training in (True, False):
        model.train(training)
        logits = model(images)
        assert type(logits) is torch.Tensor  # googlenet must not return its aux-logits namedtuple
        assert logits.shape == (2, 4)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_grayscale_is_the_default_input(name: str) -> None:
    model = build_model(name).eval()
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 3)
    with pytest.raises(RuntimeError):
        model(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("width", sorted(SHUFFLENET_STAGES_OUT_CHANNELS))
@pytest.mark.parametrize("name", ["shufflenet_v2", "shufflenet_v2_eca"])
def test_shufflenet_width_selects_torchvision_stage_channels(name: str, width: float) -> None:
    model = build_model(name, width=width)
    assert model.stage4[0].branch2[0].out_channels == SHUFFLENET_STAGES_OUT_CHANNELS[width][3] // 2
    assert model.fc.in_features == SHUFFLENET_STAGES_OUT_CHANNELS[width][4]


def test_shufflenet_v2_matches_torchvision_apart_from_the_stem() -> None:
    from torchvision.models import shufflenet_v2_x1_0

    ours = build_model("shufflenet_v2", num_classes=3, in_channels=3)
    reference = shufflenet_v2_x1_0(weights=None, num_classes=3)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }


def test_bad_names_widths_and_sizes_are_rejected_with_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="shufflenet_v2_eca"):
        build_model("mobilenet")
    with pytest.raises(ValueError, match="valid widths"):
        build_model("shufflenet_v2_eca", width=0.75)
    with pytest.raises(ValueError, match="valid widths"):
        build_model("resnet50", width=0.5)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("googlenet", num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("densenet121", in_channels=0)


@pytest.mark.parametrize("channels", [1, 3, 24, 48, 58, 64, 96, 116, 176, 232, 256, 464, 512, 1024, 2048])
def test_eca_kernel_size_follows_the_paper_formula(channels: int) -> None:
    assert eca_kernel_size(channels) == paper_kernel_size(channels)
    assert eca_kernel_size(channels, gamma=1, b=2) == paper_kernel_size(channels, gamma=1, b=2)
    assert eca_kernel_size(channels) % 2 == 1


@pytest.mark.parametrize("channels, expected", [(24, 3), (64, 3), (116, 3), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_kernel_size_known_values(channels: int, expected: int) -> None:
    assert eca_kernel_size(channels) == expected


def test_eca_kernel_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        eca_kernel_size(0)
    with pytest.raises(ValueError):
        eca_kernel_size(64, gamma=0)


def test_eca_gates_each_channel_by_a_sigmoid_of_a_1d_conv_over_pooled_channels() -> None:
    torch.manual_seed(0)
    eca = ECA(64)
    x = torch.rand(2, 64, 5, 7) + 0.01
    out = eca(x)

    weight = eca.conv.weight.detach()
    pooled = x.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C)
    expected_gate = torch.sigmoid(F.conv1d(pooled, weight, padding=weight.shape[-1] // 2)).squeeze(1)
    torch.testing.assert_close(out, x * expected_gate[:, :, None, None])

    ratio = out / x
    assert ((ratio > 0) & (ratio < 1)).all()
    assert ((out >= 0) & (out <= x)).all()
    # one gate per (sample, channel): constant over space
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    assert eca.conv.weight.shape == (1, 1, 3) and eca.conv.bias is None


def test_eca_rejects_a_tensor_with_the_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="ECA"):
        ECA(64)(torch.rand(1, 32, 4, 4))


def test_eca_sits_at_the_end_of_every_conv_branch_and_after_conv5() -> None:
    model = build_model("shufflenet_v2_eca")
    units = [m for m in model.modules() if isinstance(m, ECAInvertedResidual)]
    assert len(units) == 16
    for unit in units:
        assert isinstance(unit.branch2[-1], ECA)
        assert isinstance(unit.branch1[-1], ECA) if unit.stride > 1 else len(unit.branch1) == 0
    assert isinstance(model.conv5[-1], ECA)
    assert len(eca_modules(model)) == 16 + 3 + 1


def test_eca_unit_leaves_the_identity_half_untouched() -> None:
    unit = ECAInvertedResidual(116, 116, stride=1).eval()
    x = torch.randn(2, 116, 8, 8)
    out = unit(x)
    # channel shuffle with two groups interleaves [identity half, conv branch]
    torch.testing.assert_close(out[:, 0::2], x[:, :58])


@pytest.mark.parametrize("width", sorted(SHUFFLENET_STAGES_OUT_CHANNELS))
def test_eca_parameter_overhead_is_below_a_tenth_of_a_percent(width: float) -> None:
    with_eca = build_model("shufflenet_v2_eca", width=width)
    plain = build_model("shufflenet_v2", width=width)
    overhead = parameter_count(with_eca) - parameter_count(plain)
    assert overhead == sum(parameter_count(m) for m in eca_modules(with_eca)) > 0
    assert overhead / parameter_count(plain) < 1e-3


def test_gradients_reach_every_eca_conv_after_one_backward() -> None:
    torch.manual_seed(0)
    model = build_model("shufflenet_v2_eca", width=0.5)
    loss = F.cross_entropy(model(torch.rand(4, 1, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for eca in eca_modules(model):
        assert eca.conv.weight.grad is not None
        assert eca.conv.weight.grad.abs().sum() > 0


def synthetic_patterns(per_class: int = 10, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Three visually distinct classes (horizontal stripes, vertical stripes, a bright disc) plus noise."""
    generator = torch.Generator().manual_seed(0)
    coords = torch.arange(size, dtype=torch.float32)
    rows, cols = coords[:, None].expand(size, size), coords[None, :].expand(size, size)
    patterns = [
        (rows // 4 % 2).float(),
        (cols // 4 % 2).float(),
        (((rows - size / 2) ** 2 + (cols - size / 2) ** 2) < (size / 4) ** 2).float(),
    ]
    images, labels = [], []
    for label, pattern in enumerate(patterns):
        noise = 0.2 * torch.rand(per_class, 1, size, size, generator=generator)
        images.append((0.8 * pattern + noise).clamp(0, 1))
        labels += [label] * per_class
    return torch.cat(images), torch.tensor(labels)


def test_shufflenet_v2_eca_overfits_a_tiny_synthetic_set() -> None:
    torch.manual_seed(0)
    images, labels = synthetic_patterns()
    model = build_model("shufflenet_v2_eca", width=0.5)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):
        optimiser.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimiser.step()
    # At lr 3e-3 the weights move faster than BatchNorm's running averages (momentum 0.1) follow, so
    # re-estimate them for the final weights before judging the model in eval mode.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average: one pass gives the exact statistics
        model(images)
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.95
