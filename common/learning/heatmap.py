"""Grad-CAM heatmaps: where in a ROI the model found the evidence for a class, for radiologists to check.

Grad-CAM (Selvaraju et al. 2017, via the ``grad-cam`` library) weighs each channel of the
architecture's last convolutional feature block (``models.cam_target_layer``) by the mean gradient
of the class logit, sums the weighted channels, keeps the positive part and upsamples it to the ROI.
That block is 32 times coarser than the ROI in every registry model, so a 64-px ROI gets a 2x2
map and a 128-px ROI a 4x4 one, smoothed by bilinear upsampling: the map says which part of the
ROI, not which pixels. Each map is scaled to [0, 1] on its own (it shows where, not how strongly).

Computing a map leaves the model as it was: parameters, their gradients, ``requires_grad`` flags
and train/eval mode are restored, and BatchNorm statistics are untouched because it runs in eval mode.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # hospital servers and CI have no display
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pneumofed.common.data.store import RoiStore
from pneumofed.common.learning.batchnorm import recalibrate_batchnorm
from pneumofed.common.learning.evaluation import PARTS, evaluated_part
from pneumofed.common.learning.modelfile import load_model_file
from pneumofed.common.learning.models import cam_target_layer
from pneumofed.common.learning.training import select_device

# Heatmap files are named after ROI ids; anything else (a path separator, "..") never becomes a name.
_SAFE_ROI_ID = re.compile(r"[0-9A-Za-z_-]+")


class HeatmapPathError(ValueError):
    """A heatmap cannot be written where it was asked to go."""


@dataclass(frozen=True)
class ClassActivationMaps:
    """Grad-CAM maps of a batch of ROIs and what they explain."""

    maps: np.ndarray  # float32 (B, H, W) in [0, 1], the ROIs' shape
    classes: np.ndarray  # int64 (B,): the class each map is of
    probabilities: np.ndarray  # float64 (B, num_classes): the model's softmax on the ROIs


@contextmanager
def _inspecting(model: nn.Module) -> Iterator[None]:
    """Eval mode with frozen parameters; afterwards mode, ``requires_grad`` and ``.grad`` are as before.

    Frozen parameters keep Grad-CAM's backward pass from writing gradients into them; the library
    also calls ``model.zero_grad()``, which would drop gradients a caller still holds.
    """
    was_training = model.training
    parameters = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in parameters]
    model.eval()
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, (requires_grad, grad) in zip(parameters, saved, strict=True):
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad
        model.train(was_training)


def class_activation_maps(
    model: nn.Module, target_layer: nn.Module, images: Tensor, classes: Sequence[int] | None = None
) -> ClassActivationMaps:
    """Grad-CAM of ``classes`` (default: each ROI's predicted class) for ``images`` (B, C, H, W) in [0, 1].

    ``target_layer`` is the module of ``model`` whose activations are weighed: for a registry
    model, ``cam_target_layer(card.model, model)``. The images are moved to the model's device;
    the maps come back on the CPU.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    device = next(model.parameters()).device
    inputs = images.to(device=device, dtype=torch.float32, copy=True)  # the caller's tensor stays untouched
    with _inspecting(model):
        with torch.inference_mode():
            probabilities = model(inputs).double().softmax(dim=1).cpu().numpy()
        explained = probabilities.argmax(axis=1) if classes is None else np.asarray(classes, dtype=np.int64)
        if explained.shape != (len(images),):
            raise ValueError(f"need one class per image ({len(images)}), got {explained.shape}")
        num_classes = probabilities.shape[1]
        if ((explained < 0) | (explained >= num_classes)).any():
            raise ValueError(f"classes must lie in [0, {num_classes}), got {explained.tolist()}")
        cam = GradCAM(model, [target_layer])
        try:
            # With the parameters frozen, the input is what makes the target layer's output require
            # a gradient; enable_grad so that callers inside no_grad still get a map.
            with torch.enable_grad():
                maps = cam(inputs.requires_grad_(True), [ClassifierOutputTarget(int(c)) for c in explained])
        finally:
            cam.activations_and_grads.release()  # its hooks would otherwise stay on the model
    return ClassActivationMaps(maps=maps, classes=explained, probabilities=probabilities)


def write_overlay(
    path: str | Path, roi: np.ndarray, heatmap: np.ndarray, predicted: str, probability: float, detail: str = ""
) -> Path:
    """PNG of the ROI beside the ROI with ``heatmap`` overlaid, titled with the predicted class, its
    probability and ``detail``. ``roi`` and ``heatmap`` are (H, W) in [0, 1].
    """
    path = Path(path)
    grey = np.repeat(roi.astype(np.float32)[:, :, None], 3, axis=2)
    overlay = show_cam_on_image(grey, heatmap.astype(np.float32), use_rgb=True, image_weight=0.5)
    fig, (plain_axis, overlay_axis) = plt.subplots(1, 2, figsize=(6.6, 3.6), layout="constrained")
    plain_axis.imshow(roi, cmap="gray", vmin=0.0, vmax=1.0)
    plain_axis.set_title("ROI")
    overlay_axis.imshow(overlay)
    overlay_axis.set_title("Grad-CAM")
    for axis in (plain_axis, overlay_axis):
        axis.set_axis_off()
    # show_cam_on_image colours with OpenCV's JET, which matplotlib's "jet" matches.
    fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="jet"), ax=overlay_axis, fraction=0.046,
                 label="relative evidence")
    fig.suptitle(f"predicted {predicted} (p = {probability:.3f})" + (f"\n{detail}" if detail else ""))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_png_path(path: str | Path) -> Path:
    """``path`` if a PNG can be written there, else `HeatmapPathError` saying why."""
    path = Path(path)
    if path.is_dir():
        raise HeatmapPathError(f"heatmap {path} is a folder; give a file name such as {path / 'heatmap.png'}")
    if path.suffix.lower() != ".png":
        raise HeatmapPathError(f"heatmap {path} must be a .png file")
    folder = path.parent
    if not folder.is_dir():
        raise HeatmapPathError(f"cannot write heatmap {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HeatmapPathError(f"cannot write heatmap {path}: permission denied")
    return path


def prepare_heatmap_dir(path: str | Path) -> Path:
    """Create folder ``path`` if needed and check it is writable, else `HeatmapPathError` saying why."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HeatmapPathError(f"heatmap folder {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HeatmapPathError(f"cannot create heatmap folder {path}: {error.strerror or error}") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise HeatmapPathError(f"cannot write into heatmap folder {path}: permission denied")
    return path


def write_store_heatmaps(
    model_path: str | Path,
    store: str | Path,
    out_dir: str | Path,
    *,
    part: str = "all",
    split_seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    calibrate_bn: bool = False,
) -> list[Path]:
    """``<out_dir>/<roi_id>.png`` for every ROI of ``store`` that ``evaluate_model_file`` scores with
    the same ``part``, ``split_seed`` and ``calibrate_bn``: the map of the predicted class, with the
    ROI's label in the title. ROI ids are pseudonymous (a source-file hash prefix and a counter).
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {', '.join(PARTS)}")
    out_dir = prepare_heatmap_dir(out_dir)
    model, card = load_model_file(model_path, device=select_device(device))
    dataset = evaluated_part(store, card, part, split_seed)  # the ROIs evaluate_model_file scores
    roi_store: RoiStore = dataset.store  # type: ignore[assignment]  # both selections index one RoiStore
    records = [roi_store.index.records[i] for i in dataset.indices.tolist()]
    roi_ids = [record.roi_id for record in records]
    unsafe = [roi_id for roi_id in roi_ids if not _SAFE_ROI_ID.fullmatch(roi_id)]
    if unsafe:
        raise ValueError(f"ROI ids {unsafe[:3]} of {store} cannot name files; re-run `pneumofed prepare`")
    if len(set(roi_ids)) != len(roi_ids):
        raise ValueError(f"{store} names several ROIs alike; re-run `pneumofed prepare`")

    if calibrate_bn:
        recalibrate_batchnorm(model, dataset, batch_size, next(model.parameters()).device)
    target_layer = cam_target_layer(card.model, model)
    written = []
    done = 0
    for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        result = class_activation_maps(model, target_layer, images)
        batch_records = records[done : done + len(images)]
        for record, image, heatmap, predicted, probabilities in zip(
            batch_records, images, result.maps, result.classes, result.probabilities, strict=True
        ):
            written.append(write_overlay(
                out_dir / f"{record.roi_id}.png", image[0].numpy(), heatmap, card.class_names[predicted],
                float(probabilities[predicted]), detail=f"ROI {record.roi_id}, labelled {record.finding}",
            ))
        done += len(images)
    return written
