"""``pneumofed predict``: class probabilities for one box of one DICOM radiograph, as JSON on stdout.

The ROI is cut by the very function ``pneumofed prepare`` uses (square around the box centre,
antialiased resize to the model card's ROI size, optional resampling to its spacing, uint8
quantisation), so a prediction sees exactly what training and evaluation saw for that box.
Optionally the Grad-CAM heatmap of the predicted class on that ROI is written as a PNG
(``learning.heatmap``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Private to prepare, imported rather than copied: predictions must cut ROIs exactly as prepare does.
from pneumofed.common.data.prepare import MIN_ROI_SIDE, Box, cut_rois, stored_shape
from pneumofed.common.learning.heatmap import check_png_path, class_activation_maps, write_overlay
from pneumofed.common.learning.modelfile import load_model_file
from pneumofed.common.learning.models import cam_target_layer
from pneumofed.common.learning.training import select_device


class PredictionError(ValueError):
    """The input cannot be predicted on (unreadable file, box outside the image or too small)."""


def predict(
    model_path: str | Path,
    dicom_path: str | Path,
    box: Box | None = None,
    *,
    device: str = "auto",
    heatmap: str | Path | None = None,
) -> dict[str, Any]:
    """Softmax probabilities of the model for ``box`` (default: the whole image) of ``dicom_path``.

    With ``heatmap`` (a ``.png`` path, checked before anything is loaded) the Grad-CAM map of the
    predicted class on the ROI is written there too, and the result names it under ``heatmap``.
    """
    heatmap = None if heatmap is None else check_png_path(heatmap)
    dicom_path = Path(dicom_path)
    if not dicom_path.is_file():
        raise PredictionError(f"no file at {dicom_path}")
    model, card = load_model_file(model_path, device=select_device(device))
    if box is None:
        try:
            rows, columns = stored_shape(dicom_path)
        except Exception as error:  # pydicom raises many types for foreign files
            raise PredictionError(f"{dicom_path} is not a readable DICOM file: {error}") from error
        box = (0, 0, columns, rows)
    x, y, width, height = box
    if width < MIN_ROI_SIDE or height < MIN_ROI_SIDE:
        raise PredictionError(f"box {width}x{height} px is smaller than the minimum {MIN_ROI_SIDE}x{MIN_ROI_SIDE} px")
    if x < 0 or y < 0:
        raise PredictionError(f"box {box} starts outside the image")

    cut = cut_rois(dicom_path, [box], card.roi_size, card.spacing_mm)
    if cut.rejected is not None:
        reason, detail = cut.rejected
        raise PredictionError(f"{dicom_path} cannot be used ({reason}): {detail}")
    if not cut.inside[0]:
        rows, columns = cut.image_shape
        raise PredictionError(f"box {box} does not fit the {columns}x{rows} image")

    image = torch.from_numpy(cut.rois[:1]).float().div_(255.0)[:, None]  # (1, 1, S, S) as RoiDataset serves it
    with torch.inference_mode():
        probs = model(image.to(next(model.parameters()).device)).double().softmax(dim=1)[0].cpu()
    predicted = int(probs.argmax())
    result: dict[str, Any] = {
        "probabilities": {name: float(p) for name, p in zip(card.class_names, probs, strict=True)},
        "predicted": card.class_names[predicted],
        "model": str(model_path),
        "box": list(box),
    }
    if heatmap is not None:
        maps = class_activation_maps(model, cam_target_layer(card.model, model), image, [predicted]).maps
        write_overlay(heatmap, image[0, 0].numpy(), maps[0], card.class_names[predicted], float(probs[predicted]),
                      detail=f"box {','.join(map(str, box))}")  # no file name: it may name the patient
        result["heatmap"] = str(heatmap)
    return result
