"""Starting training from a trained model: run-config `init-model` and `pneumofed train --init`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType

from pneumofed.common.cli import main
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.exchange import exchanged_state
from pneumofed.common.learning import centralised
from pneumofed.common.learning.centralised import CentralisedSettings, train_centralised
from pneumofed.common.learning.modelfile import (
    IncompatibleModelFile,
    ModelCard,
    load_model_file,
    require_compatible,
    save_model_file,
)
from pneumofed.common.learning.models import build_model
from pneumofed.common.learning.state import UnsafeFile
from pneumofed.common.learning.training import TrainConfig, seed_everything
from pneumofed.server.outputs import RunDirectory
from pneumofed.server.rounds import initial_arrays, run_federation
from pneumofed.simulations.inprocess import InProcessGrid

CLASSES = ["nodule", "interstitial", "emphysema"]  # the synthetic stores' classes, in their order
SMALL_RUN = {"model-width": 0.5, "roi-size": 32, "local-epochs": 1, "batch-size": 16, "num-server-rounds": 1}
FITTING = {"model": "shufflenet_v2_eca", "width": 0.5, "class_names": CLASSES, "roi_size": 32}


def model_file(path: Path, seed: int = 123, **card) -> Path:
    """A pneumofed model file of a randomly initialised network (`seed`), built as its card says."""
    card = FITTING | card
    torch.manual_seed(seed)
    model = build_model(card["model"], len(card["class_names"]), width=card["width"],
                        norm_layer=card.get("norm_layer", "batch"))
    return save_model_file(path, model, ModelCard(provenance={"trainer": "test"}, **card))


class RecordingGrid(InProcessGrid):
    def __init__(self, sites, run_config):
        super().__init__(sites, run_config)
        self.instructions: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.instructions.extend(messages)
        return super().send_and_receive(messages, timeout=timeout)

    def first_train_arrays(self) -> dict[str, torch.Tensor]:
        first = next(m for m in self.instructions if m.metadata.message_type == MessageType.TRAIN)
        return first.content["arrays"].to_torch_state_dict()


def run_config(tmp_path: Path, **overrides) -> dict:
    return FederatedConfig.model_validate(SMALL_RUN | {"run-dir": str(tmp_path / "run")} | overrides).to_run_config()


def federate(sites, config_dict) -> tuple[RunDirectory, RecordingGrid]:
    config = FederatedConfig.from_run_config(config_dict)
    grid = RecordingGrid(sites, config_dict)
    run = RunDirectory.open(config, flower_run_id=1)
    try:
        run_federation(grid, config, run)
    except Exception as error:
        error.grid = grid  # what was sent before the error
        raise
    return run, grid


@pytest.mark.parametrize("bn_mode", ["shared", "fedbn"])
def test_the_first_rounds_global_arrays_sent_to_the_sites_are_the_init_models_tensors(
    bn_mode, synthetic_sites, tmp_path, flower_identity
):
    path = model_file(tmp_path / "trained.pt")
    config_dict = run_config(tmp_path, **{"init-model": str(path), "bn-mode": bn_mode})
    _, grid = federate(synthetic_sites[:2], config_dict)

    sent = grid.first_train_arrays()
    model, _ = load_model_file(path)
    expected = exchanged_state(model, bn_mode)  # under fedbn the BatchNorm part stays at the sites
    assert list(sent) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(sent[name], tensor), name
    random_start = initial_arrays(FederatedConfig.from_run_config(config_dict | {"init-model": ""}))
    assert any(not torch.equal(sent[name], torch.from_numpy(random_start[name].numpy())) for name in expected)


MISMATCHES = {
    "model": ({"model": "shufflenet_v2"}, "model: 'shufflenet_v2' in the file, 'shufflenet_v2_eca' here",
              "set model=shufflenet_v2", "use --model shufflenet_v2"),
    "width": ({"width": 1.0}, "width: 1.0 in the file, 0.5 here", "set model-width=1.0", "use --width 1.0"),
    "classes": ({"class_names": ["interstitial", "nodule", "emphysema"]},
                ("classes (names in order): ['interstitial', 'nodule', 'emphysema'] in the file, "
                 "['nodule', 'interstitial', 'emphysema'] here"),
                "set class-names=interstitial,nodule,emphysema", "prepared with the classes interstitial,nodule,emphysema"),
    "roi-size": ({"roi_size": 64}, "ROI size (px): 64 in the file, 32 here", "set roi-size=64",
                 "prepared with --roi-size 64"),
    "norm-layer": ({"norm_layer": "group"}, "normalisation layers: 'group' in the file, 'batch' here",
                   "set norm-layer=group", "use --norm-layer group"),
}


@pytest.mark.parametrize("kind", MISMATCHES)
def test_a_federated_run_from_an_unfitting_model_file_is_refused_before_any_training(
    kind, synthetic_sites, tmp_path, flower_identity
):
    card, difference, fix, _ = MISMATCHES[kind]
    path = model_file(tmp_path / "other.pt", **card)
    with pytest.raises(IncompatibleModelFile) as refused:
        federate(synthetic_sites[:1], run_config(tmp_path, **{"init-model": str(path)}))
    message = str(refused.value)
    assert str(path) in message and difference in message and fix in message
    assert message.count(" in the file, ") == 1, "only what differs is named"
    assert not any(m.metadata.message_type == MessageType.TRAIN for m in refused.value.grid.instructions)


@pytest.mark.parametrize("kind", MISMATCHES)
def test_centralised_training_from_an_unfitting_model_file_is_refused_before_any_training(
    kind, synthetic_sites, tmp_path, monkeypatch
):
    card, difference, _, fix = MISMATCHES[kind]
    path = model_file(tmp_path / "other.pt", **card)

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(centralised, "train_keeping_best_epoch", no_training)
    settings = CentralisedSettings(out_dir=tmp_path / "out", model="shufflenet_v2_eca", width=0.5, init=path,
                                   training=TrainConfig(epochs=1, device="cpu", progress=False))
    with pytest.raises(IncompatibleModelFile) as refused:
        train_centralised(synthetic_sites[:1], settings)
    message = str(refused.value)
    assert str(path) in message and difference in message and fix in message


def test_every_difference_is_named_at_once_and_a_fitting_card_passes(tmp_path):
    fits = ModelCard(**FITTING)
    require_compatible(fits, "f.pt", **FITTING, fixes={})  # no error
    other = ModelCard(**FITTING | {"width": 1.0, "roi_size": 64})
    with pytest.raises(IncompatibleModelFile, match=r"width: 1.0 in the file, 0.5 here.*ROI size \(px\): 64 in the file"):
        require_compatible(other, "f.pt", **FITTING, fixes={})


def test_train_init_starts_from_the_model_file(synthetic_sites, tmp_path):
    path = model_file(tmp_path / "trained.pt")
    out = tmp_path / "out"
    assert main(["train", "--store", str(synthetic_sites[0]), "--out", str(out), "--width", "0.5", "--epochs", "1",
                 "--lr", "1e-9", "--device", "cpu", "--bootstrap", "20", "--no-augment", "--init", str(path)]) == 0

    trained, card = load_model_file(out / "model.pt")
    start, _ = load_model_file(path)
    seed_everything(0)  # the random initialisation the trainer would have used (--seed 0)
    random = build_model("shufflenet_v2_eca", 3, width=0.5)
    # Parameters only: BatchNorm running statistics move with every batch whatever the learning rate.
    start, random = dict(start.named_parameters()), dict(random.named_parameters())
    distance_to_file = max((p - start[n]).abs().max().item() for n, p in trained.named_parameters())
    distance_to_random = max((p - random[n]).abs().max().item() for n, p in trained.named_parameters())
    assert distance_to_file < 1e-5
    assert distance_to_random > 0.05
    assert card.provenance["init"] == str(path)


def test_train_init_with_an_unfitting_file_fails_with_the_reason(synthetic_sites, tmp_path, capsys):
    path = model_file(tmp_path / "wide.pt", width=1.0)
    assert main(["train", "--store", str(synthetic_sites[0]), "--out", str(tmp_path / "out"), "--width", "0.5",
                 "--device", "cpu", "--init", str(path)]) == 2
    assert "use --width 1.0" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.pt").exists()


def test_a_relative_init_model_path_is_refused():
    with pytest.raises(ValueError, match="init-model must be an absolute path"):
        FederatedConfig.from_run_config({"init-model": "models/best.pt"})


def test_an_init_model_file_that_could_run_code_is_refused(tmp_path):
    path = tmp_path / "hostile.pt"
    torch.save({"card": {"model": "shufflenet_v2_eca"}, "state": {}, "payload": Path("/")}, path)  # a pickled object
    config = FederatedConfig.from_run_config(run_config(tmp_path, **{"init-model": str(path)}))
    with pytest.raises(UnsafeFile):
        initial_arrays(config)


def test_a_resumed_run_continues_from_its_checkpoint_not_from_init_model(synthetic_sites, tmp_path, flower_identity):
    path = model_file(tmp_path / "trained.pt")
    config_dict = run_config(tmp_path, **{"init-model": str(path)})
    first, _ = federate(synthetic_sites[:1], config_dict)
    path.unlink()  # a resumed run never reads it again

    _, grid = federate(synthetic_sites[:1], config_dict | {"num-server-rounds": 2, "resume": True})

    sent = grid.first_train_arrays()
    round_1 = torch.load(first.path / "models" / "round-001.pt", weights_only=True)["state"]
    assert set(sent) == set(round_1)
    assert all(torch.equal(sent[name], round_1[name]) for name in round_1)


def test_a_groupnorm_model_trained_centrally_starts_a_groupnorm_federated_run(synthetic_sites, tmp_path, flower_identity):
    out = tmp_path / "central"
    assert main(["train", "--store", str(synthetic_sites[0]), "--out", str(out), "--width", "0.5", "--epochs", "1",
                 "--norm-layer", "group", "--device", "cpu", "--bootstrap", "20", "--no-augment"]) == 0
    trained, card = load_model_file(out / "model.pt")
    assert card.norm_layer == "group"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trained.modules())

    _, grid = federate(synthetic_sites[:1], run_config(tmp_path, **{"init-model": str(out / "model.pt"),
                                                                      "norm-layer": "group"}))
    sent = grid.first_train_arrays()
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(sent[name], tensor)
