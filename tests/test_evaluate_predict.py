from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumofed.common.cli import main
from pneumofed.common.data.prepare import file_sha256
from pneumofed.common.data.site import load_site
from pneumofed.common.data.store import RoiDataset, RoiStore, StoreMismatch
from pneumofed.common.learning.evaluation import (
    evaluate_dicom_folder,
    evaluate_model_file,
)
from pneumofed.common.learning.modelfile import (
    ModelCard,
    load_model_file,
    save_model_file,
)
from pneumofed.common.learning.models import build_model
from pneumofed.common.learning.predict import PredictionError, predict
from pneumofed.common.metrics.report import classification_report

BOOTSTRAP = 200


def hospital_of(store: Path) -> Path:
    """The synthetic hospital a `synthetic_sites` store was prepared from (the fixture's layout)."""
    return store.parent.parent / "dicom" / store.name


def make_model_file(path: Path, class_names: list[str], roi_size: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model("shufflenet_v2_eca", len(class_names), width=0.5)
    card = ModelCard(model="shufflenet_v2_eca", width=0.5, class_names=class_names, roi_size=roi_size)
    return save_model_file(path, model, card)


def softmax_on(model_path: Path, images: torch.Tensor) -> np.ndarray:
    """Reference probabilities straight from the model on uint8 ROIs, independent of the code under test."""
    model, _ = load_model_file(model_path)
    with torch.inference_mode():
        return model(images.float() / 255).double().softmax(dim=1).numpy()


@pytest.fixture(scope="module")
def store(synthetic_sites: list[Path]) -> Path:
    return synthetic_sites[0]


@pytest.fixture(scope="module")
def model_file(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    names = list(RoiStore.open(store).class_names)
    return make_model_file(tmp_path_factory.mktemp("model") / "model.pt", names, roi_size=32)


def test_evaluate_on_store_reports_the_metrics_of_classification_report(store, model_file, tmp_path):
    summary = evaluate_model_file(model_file, store, out_dir=tmp_path, device="cpu", n_boot=BOOTSTRAP)

    roi_store = RoiStore.open(store)
    expected = classification_report(
        roi_store.labels.numpy(), softmax_on(model_file, roi_store.images), list(roi_store.class_names)
    )
    assert summary["num-examples"] == len(roi_store)
    assert summary["accuracy"] == pytest.approx(expected.accuracy)
    assert summary["macro_auc"] == pytest.approx(expected.macro_auc)
    assert summary["confusion_matrix"] == expected.confusion_matrix
    for got, want in zip(summary["per_class"], expected.per_class, strict=True):
        assert (got["name"], got["support"]) == (want.name, want.support)
        assert [got[m] for m in ("precision", "recall", "f1", "auc")] == pytest.approx(
            [want.precision, want.recall, want.f1, want.auc]
        )
        low, high = summary["auc-ci"][want.name]
        assert low <= want.auc <= high and low < high
    low, high = summary["macro-auc-ci"]
    assert low <= expected.macro_auc <= high

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["accuracy"] == summary["accuracy"] and written["auc-ci"] == summary["auc-ci"]
    for plot in ("roc.png", "confusion.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_part_is_the_federated_sites_split(store, model_file):
    summary = evaluate_model_file(model_file, store, part="test", split_seed=3, device="cpu", n_boot=BOOTSTRAP)
    test_part = load_site(store.resolve(), 3).test
    assert summary["num-examples"] == len(test_part) < len(RoiStore.open(store))
    assert summary["confusion_matrix"] == classification_report(
        test_part.labels.numpy(), softmax_on(model_file, test_part.store.images[test_part.indices]),
        list(test_part.store.class_names),
    ).confusion_matrix


def test_store_with_other_roi_size_or_classes_is_refused(store, tmp_path, capsys):
    names = list(RoiStore.open(store).class_names)
    larger = make_model_file(tmp_path / "roi64.pt", names, roi_size=64)
    with pytest.raises(StoreMismatch, match="32-px ROIs but the model expects 64-px"):
        evaluate_model_file(larger, store, device="cpu")
    assert main(["evaluate", str(larger), "--store", str(store), "--device", "cpu"]) == 2
    assert "--roi-size 64" in capsys.readouterr().err

    reordered = make_model_file(tmp_path / "classes.pt", names[::-1], roi_size=32)
    with pytest.raises(StoreMismatch, match="classes"):
        evaluate_model_file(reordered, store, device="cpu")


def test_evaluate_from_dicom_folder_equals_evaluate_on_the_prepared_store(store, model_file, tmp_path):
    hospital = hospital_of(store)
    from_dicom = evaluate_dicom_folder(
        model_file, hospital / "dicom", hospital / "annotations.csv", device="cpu", n_boot=BOOTSTRAP, out_dir=tmp_path
    )
    from_store = evaluate_model_file(model_file, store, device="cpu", n_boot=BOOTSTRAP)
    assert from_dicom["data"] == str(hospital / "dicom")
    ignored = {"data", "outputs"}
    assert {k: v for k, v in from_dicom.items() if k not in ignored} == {
        k: v for k, v in from_store.items() if k not in ignored
    }
    assert (tmp_path / "metrics.json").is_file()


def test_evaluate_cli_writes_beside_the_model_by_default(store, model_file, capsys):
    assert main(["evaluate", str(model_file), "--store", str(store), "--device", "cpu", "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "macro" in printed and "95% CI" in printed
    out = model_file.with_name(model_file.name + ".eval")
    assert {"metrics.json", "roc.png", "confusion.png"} <= {p.name for p in out.iterdir()}


def source_file(store: Path, record_index: int) -> tuple[Path, tuple[int, int, int, int]]:
    record = RoiStore.open(store).index.records[record_index]
    matches = [p for p in (hospital_of(store) / "dicom").iterdir() if file_sha256(p) == record.source_sha256]
    return matches[0], record.box


def test_predict_gives_the_models_softmax_on_the_stored_roi(store, model_file):
    roi_store = RoiStore.open(store)
    for i in (0, len(roi_store) - 1):
        path, box = source_file(store, i)
        result = predict(model_file, path, box, device="cpu")
        expected = softmax_on(model_file, roi_store.images[i : i + 1])[0]
        probabilities = list(result["probabilities"].values())
        assert list(result["probabilities"]) == list(roi_store.class_names)
        assert sum(probabilities) == pytest.approx(1.0)
        assert probabilities == pytest.approx(expected.tolist(), abs=1e-6)
        assert result["predicted"] == roi_store.class_names[int(expected.argmax())]
        assert result["box"] == list(box)


def test_predict_cli_defaults_to_the_whole_image(store, model_file, capsys):
    path, _ = source_file(store, 0)
    assert main(["predict", str(model_file), str(path), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows, columns = RoiStore.open(store).index.records[0].image_shape
    assert result["box"] == [0, 0, columns, rows]
    assert sum(result["probabilities"].values()) == pytest.approx(1.0)


def exit_code(argv: list[str]) -> int:
    """What the `pneumofed` command returns, argparse's own usage errors included."""
    try:
        return main(argv)
    except SystemExit as exit:
        return int(exit.code)


@pytest.mark.parametrize(
    ("box", "message"),
    [("10,10,20,40", "smaller than the minimum 30x30"), ("{right},0,200,200", "does not fit the"),
     ("-5,0,40,40", "starts outside"), ("1,2,3", "four integers")],
)
def test_predict_bad_box_exits_2_with_a_message(store, model_file, capsys, box, message):
    path, _ = source_file(store, 0)
    columns = RoiStore.open(store).index.records[0].image_shape[1]
    argv = ["predict", str(model_file), str(path), f"--box={box.format(right=columns - 100)}"]
    assert exit_code(argv) == 2
    assert message in capsys.readouterr().err


def test_predict_refuses_a_non_dicom_file(model_file, tmp_path, capsys):
    text = tmp_path / "notes.dcm"
    text.write_text("not an image")
    with pytest.raises(PredictionError, match="not a readable DICOM"):
        predict(model_file, text)
    assert main(["predict", str(model_file), str(text), "--box", "0,0,40,40"]) == 2
    assert "not-dicom" in capsys.readouterr().err


def test_calibrate_bn_scores_with_batchnorm_statistics_fitted_to_the_evaluated_rois(store, model_file):
    from pneumofed.common.learning.batchnorm import recalibrate_batchnorm

    plain = evaluate_model_file(model_file, store, device="cpu", n_boot=BOOTSTRAP)
    calibrated = evaluate_model_file(model_file, store, device="cpu", n_boot=BOOTSTRAP, calibrate_bn=True)
    model, _ = load_model_file(model_file)
    roi_store = RoiStore.open(store)
    recalibrate_batchnorm(model, RoiDataset(roi_store), batch_size=64, device=torch.device("cpu"))
    with torch.inference_mode():
        reference = model(roi_store.images.float() / 255).double().softmax(dim=1).numpy()
    expected = classification_report(roi_store.labels.numpy(), reference, list(roi_store.class_names))
    assert calibrated["calibrated-bn"] and not plain["calibrated-bn"]
    assert calibrated["accuracy"] == pytest.approx(expected.accuracy)
    assert calibrated["eval-loss"] != pytest.approx(plain["eval-loss"])


# ---------------------------------------------------------------- DeLong CIs beside the bootstrap ones


def _scores_with_rare_and_absent_classes() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """4 classes: two common ones, one with a single positive, one absent from the labels."""
    rng = np.random.default_rng(31)
    y = np.concatenate([rng.integers(0, 2, size=59), [2]])
    logits = rng.normal(size=(60, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs, ["common-a", "common-b", "rare", "absent"]


def test_summarise_adds_per_class_delong_cis_and_keeps_the_bootstrap_summary_unchanged():
    from pneumofed.common.learning.evaluation import summarise
    from pneumofed.common.metrics.delong import delong_auc_ci
    from pneumofed.common.metrics.intervals import bootstrap_auc_ci, bootstrap_macro_auc_ci

    y, probs, names = _scores_with_rare_and_absent_classes()
    summary, report = summarise(y, probs, names, loss=0.5, n_boot=BOOTSTRAP, seed=4)

    assert set(summary) == {
        "eval-loss", "num-examples", *report.model_dump(exclude={"per_class": {"__all__": {"roc"}}}),
        "auc-ci", "macro-auc-ci", "auc-ci-delong", "bootstrap",
    }
    assert summary["auc-ci"] == {
        "common-a": list(bootstrap_auc_ci(y, probs, 0, BOOTSTRAP, 4)),
        "common-b": list(bootstrap_auc_ci(y, probs, 1, BOOTSTRAP, 4)),
        "rare": list(bootstrap_auc_ci(y, probs, 2, BOOTSTRAP, 4)),
        "absent": None,
    }
    assert summary["macro-auc-ci"] == list(bootstrap_macro_auc_ci(y, probs, BOOTSTRAP, 4))
    assert summary["bootstrap"] == {"resamples": BOOTSTRAP, "seed": 4, "confidence": 0.95}

    # DeLong needs 2 positives: the single-positive class has a bootstrap CI but no DeLong CI.
    assert summary["auc-ci-delong"] == {
        "common-a": list(delong_auc_ci(y, probs, 0).ci),
        "common-b": list(delong_auc_ci(y, probs, 1).ci),
        "rare": None,
        "absent": None,
    }
    for k in (0, 1):
        low, high = summary["auc-ci-delong"][names[k]]
        assert low < report.per_class[k].auc < high
    assert json.loads(json.dumps(summary)) == summary


def test_evaluate_table_shows_the_delong_ci_beside_the_bootstrap_ci():
    from pneumofed.common.cli.evaluate import format_table
    from pneumofed.common.learning.evaluation import summarise

    y, probs, names = _scores_with_rare_and_absent_classes()
    summary, _ = summarise(y, probs, names, n_boot=BOOTSTRAP)
    lines = format_table(summary).splitlines()

    assert "95% CI bootstrap" in lines[1] and lines[1].endswith("95% CI DeLong")
    delong_column = lines[1].index("95% CI DeLong")
    rows = {line.split()[0]: line for line in lines[2:]}
    for name in ("common-a", "common-b"):
        boot, delong = summary["auc-ci"][name], summary["auc-ci-delong"][name]
        row = rows[name]
        assert f"[{boot[0]:.3f}, {boot[1]:.3f}]" in row[:delong_column]
        assert row[delong_column:] == f"[{delong[0]:.3f}, {delong[1]:.3f}]"
    rare_boot = summary["auc-ci"]["rare"]
    assert rows["rare"].endswith(f"[{rare_boot[0]:.3f}, {rare_boot[1]:.3f}]")  # no DeLong CI to show
    macro = summary["macro-auc-ci"]
    assert rows["macro"].endswith(f"[{macro[0]:.3f}, {macro[1]:.3f}]")


def test_evaluate_on_store_writes_delong_cis_of_the_models_scores(store, model_file, tmp_path):
    from pneumofed.common.metrics.delong import delong_auc_ci

    summary = evaluate_model_file(model_file, store, out_dir=tmp_path, device="cpu", n_boot=BOOTSTRAP)
    roi_store = RoiStore.open(store)
    labels, reference = roi_store.labels.numpy(), softmax_on(model_file, roi_store.images)
    for k, name in enumerate(roi_store.class_names):
        assert summary["auc-ci-delong"][name] == pytest.approx(list(delong_auc_ci(labels, reference, k).ci), abs=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["auc-ci-delong"] == summary["auc-ci-delong"]
