"""A model's floating-point state: what model files store and what sites and the server exchange.

Only floating-point state (parameters and BatchNorm running statistics) is exchanged: the
integer `num_batches_tracked` counters are local bookkeeping, and averaging them would
silently turn them into floats on the server.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def floating_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point state, detached and on the CPU, in state-dict order."""
    return {
        name: tensor.detach().cpu()
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }


def load_floating_state(model: nn.Module, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Load exchanged state into `model`; every exchanged entry must be present, nothing else."""
    expected = set(floating_state(model))
    received = set(arrays)
    if received != expected:
        missing, unexpected = sorted(expected - received), sorted(received - expected)
        raise ValueError(f"model state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tensors = {name: torch.as_tensor(np.asarray(value)) for name, value in arrays.items()}
    model.load_state_dict(tensors, strict=False)
