"""Which parts of the model travel between a site and the server, by BatchNorm mode.

`shared`  every floating-point tensor travels (BatchNorm statistics recalibrated at the site first);
`fedbn`   BatchNorm affine parameters and statistics stay at the site (Li et al., ICLR 2021);
`silobn`  BatchNorm statistics stay at the site, affine parameters are shared (Andreux et al. 2020).
What stays is the site's own and is kept between rounds in its Flower `context.state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn

from pneumofed.common.learning.batchnorm import batchnorm_names
from pneumofed.common.learning.state import floating_state

BatchNormMode = Literal["shared", "fedbn", "silobn"]


def site_local_names(model: nn.Module, bn_mode: BatchNormMode) -> frozenset[str]:
    """Floating-point state that never leaves the site under `bn_mode`."""
    names = batchnorm_names(model)
    floating = set(floating_state(model))
    if bn_mode == "fedbn":
        return frozenset((names.affine | names.statistics) & floating)
    if bn_mode == "silobn":
        return frozenset(names.statistics & floating)
    return frozenset()


def exchanged_state(model: nn.Module, bn_mode: BatchNormMode) -> dict[str, torch.Tensor]:
    """What a site sends (and the global model holds): the floating state minus the site-local part."""
    local = site_local_names(model, bn_mode)
    return {name: tensor for name, tensor in floating_state(model).items() if name not in local}


def local_state(model: nn.Module, bn_mode: BatchNormMode) -> dict[str, torch.Tensor]:
    local = site_local_names(model, bn_mode)
    return {name: tensor for name, tensor in floating_state(model).items() if name in local}


def load_exchanged_state(
    model: nn.Module,
    arrays: Mapping[str, np.ndarray | torch.Tensor],
    bn_mode: BatchNormMode,
    local: Mapping[str, np.ndarray | torch.Tensor] | None = None,
) -> None:
    """Load the global `arrays` (exactly the exchanged names) and, when given, the site's own `local` part."""
    expected = set(exchanged_state(model, bn_mode))
    received = set(arrays)
    if received != expected:
        missing, unexpected = sorted(expected - received), sorted(received - expected)
        raise ValueError(f"model state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tensors = {name: torch.as_tensor(np.asarray(value)) for name, value in arrays.items()}
    if local:
        if set(local) != set(local_state(model, bn_mode)):
            raise ValueError("the site's saved BatchNorm state does not fit this model")
        tensors |= {name: torch.as_tensor(np.asarray(value)) for name, value in local.items()}
    model.load_state_dict(tensors, strict=False)
