"""A model's floating-point state: what model files store and what sites and the server exchange.

Only floating-point state (parameters and BatchNorm running statistics) is exchanged: the
integer `num_batches_tracked` counters are local bookkeeping, and averaging them would
silently turn them into floats on the server.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


class UnsafeFile(ValueError):
    """A file meant to hold tensors and plain data holds something else (e.g. code run on loading)."""


def load_tensor_file(path: str | Path) -> Any:
    """`torch.load` of tensors, numbers, strings, lists and dicts only; anything else (a pickled
    object, which could run code) is refused with `UnsafeFile`. Every model file and checkpoint
    pneumofed reads goes through here."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests loading with weights_only=False: exactly what must not happen.
        raise UnsafeFile(
            f"{path} holds more than tensors and plain data (it could run code when opened); refusing to load it"
        ) from None
