"""BatchNorm layers found by module type, and their statistics recalibrated on a site's data.

torchvision's ShuffleNetV2 names its BatchNorm layers by position (`stage2.0.branch2.1`), so a
filter on names misses them: every helper here selects `_BatchNorm` modules by type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class BatchNormNames:
    """State-dict names of a model's BatchNorm tensors."""

    affine: frozenset[str]  # weight, bias: trained parameters
    statistics: frozenset[str]  # running_mean, running_var, num_batches_tracked: buffers

    @property
    def variances(self) -> frozenset[str]:
        return frozenset(name for name in self.statistics if name.endswith("running_var"))


def batchnorm_names(model: nn.Module) -> BatchNormNames:
    affine, statistics = set(), set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            base = f"{prefix}." if prefix else ""
            affine.update(f"{base}{name}" for name, _ in module.named_parameters(recurse=False))
            statistics.update(f"{base}{name}" for name, _ in module.named_buffers(recurse=False))
    return BatchNormNames(frozenset(affine), frozenset(statistics))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> None:
    """Replace every running mean and variance by the exact (cumulative) average of the batch
    statistics over `dataset` as it is, un-augmented, with the current weights.

    A site takes only a few optimiser steps per round, so with the default momentum most of each
    running statistic would still describe earlier weights; evaluation in `eval()` mode uses them.
    """
    n = len(dataset)
    # A trailing batch of one has no batch statistics at 1x1 feature maps: drop it, and only it.
    images = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=n > batch_size and n % batch_size == 1)
    update_bn(((batch[0],) for batch in images), model.to(device), device=device)
