from __future__ import annotations

import csv
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pneumofed.common.centralised import CentralisedSettings, PooledStores, train_centralised
from pneumofed.common.cli import main
from pneumofed.common.evaluate import evaluate_model_file
from pneumofed.common.metrics import classification_report
from pneumofed.common.modelfile import load_model_file
from pneumofed.common.roistore import RoiIndex, RoiStore, write_index
from pneumofed.common.training import TrainConfig

TINY = dict(model="shufflenet_v2_eca", width=0.5, bootstrap=100)


def pooled_probs(model_path: Path, data: PooledStores, patients: frozenset[str]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax of the saved model on the pooled ROIs of ``patients``."""
    rows = np.flatnonzero(np.isin(data.patient_keys, list(patients)))
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

    model, card = load_model_file(holdout.model_path)
    assert (card.roi_size, card.width, card.provenance["epoch"]) == (32, 0.5, fold.best_epoch)
    labels, probs = pooled_probs(holdout.model_path, PooledStores.open(synthetic_sites[:2]), fold.test_patients)
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
    single = PooledStores.open(synthetic_sites[:1])
    twice = PooledStores.open([synthetic_sites[0], synthetic_sites[0]])
    assert len(twice) == 2 * len(single)
    assert len(set(twice.patient_keys)) == 2 * len(set(single.patient_keys))


def test_kfold_gives_k_patient_disjoint_test_folds_with_mean_and_sd(synthetic_sites, tmp_path):
    settings = CentralisedSettings(
        out_dir=tmp_path, folds=3, augmentation=None,
        training=TrainConfig(epochs=1, device="cpu", progress=False), **TINY,
    )
    result = train_centralised(synthetic_sites[:1], settings)

    assert len(result.folds) == 3
    tests = [fold.test_patients for fold in result.folds]
    assert all(not (a & b) for a, b in combinations(tests, 2))
    assert set().union(*tests) == set(PooledStores.open(synthetic_sites[:1]).patient_keys)
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
        PooledStores.open([synthetic_sites[0], tmp_path])


def test_settings_are_validated(tmp_path, capsys):
    with pytest.raises(ValidationError, match="valid widths"):
        CentralisedSettings(out_dir=tmp_path, model="resnet50", width=0.5)
    with pytest.raises(ValidationError, match="folds"):
        CentralisedSettings(out_dir=tmp_path, folds=1)
    assert main(["train", "--store", str(tmp_path), "--out", str(tmp_path), "--width", "0.7"]) == 2
    assert "valid widths" in capsys.readouterr().err
