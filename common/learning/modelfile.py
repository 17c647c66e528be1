"""A trained model on disk: weights plus everything needed to rebuild and feed it."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pneumofed.common.files import atomic_write
from pneumofed.common.learning.models import build_model
from pneumofed.common.learning.state import floating_state, load_floating_state, load_tensor_file

FORMAT = "pneumofed-model/1"


class ModelCard(BaseModel):
    """How the weights were built and what input they expect."""

    model_config = ConfigDict(frozen=True)

    format: str = FORMAT
    model: str
    width: float = 1.0
    in_channels: int = 1
    class_names: list[str] = Field(min_length=2)
    roi_size: int
    spacing_mm: float | None = None
    provenance: dict[str, str | int | float | None] = Field(default_factory=dict)


def save_model_file(path: str | Path, model: nn.Module, card: ModelCard) -> Path:
    buffer = io.BytesIO()
    torch.save({"card": card.model_dump(), "state": floating_state(model)}, buffer)
    return atomic_write(path, buffer.getvalue())  # never a half-written model where a reader expects one


def load_model_file(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelCard]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    payload = load_tensor_file(path)  # UnsafeFile for anything that could run code
    try:
        card = ModelCard.model_validate(payload["card"])
    except Exception as error:  # a foreign file: not a mapping, or no valid card
        raise ValueError(f"{path} is not a pneumofed model file: {error}") from error
    if card.format != FORMAT:
        raise ValueError(f"{path}: unsupported model file format {card.format!r}")
    model = build_model(card.model, len(card.class_names), in_channels=card.in_channels, width=card.width)
    load_floating_state(model, payload["state"])
    return model.to(device).eval(), card
