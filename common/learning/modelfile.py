"""A trained model on disk: weights plus everything needed to rebuild and feed it."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pneumofed.common.files import atomic_write
from pneumofed.common.learning.models import NormLayer, build_model
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
    norm_layer: NormLayer = "batch"
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
    model = build_model(card.model, len(card.class_names), in_channels=card.in_channels, width=card.width,
                        norm_layer=card.norm_layer)
    load_floating_state(model, payload["state"])
    return model.to(device).eval(), card


class IncompatibleModelFile(ValueError):
    """A model file built for another architecture, width, class list or ROI size than its user."""


def require_compatible(
    card: ModelCard,
    source: str | Path,
    *,
    model: str,
    width: float,
    class_names: Sequence[str],
    roi_size: int,
    fixes: Mapping[str, str],
    in_channels: int = 1,
    norm_layer: NormLayer = "batch",
) -> None:
    """Raise `IncompatibleModelFile` unless `card` was built exactly as its user builds its model:
    same model name, width, input channels, normalisation layers, class names in the same order and
    ROI size.

    The one rule for starting training from a model file (federated `init-model`, `train --init`).
    `fixes` says, per setting (`model`, `width`, `class_names`, `roi_size`, `in_channels`, `norm_layer`), how the
    user changes theirs to the file's; ``{file}`` in it is replaced by the file's value.
    """
    wanted = {"model": model, "width": float(width), "in_channels": in_channels,
              "class_names": list(class_names), "roi_size": roi_size, "norm_layer": norm_layer}
    labels = {"model": "model", "width": "width", "in_channels": "input channels",
              "class_names": "classes (names in order)", "roi_size": "ROI size (px)",
              "norm_layer": "normalisation layers"}
    differences = []
    for name, value in wanted.items():
        held = getattr(card, name)
        if held != value:
            rendered = ",".join(held) if name == "class_names" else held
            fix = fixes.get(name)
            differences.append(
                f"{labels[name]}: {held!r} in the file, {value!r} here" + (f" ({fix.format(file=rendered)})" if fix else "")
            )
    if differences:
        raise IncompatibleModelFile(
            f"{source} does not fit this model: " + "; ".join(differences)
            + ". Change these settings to the file's, or start from a model file trained with yours."
        )
