from __future__ import annotations

import csv
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pneumofed.common.cli import main
from pneumofed.common.data.store import (
    PooledRois,
    RoiIndex,
    RoiStore,
    pool_stores,
    write_index,
)
from pneumofed.common.learning.centralised import CentralisedSettings, train_centralised
from pneumofed.common.learning.evaluation import evaluate_model_file
from pneumofed.common.learning.modelfile import load_model_file
from pneumofed.common.learning.training import TrainConfig
from pneumofed.common.metrics.report import classification_report

TINY = {"model": "shufflenet_v2_eca", "width": 0.5, "bootstrap": 100}


def pooled_probs(model_path: Path, data: PooledRois, patients: frozenset[str]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax of the saved model on the pooled ROIs of ``patients``."""
    rows = np.flatnonzero(np.isin(data.site_patient_keys, list(patients)))
    model, _ = load_model_file(model_path)
    with torch.inference_mode():
        probs = model(data.images[rows].float() / 255).double().softmax(dim=1).numpy()
    return data.labels[rows].numpy(), probs


@pytest.fixture(scope="module")
def holdout(synthetic_sites: list[Path], tmp_path_factory: pytest.TempPathFactory):
    settings = CentralisedSettings(
        out_dir=tmp_path_factory.mktemp("holdout"), training=TrainConfig(epochs=2, device="cpu", progress=False), **TINY
    )
    return train_centralised(synthetic_sites[:2], settings)


def test_holdout_training_writes_every_output(holdout):
    out = holdout.out_dir
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert set(history[0]) == {"epoch", "train loss", "train accuracy", "val loss", "val accuracy", "val auc"}
    with (out / "history.csv").open() as handle:
        assert [float(row["val loss"]) for row in csv.DictReader(handle)] == pytest.approx(
            [row["val loss"] for row in history]
        )
    for png in ("curves.png", "test_roc.png", "test_confusion.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    test = json.loads((out / "test_metrics.json").read_text())
    assert test["split"] == "test" and test["best-epoch"] == holdout.folds[0].best_epoch
    assert test["macro-auc-ci"][0] <= test["macro_auc"] <= test["macro-auc-ci"][1]


def test_saved_model_is_the_best_validation_epoch_and_reproduces_the_test_metrics(holdout, synthetic_sites):
    fold = holdout.folds[0]
    aucs = [row["val auc"] for row in fold.history]
    assert aucs[fold.best_epoch - 1] == max(aucs)

    _model, card = load_model_file(holdout.model_path)
    assert (card.roi_size, card.width, card.provenance["epoch"]) == (32, 0.5, fold.best_epoch)
    labels, probs = pooled_probs(holdout.model_path, pool_stores(synthetic_sites[:2]), fold.test_patients)
    report = classification_report(labels, probs, card.class_names)
    assert report.accuracy == pytest.approx(holdout.summary["accuracy"])
    assert report.macro_auc == pytest.approx(holdout.summary["macro_auc"])
    # The model file is an ordinary pneumofed model file: it evaluates on any compatible store.
    assert evaluate_model_file(holdout.model_path, synthetic_sites[2], device="cpu", n_boot=50)["num-examples"] == len(
        RoiStore.open(synthetic_sites[2])
    )


def test_holdout_parts_are_patient_disjoint_and_span_both_stores(holdout):
    fold = holdout.folds[0]
    parts = (fold.train_patients, fold.val_patients, fold.test_patients)
    assert all(not (a & b) for a, b in combinations(parts, 2))
    assert {key.split(":")[0] for key in fold.train_patients} == {"0", "1"}


def test_pooling_keeps_same_pseudonym_at_two_sites_apart(synthetic_sites):
    single = pool_stores(synthetic_sites[:1])
    twice = pool_stores([synthetic_sites[0], synthetic_sites[0]])
    assert len(twice) == 2 * len(single)
    assert len(set(twice.site_patient_keys)) == 2 * len(set(single.site_patient_keys))


def test_kfold_gives_k_patient_disjoint_test_folds_with_mean_and_sd(synthetic_sites, tmp_path):
    settings = CentralisedSettings(
        out_dir=tmp_path, folds=3, augmentation=None,
        training=TrainConfig(epochs=1, device="cpu", progress=False), **TINY,
    )
    result = train_centralised(synthetic_sites[:1], settings)

    assert len(result.folds) == 3
    tests = [fold.test_patients for fold in result.folds]
    assert all(not (a & b) for a, b in combinations(tests, 2))
    assert set().union(*tests) == set(pool_stores(synthetic_sites[:1]).site_patient_keys)
    for fold in result.folds:
        assert not fold.train_patients & fold.val_patients
        assert not (fold.train_patients | fold.val_patients) & fold.test_patients
        assert (fold.out_dir / "model.pt").is_file()

    summary = json.loads((tmp_path / "cv_summary.json").read_text())
    accuracies = [fold.test["accuracy"] for fold in result.folds]
    assert [row["accuracy"] for row in summary["folds"]] == accuracies
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert summary["accuracy"]["sd"] == pytest.approx(np.std(accuracies, ddof=1))


def test_stores_prepared_differently_are_not_pooled(synthetic_sites, tmp_path):
    index = RoiStore.open(synthetic_sites[0]).index
    write_index(tmp_path, RoiIndex(roi_size=16, class_names=index.class_names, secret_check=index.secret_check))
    with pytest.raises(ValueError, match=r"\(16 px, .* does not match"):
        pool_stores([synthetic_sites[0], tmp_path])


def test_settings_are_validated(tmp_path, capsys):
    with pytest.raises(ValidationError, match="valid widths"):
        CentralisedSettings(out_dir=tmp_path, model="resnet50", width=0.5)
    with pytest.raises(ValidationError, match="folds"):
        CentralisedSettings(out_dir=tmp_path, folds=1)
    assert main(["train", "--store", str(tmp_path), "--out", str(tmp_path), "--width", "0.7"]) == 2
    assert "valid widths" in capsys.readouterr().err


def test_offline_expansion_grows_the_training_part_keeping_labels_and_patients(synthetic_sites):
    from pneumofed.common.data.site import load_site
    from pneumofed.common.learning.augment import DEFAULT_AUGMENTATION, expanded

    train = load_site(synthetic_sites[0], seed=0).train
    grown = expanded(train, 3 * len(train), DEFAULT_AUGMENTATION, seed=1)
    assert len(grown) == 3 * len(train)
    assert torch.equal(grown.labels[: len(train)], train.labels)
    assert torch.equal(grown.labels, train.labels.repeat(3))
    assert grown.patient_keys == train.patient_keys * 3
    originals = torch.stack([train[i][0] for i in range(len(train))])
    assert torch.equal(torch.stack([grown[i][0] for i in range(len(train))]), originals)
    assert not torch.equal(torch.stack([grown[len(train) + i][0] for i in range(len(train))]), originals)


def test_train_expand_runs_and_refuses_a_size_below_the_training_part(synthetic_sites, tmp_path, capsys):
    from pneumofed.common.cli import main

    common = ["train", "--store", str(synthetic_sites[0]), "--model", "shufflenet_v2_eca", "--width", "0.5",
              "--epochs", "1", "--device", "cpu", "--bootstrap", "20"]
    assert main([*common, "--out", str(tmp_path / "small"), "--expand", "5"]) == 2
    assert "smaller than the training part" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "grown"), "--expand", "200"]) == 0
    assert (tmp_path / "grown" / "model.pt").is_file()
