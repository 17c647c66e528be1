from __future__ import annotations

import copy
import sys

import numpy as np
import pydantic
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import Subset, TensorDataset

from pneumofed.common.learning.training import (
    Evaluation,
    TrainConfig,
    balanced_class_weights,
    dataset_labels,
    evaluate,
    select_device,
    train,
)

SIZE = 8


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread; several threads thrash on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    """BatchNorm1d makes a training batch of one fail, as a real classifier head can."""

    def __init__(self, num_classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.head = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.features(x)))


def make_dataset(counts: tuple[int, ...] = (8, 8, 8), seed: int = 0) -> TensorDataset:
    """Class k is a bright band in image row block k plus noise, so a tiny CNN can separate them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((c,), k, dtype=torch.int64) for k, c in enumerate(counts)])
    images = 0.2 * torch.rand(len(labels), 1, SIZE, SIZE, generator=g)
    band = SIZE // len(counts)
    for i, k in enumerate(labels.tolist()):
        images[i, 0, k * band : (k + 1) * band] += 0.7
    return TensorDataset(images, labels)


def fresh_model(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**({"device": "cpu", "progress": False} | overrides))


def test_defaults_follow_the_paper_and_bad_values_are_rejected():
    config = TrainConfig()
    assert (config.epochs, config.learning_rate, config.batch_size) == (30, 1e-4, 16)
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    for bad in ({"epochs": 0}, {"learning_rate": 0}, {"batch_size": 0}, {"device": "gpu"}, {"lr": 1e-3}):
        with pytest.raises(pydantic.ValidationError):
            TrainConfig(**bad)


def test_tiny_data_is_overfitted_and_loss_decreases():
    model = fresh_model()
    history = train(model, make_dataset(), quiet(epochs=40, learning_rate=1e-2, batch_size=8))
    assert history.num_examples == 24
    assert len(history.loss) == len(history.accuracy) == 40
    assert history.loss[-1] < 0.5 * history.loss[0]
    assert evaluate(model, make_dataset(), quiet()).accuracy == 1.0


def test_same_seed_gives_identical_weights_and_another_seed_differs_with_dropout_and_augmentation():
    def run(seed: int, global_state: int) -> dict[str, torch.Tensor]:
        model = fresh_model(dropout=0.3)
        torch.manual_seed(global_state)  # whatever ran before train() must not matter
        config = quiet(epochs=3, learning_rate=1e-2, batch_size=5, seed=seed)
        train(model, make_dataset(), config, augment=lambda image: image * torch.rand(()))
        return model.state_dict()

    first, again, other = run(0, global_state=1), run(0, global_state=2), run(1, global_state=1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_class_weights_match_sklearn_balanced():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(balanced_class_weights(labels, 3).numpy(), expected, rtol=1e-6)


def test_class_weights_zero_for_absent_class_and_reject_bad_labels():
    weights = balanced_class_weights([0, 0, 0, 2], 3)
    np.testing.assert_allclose(weights.numpy(), [4 / 6, 0.0, 2.0], rtol=1e-6)
    with pytest.raises(ValueError, match="labels must lie in"):
        balanced_class_weights([0, 3], 3)
    with pytest.raises(ValueError, match="at least one label"):
        balanced_class_weights([], 3)


def test_dataset_labels_reads_tensor_datasets_subsets_and_generic_datasets():
    data = make_dataset((2, 3, 1))
    subset = Subset(data, [5, 0, 3])
    assert dataset_labels(data).tolist() == [0, 0, 1, 1, 1, 2]
    assert dataset_labels(subset).tolist() == [2, 0, 1]
    assert dataset_labels(list(subset)).tolist() == [2, 0, 1]


@pytest.mark.parametrize("weighted", [False, True])
def test_first_epoch_loss_is_the_plain_or_class_weighted_cross_entropy(weighted):
    data = make_dataset((12, 3, 1))
    model = fresh_model()
    images, labels = data.tensors
    with torch.no_grad():  # one batch holding every example: BatchNorm sees the same statistics
        logits = copy.deepcopy(model).train()(images)
    weight = balanced_class_weights(labels, 3) if weighted else None
    expected = nn.functional.cross_entropy(logits, labels, weight=weight).item()

    history = train(model, data, quiet(epochs=1, batch_size=len(data), class_weighting=weighted))

    assert history.loss[0] == pytest.approx(expected, rel=1e-5)
    unweighted = nn.functional.cross_entropy(logits, labels).item()
    assert weighted == (abs(expected - unweighted) > 1e-3)


def test_proximal_term_keeps_weights_near_the_start():
    data = make_dataset()

    def drift(mu: float) -> float:
        model = fresh_model()
        start = flat_weights(model)
        train(model, data, quiet(epochs=5, learning_rate=1e-2, batch_size=8), proximal_mu=mu)
        return float((flat_weights(model) - start).norm())

    free, anchored = drift(0.0), drift(10.0)
    assert anchored < 0.5 * free
    with pytest.raises(ValueError, match="proximal_mu"):
        train(fresh_model(), data, quiet(epochs=1), proximal_mu=-1.0)


@pytest.mark.parametrize("n", [5, 17, 33])
def test_small_datasets_and_a_trailing_batch_of_one_train_with_batchnorm(n):
    data = make_dataset((n,), seed=1)
    data = TensorDataset(data.tensors[0], torch.arange(n) % 3)
    history = train(fresh_model(), data, quiet(epochs=2, batch_size=16))
    assert history.num_examples == n
    assert np.isfinite(history.loss).all()


def test_empty_dataset_is_rejected():
    empty = TensorDataset(torch.zeros(0, 1, SIZE, SIZE), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        train(fresh_model(), empty, quiet(epochs=1))
    with pytest.raises(ValueError, match="empty"):
        evaluate(fresh_model(), empty, quiet())


def test_epoch_callback_sees_history_and_can_stop_early():
    seen: list[int] = []

    def stop_after_two(epoch, history):
        seen.append(len(history.loss))
        return epoch == 1

    history = train(fresh_model(), make_dataset(), quiet(epochs=5), on_epoch_end=stop_after_two)
    assert seen == [1, 2]
    assert len(history.loss) == 2


def test_augmentation_is_applied_to_every_training_sample():
    data = make_dataset()
    flipped = TensorDataset(data.tensors[0].flip(-2), data.tensors[1])
    config = quiet(epochs=2, learning_rate=1e-2, batch_size=5)
    augmented, pre_flipped, plain = fresh_model(), fresh_model(), fresh_model()
    train(augmented, data, config, augment=lambda image: image.flip(-2))
    train(pre_flipped, flipped, config)
    train(plain, data, config)
    assert torch.equal(flat_weights(augmented), flat_weights(pre_flipped))
    assert not torch.equal(flat_weights(augmented), flat_weights(plain))


def test_evaluate_returns_ordered_labels_and_softmax_probabilities():
    data = make_dataset((4, 3, 3))
    model = fresh_model()
    before = flat_weights(model)
    result = evaluate(model, data, quiet(batch_size=4))

    assert isinstance(result, Evaluation)
    assert result.labels.dtype == np.int64 and result.labels.shape == (10,)
    assert result.probs.dtype == np.float64 and result.probs.shape == (10, 3)
    np.testing.assert_array_equal(result.labels, data.tensors[1].numpy())
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-12)
    assert result.accuracy == pytest.approx((result.probs.argmax(1) == result.labels).mean())
    expected_loss = -np.log(result.probs[np.arange(10), result.labels]).mean()
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    assert result.num_examples == 10
    assert not model.training and torch.equal(flat_weights(model), before)


def test_select_device_prefers_cuda_only_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device() == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        select_device("cuda")
    with pytest.raises(ValueError, match="device must be"):
        select_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")


def test_progress_bar_only_when_asked_or_on_a_terminal(capsys, monkeypatch):
    data = make_dataset()
    train(fresh_model(), data, quiet(epochs=1, progress=None))
    assert "train" not in capsys.readouterr().err  # pytest's captured stderr is not a TTY

    train(fresh_model(), data, quiet(epochs=1, progress=True))
    assert "train" in capsys.readouterr().err

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    evaluate(fresh_model(), data, quiet(progress=None))
    assert "evaluate" in capsys.readouterr().err


def test_the_paper_network_trains_and_evaluates_through_the_loop():
    from pneumofed.common.learning.models import build_model

    torch.manual_seed(0)
    model = build_model("shufflenet_v2_eca", num_classes=3, width=0.5)
    data = make_dataset((6, 6, 5))  # 17 examples: a trailing batch of one is dropped
    data = TensorDataset(nn.functional.interpolate(data.tensors[0], size=32), data.tensors[1])
    history = train(model, data, quiet(epochs=1, batch_size=8, class_weighting=True), proximal_mu=0.1)
    result = evaluate(model, data, quiet(batch_size=8))
    assert np.isfinite(history.loss[0])
    assert result.probs.shape == (17, 3)
