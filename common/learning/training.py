"""The one train/evaluate loop shared by federated clients, the centralised baseline and simulations.

Dataset items are ``(image float32 (1, H, W) in [0, 1], int label)``; any ``torch.utils.data.Dataset``
works. ``augment`` is a batch transform that draws per sample (what ``build_augmentation`` returns);
the loop applies it online to each batch on the training device through ``augment_batch``, so every
sample draws its own random parameters, in whole-batch operations on that device.
"""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from pneumofed.common.learning.augment import augment_batch

if TYPE_CHECKING:  # Opacus costs seconds to import: only DP-SGD runs load privacy.py
    from pneumofed.common.learning.privacy import DPSGD

_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
_MAX_SEED = 2**32 - 1  # numpy's legacy seeding accepts 32-bit seeds only


class TrainConfig(BaseModel):
    """Hyper-parameters of one call to :func:`train` (defaults: Dong et al. 2022)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(30, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    class_weighting: bool = False
    seed: int = Field(0, ge=0, le=_MAX_SEED)
    device: str = "auto"
    progress: bool | None = None

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value


@dataclass
class TrainHistory:
    """Per-epoch mean training loss (data term only, without the proximal term) and accuracy, and
    Adam's moments at the end (to continue from them next time: `train(..., optimizer_moments=...)`)."""

    num_examples: int
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    optimizer_moments: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    labels: np.ndarray  # int64 (N,)
    probs: np.ndarray  # float64 (N, K), rows are softmax distributions

    @property
    def num_examples(self) -> int:
        return len(self.labels)


EpochCallback = Callable[[int, TrainHistory], bool | None]


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; an explicit CUDA request without a usable GPU is an error."""
    if not _DEVICE_PATTERN.fullmatch(preference):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {preference!r}")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {preference!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {preference!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so weight init, dropout and augmentation repeat."""
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must be in [0, {_MAX_SEED}], got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def balanced_class_weights(labels: Sequence[int] | np.ndarray | Tensor, num_classes: int) -> Tensor:
    """Inverse-frequency ("balanced") weights ``n / (n_present_classes * count_k)``.

    Equals ``sklearn.utils.class_weight.compute_class_weight("balanced", classes=np.unique(y), y=y)``
    for the classes present; a class absent from ``labels`` gets weight 0 (it is never a target, so
    it never enters the loss).
    """
    y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if y.numel() == 0:
        raise ValueError("class_weights needs at least one label")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    counts = torch.bincount(y, minlength=num_classes).to(torch.float32)
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = y.numel() / (int(present.sum()) * counts[present])
    return weights


def dataset_labels(dataset: Dataset) -> Tensor:
    """All labels of ``dataset`` as int64 (N,), reading label tensors directly when the type allows."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].to(torch.int64).reshape(-1)
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    if isinstance(getattr(dataset, "labels", None), Tensor):
        return dataset.labels.to(torch.int64).reshape(-1)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


def train(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    *,
    augment: Callable[[Tensor], Tensor] | None = None,
    proximal_mu: float = 0.0,
    class_weights: Sequence[float] | Tensor | None = None,
    optimizer_moments: Mapping[str, Tensor] | None = None,
    on_epoch_end: EpochCallback | None = None,
    dp: DPSGD | None = None,
) -> TrainHistory:
    """Train ``model`` in place with Adam and cross-entropy; returns per-epoch loss and accuracy.

    The global RNGs are re-seeded from ``config.seed`` so a call is reproducible on CPU (vary the
    seed per federated round to get fresh shuffles). ``proximal_mu > 0`` adds FedProx's
    ``mu/2 * ||w - w_start||^2`` with ``w_start`` the weights at the start of this call.
    ``class_weights`` (one per class) weight the loss; without them ``config.class_weighting``
    derives balanced weights from ``dataset``'s own labels. ``optimizer_moments`` (a previous
    call's ``history.optimizer_moments``) continues Adam from where that call stopped.
    ``on_epoch_end(epoch, history)`` runs after each epoch; returning True stops training early.
    With ``dp`` the loop is DP-SGD (`privacy.py`): patient-level Poisson batches, per-sample clipped
    and noised gradients, every step added to ``dp.account``; ``config.seed`` then seeds neither.
    """
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    if dp is not None and proximal_mu > 0:
        raise ValueError("DP-SGD clips per-sample gradients; FedProx's proximal term is not one (proximal_mu must be 0)")
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")

    seed_everything(config.seed)
    device = select_device(config.device)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    start_weights = [p.detach().clone() for p in trainable] if proximal_mu > 0 else []
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    if optimizer_moments:
        restore_moments(optimizer, optimizer_moments)
    train_labels = dataset_labels(dataset) if config.class_weighting and class_weights is None else None
    criterion: nn.Module | None = None  # built at the first batch, when logits reveal K

    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        # A trailing batch of one breaks BatchNorm's batch statistics; drop it, and only it.
        drop_last=n > config.batch_size and n % config.batch_size == 1,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),
    ) if dp is None else dp.loader(dataset, pin_memory=device.type == "cuda")
    learner, optimizer = (model, optimizer) if dp is None else dp.make_private(model, optimizer)
    history = TrainHistory(num_examples=n)
    progress = tqdm(total=config.epochs * len(loader), disable=not _show_progress(config), desc="train", unit="batch")
    with progress:
        for epoch in range(config.epochs):
            model.train()  # a callback may have switched to eval mode (e.g. to validate)
            loss_sum, correct, seen = 0.0, 0, 0
            for images, targets in loader:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, torch.int64, non_blocking=True)
                if augment is not None and len(images):
                    images = augment_batch(augment, images)
                logits = learner(images)
                if criterion is None:
                    weights = (
                        torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None
                        else None if train_labels is None else balanced_class_weights(train_labels, logits.shape[1])
                    )
                    criterion = (nn.CrossEntropyLoss(weight=weights) if dp is None
                                 else dp.loss(weights)).to(device)
                loss = criterion(logits, targets)
                objective = loss
                if start_weights:
                    objective = loss + proximal_mu / 2 * _squared_distance(trainable, start_weights)
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()

                loss_sum += loss.item() * len(targets)
                correct += int((logits.argmax(dim=1) == targets).sum())
                seen += len(targets)
                progress.update()
            seen = max(seen, 1)  # only DP-SGD's Poisson batches can all be empty
            history.loss.append(loss_sum / seen)
            history.accuracy.append(correct / seen)
            progress.set_postfix(epoch=epoch + 1, loss=f"{history.loss[-1]:.4f}", acc=f"{history.accuracy[-1]:.3f}")
            if on_epoch_end is not None and on_epoch_end(epoch, history):
                break
    if dp is not None:
        dp.release(learner)
    history.optimizer_moments = moments_of(optimizer)
    return history


def moments_of(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimiser's per-parameter state as flat tensors `<parameter index>.<name>` (CPU copies)."""
    return {
        f"{index}.{name}": torch.as_tensor(value).detach().cpu().clone()
        for index, state in optimizer.state_dict()["state"].items()
        for name, value in state.items()
    }


def restore_moments(optimizer: torch.optim.Optimizer, moments: Mapping[str, Tensor]) -> None:
    """Load `moments_of` output into a freshly built optimiser of the same parameters (its own
    hyper-parameters, e.g. this round's learning rate, are kept)."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in moments.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = torch.as_tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, config: TrainConfig) -> Evaluation:
    """Unweighted mean cross-entropy, accuracy and softmax probabilities over ``dataset`` (in order)."""
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = select_device(config.device)
    model.to(device)
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=False,
        pin_memory=device.type == "cuda",
    )
    loss_sum = 0.0
    all_labels, all_probs = [], []
    for images, targets in tqdm(loader, disable=not _show_progress(config), desc="evaluate", unit="batch"):
        logits = model(images.to(device, non_blocking=True)).double()
        targets = targets.to(device, torch.int64, non_blocking=True)
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        all_labels.append(targets.cpu())
        all_probs.append(logits.softmax(dim=1).cpu())
    labels = torch.cat(all_labels).numpy().astype(np.int64)
    probs = torch.cat(all_probs).numpy()
    return Evaluation(
        loss=loss_sum / len(labels),
        accuracy=float((probs.argmax(axis=1) == labels).mean()),
        labels=labels,
        probs=probs,
    )


def _squared_distance(params: list[Tensor], reference: list[Tensor]) -> Tensor:
    return sum(((p - r) ** 2).sum() for p, r in zip(params, reference, strict=True))


def _show_progress(config: TrainConfig) -> bool:
    if config.progress is not None:
        return config.progress
    return bool(getattr(sys.stderr, "isatty", lambda: False)())
