"""Cross-site validation: after a run every site scores the global model and the local-only models
that sites share, giving a site x model macro-AUC matrix in cross_site.json and report.html."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from sklearn.metrics import roc_auc_score

from pneumofed.client.app import answer_query
from pneumofed.common.data.site import load_site
from pneumofed.common.federation.audit import array_digest, read_audit
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.site_policy import LocalModelPolicy
from pneumofed.common.learning import training
from pneumofed.common.learning.modelfile import ModelCard, load_model_file, save_model_file
from pneumofed.common.learning.models import build_model
from pneumofed.common.learning.state import floating_state
from pneumofed.common.metrics.histogram import DEFAULT_SCORE_BINS, ScoreSummary
from pneumofed.common.metrics.html_report import RunFiles, format_metric, run_report_html
from pneumofed.server.cross_site import local_model_problem
from pneumofed.server.outputs import RunDirectory, reproduce_command
from pneumofed.server.rounds import run_federation
from pneumofed.simulations.cli.simulate import train_local_models
from pneumofed.simulations.inprocess import InProcessGrid, task_identity

CLASSES = ["nodule", "interstitial", "emphysema"]
SMALL_RUN = {"model-width": 0.5, "roi-size": 32, "local-epochs": 1, "batch-size": 16, "learning-rate": 1e-3,
             "num-server-rounds": 1}

# Sites that report their scores finely: a few ROIs per test part would otherwise leave the AUC loose.
FINE_SCORES = {"score-min-count": 1}


def run_config(tmp_path: Path, sites: list[Path], **overrides: Any) -> dict[str, Any]:
    settings = SMALL_RUN | {"run-dir": str(tmp_path / "run"), "sites": ",".join(map(str, sites)),
                            "cross-site-validation": True} | overrides
    return FederatedConfig.model_validate(settings).to_run_config()


@pytest.fixture(scope="module")
def local_models(synthetic_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The local-only models of the first two sites (one epoch each, as `simulate --cross-site` trains them)."""
    config = FederatedConfig.model_validate(SMALL_RUN)
    return train_local_models(synthetic_sites[:2], config, tmp_path_factory.mktemp("local-models"))


def federate_with_node_configs(sites: list[Path], settings: dict[str, Any], node_configs: dict[int, dict[str, Any]]
                               ) -> RunDirectory:
    """An in-process run (`run_in_process` with node configs) whose nodes, by position, get these
    entries beside their store."""
    grid = InProcessGrid(sites, settings)
    nodes = grid.get_node_ids()
    for position, extra in node_configs.items():
        grid.node_configs[nodes[position]].update(extra)
    config = FederatedConfig.from_run_config(settings)
    with task_identity():
        run = RunDirectory.open(config, flower_run_id=3)
        run_federation(grid, config, run)
    return run


def central_macro_auc(model: torch.nn.Module, store: Path) -> tuple[float, float | None]:
    """scikit-learn's macro AUC (over the classes present) of `model` on the store's test part, as its
    site splits it, and the macro AUC of the score summary a site with FINE_SCORES makes of those scores."""
    result = training.evaluate(model, load_site(store, 0).test, training.TrainConfig(batch_size=64, progress=False))
    aucs = [roc_auc_score(result.labels == k, result.probs[:, k])
            for k in range(len(CLASSES)) if 0 < (result.labels == k).sum() < len(result.labels)]
    summary = ScoreSummary.from_scores(result.labels, result.probs, DEFAULT_SCORE_BINS, FINE_SCORES["score-min-count"])
    return float(np.mean(aucs)), summary.macro_auc()


def column(matrix: dict[str, Any], kind: str, site: str | None = None) -> dict[str, Any]:
    [found] = [m for m in matrix["models"] if m["kind"] == kind and m["site"] == site]
    return found


def test_every_site_scores_the_global_model_and_each_shared_local_model(synthetic_sites, local_models, tmp_path):
    names = [site.name for site in synthetic_sites]
    settings = run_config(tmp_path, synthetic_sites, **{"local-models": f"{local_models[0]},{local_models[1]},"})
    run = federate_with_node_configs(synthetic_sites, settings, dict.fromkeys(range(3), FINE_SCORES))
    matrix = json.loads((run.path / "cross_site.json").read_text())

    assert matrix["sites"] == names and matrix["split"] == "test" and matrix["best-round"] == 1
    assert [(m["kind"], m["site"]) for m in matrix["models"]] == [("global", None), ("local", names[0]),
                                                                   ("local", names[1])]
    assert matrix["local-models-not-scored"] == [{"site": names[2], "reason": "the site shares no local model"}]
    scorers = {("global", None): load_model_file(run.path / "models" / "best.pt")[0]}
    scorers |= {("local", name): load_model_file(path)[0] for name, path in zip(names, local_models, strict=False)}
    for (kind, owner), model in scorers.items():
        cells = column(matrix, kind, owner)["cells"]
        for store, cell in zip(synthetic_sites, cells, strict=True):
            exact, summarised = central_macro_auc(model, store)
            assert cell["status"] == "scored" and cell["macro_auc"] == pytest.approx(summarised, abs=1e-12)
            assert abs(cell["macro_auc"] - exact) <= cell["macro_auc_bound"] + 1e-12
    final = json.loads((run.path / "final.json").read_text())
    assert column(matrix, "global")["pooled"]["macro_auc"] == final["macro_auc"]  # the same model on the same parts
    # The audit names every model sent: the global one is the best round's global model.
    audit = read_audit(run.path / "audit.jsonl")
    [best_round] = [entry for entry in audit if entry["event"] == "round" and entry["round"] == final["best-round"]]
    assert [entry["event"] for entry in audit][-2:] == ["run-finished", "cross-site-validation"]
    audited = audit[-1]
    assert len(audited["participants"]) == len(names)
    assert [(m["kind"], m["site"]) for m in audited["details"]["models"]] == [("global", None), ("local", names[0]),
                                                                              ("local", names[1])]
    assert audited["details"]["models"][0]["sha256"] == best_round["global_model_sha256"]
    shared_state = floating_state(load_model_file(local_models[0])[0])
    assert audited["details"]["models"][1]["sha256"] == array_digest({k: v.numpy() for k, v in shared_state.items()})
    assert column(matrix, "local", names[0])["pooled"]["num-examples"] == final["num-examples"]

    cells = _metric_cells(run_report_html(RunFiles.read(run.path), ""))
    shown = column(matrix, "local", names[1])["cells"][0]
    text = f"{format_metric(shown['macro_auc'])} ± {format_metric(shown['macro_auc_bound'])}"
    assert cells[f"cross-site-local-{names[1]}-{names[0]}"] == (json.dumps(shown["macro_auc"]), text)
    assert json.loads(cells["cross-site-global-pooled"][0]) == final["macro_auc"]
    # The reproduce command trains the local models anew rather than naming this run's files.
    assert "--cross-site" in reproduce_command(run.config, run.path) and "local-models" not in reproduce_command(
        run.config, run.path)


def test_a_site_keeps_its_own_auc_or_its_test_part_to_itself(synthetic_sites, local_models, tmp_path):
    names = [site.name for site in synthetic_sites]
    settings = run_config(tmp_path, synthetic_sites)
    run = federate_with_node_configs(synthetic_sites, settings, {
        0: {"local-model": str(local_models[0])},
        1: {"share-site-auc": False},
        2: {"evaluate-splits": "val"},
    })
    matrix = json.loads((run.path / "cross_site.json").read_text())
    assert [(m["kind"], m["site"]) for m in matrix["models"]] == [("global", None), ("local", names[0])]
    for model in matrix["models"]:
        shared, private, opted_out = model["cells"]
        assert shared["status"] == "scored"
        assert private == {"status": "not shared"}
        assert opted_out["status"] == "opted out" and "evaluate-splits" in opted_out["reason"]
        assert model["pooled"]["sites"] == 2  # the private site's scores are pooled all the same
    page = run_report_html(RunFiles.read(run.path), "")
    assert ">not shared<" in page and ">opted out<" in page


def test_a_local_model_that_does_not_fit_the_run_or_a_bad_node_config_is_refused_with_its_reason(
        synthetic_sites, tmp_path):
    names = [site.name for site in synthetic_sites]
    wider = save_model_file(tmp_path / "wider.pt", build_model("shufflenet_v2_eca", 3, width=1.0),
                            ModelCard(model="shufflenet_v2_eca", width=1.0, class_names=CLASSES, roi_size=32))
    settings = run_config(tmp_path, synthetic_sites)
    run = federate_with_node_configs(synthetic_sites, settings, {0: {"local-model": str(wider)},
                                                                 1: {"local-model": "models/local.pt"}})
    matrix = json.loads((run.path / "cross_site.json").read_text())
    assert [m["kind"] for m in matrix["models"]] == ["global"]
    refused, misconfigured, unshared = matrix["local-models-not-scored"]
    assert refused["site"] == names[0]
    assert "the local model of hospital-1 does not fit this model: width: 1.0 in the file, 0.5 here" in refused["reason"]
    assert misconfigured["site"] == names[1]  # named from its evaluation reply, though its QUERY failed
    assert "node config local-model: must be an absolute path, got 'models/local.pt'" in misconfigured["reason"]
    assert unshared == {"site": names[2], "reason": "the site shares no local model"}
    assert all(cell["status"] == "scored" for cell in matrix["models"][0]["cells"])  # the global model still is
    assert matrix["sites"] == names


def test_under_fedbn_a_local_model_is_scored_as_it_is_and_the_global_one_with_each_sites_batchnorm(
        synthetic_sites, local_models, tmp_path):
    names = [site.name for site in synthetic_sites]
    settings = run_config(tmp_path, synthetic_sites, **{"bn-mode": "fedbn", "local-models": f"{local_models[0]},,"})
    run = federate_with_node_configs(synthetic_sites, settings, dict.fromkeys(range(3), FINE_SCORES))
    matrix = json.loads((run.path / "cross_site.json").read_text())
    local_model = load_model_file(local_models[0])[0]
    for store, cell in zip(synthetic_sites, column(matrix, "local", names[0])["cells"], strict=True):
        exact, summarised = central_macro_auc(local_model, store)
        assert cell["status"] == "scored" and cell["macro_auc"] == pytest.approx(summarised, abs=1e-12)
        assert abs(cell["macro_auc"] - exact) <= cell["macro_auc_bound"] + 1e-12
    final = json.loads((run.path / "final.json").read_text())
    for name, cell in zip(names, column(matrix, "global")["cells"], strict=True):
        assert cell["macro_auc"] == final["site-auc"][name]["macro"]  # as in the final evaluation: the site's own BN


def test_the_server_refuses_local_model_arrays_that_are_not_the_run_models(tmp_path):
    config = FederatedConfig.model_validate(SMALL_RUN)
    reference = floating_state(config.build_model())
    card = ConfigRecord({"model": "shufflenet_v2_eca", "width": 0.5, "in-channels": 1, "class-names": CLASSES,
                         "roi-size": 32})

    def reply(state: dict[str, torch.Tensor], card_fields: ConfigRecord = card) -> RecordDict:
        return RecordDict({"arrays": ArrayRecord(state), "card": card_fields})

    assert local_model_problem(reply(reference), "h", config, reference) is None
    lying = floating_state(build_model("shufflenet_v2_eca", 3, width=1.0))  # a card that says 0.5
    assert "shape" in local_model_problem(reply(lying), "h", config, reference)
    poisoned = {name: tensor.clone() for name, tensor in reference.items()}
    poisoned["fc.weight"][0, 0] = float("nan")
    assert local_model_problem(reply(poisoned), "h", config, reference) == "fc.weight: contains NaN or infinite values"
    negative = {name: tensor.clone() for name, tensor in reference.items()}
    variance = next(name for name in negative if name.endswith("running_var"))
    negative[variance][0] = -1.0
    assert local_model_problem(reply(negative), "h", config, reference) == f"{variance}: a BatchNorm variance is not positive"
    reordered = ConfigRecord({**card, "class-names": CLASSES[::-1]})
    assert "classes (names in order)" in local_model_problem(reply(reference, reordered), "h", config, reference)
    grouped = ConfigRecord({**card, "norm-layer": "group"})
    assert "normalisation layers: 'group'" in local_model_problem(reply(reference, grouped), "h", config, reference)
    assert "its card is malformed: roi_size" in local_model_problem(
        reply(reference, ConfigRecord({k: v for k, v in card.items() if k != "roi-size"})), "h", config, reference)


def test_the_site_validates_its_local_model_node_config_with_a_one_line_reason(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    torch.save({"card": {"model": "x"}, "state": torch.nn.Linear(1, 1)}, tmp_path / "code.pt")  # a pickled module
    (tmp_path / "folder.pt").mkdir()
    cases = {
        "relative.pt": "node config local-model: must be an absolute path, got 'relative.pt'",
        str(tmp_path / "absent.pt"): f"node config local-model: {tmp_path / 'absent.pt'} is not a file",
        str(tmp_path / "folder.pt"): f"node config local-model: {tmp_path / 'folder.pt'} is not a file",
        str(tmp_path / "foreign.pt"): "is not a readable pneumofed model file: ",
        str(tmp_path / "code.pt"): "it could run code when opened",
    }
    for value, reason in cases.items():
        with pytest.raises(ValueError, match="node config local-model") as refused:
            LocalModelPolicy.from_node_config({"local-model": value})
        assert reason in str(refused.value) and "\n" not in str(refused.value)
    assert LocalModelPolicy.from_node_config({"local-model": ""}).shared_model is None
    assert LocalModelPolicy.from_node_config({}).shared_model is None


def test_a_simulated_node_shares_the_local_model_that_run_config_local_models_gives_its_partition(
        synthetic_sites, local_models):
    settings = FederatedConfig.model_validate(SMALL_RUN | {"sites": ",".join(map(str, synthetic_sites)),
                                                           "local-models": f",{local_models[1]},"}).to_run_config()
    query = ConfigRecord({"query": "local-model"})
    shared = answer_query(query, settings, {"partition-id": 1, "num-partitions": 3})
    assert dict(shared["site"]) == {"name": synthetic_sites[1].name, "shares-local-model": True}
    expected = floating_state(load_model_file(local_models[1])[0])
    assert {name: array.numpy().tolist() for name, array in shared["arrays"].items()} == {
        name: tensor.numpy().tolist() for name, tensor in expected.items()}
    assert dict(shared["card"]) == {"model": "shufflenet_v2_eca", "width": 0.5, "in-channels": 1,
                                    "class-names": CLASSES, "roi-size": 32, "norm-layer": "batch"}
    unshared = answer_query(query, settings, {"partition-id": 0, "num-partitions": 3})
    assert set(unshared) == {"site"} and unshared["site"]["shares-local-model"] is False
    with pytest.raises(ValueError, match="unknown query 'weights'; this site answers class-counts, local-model"):
        answer_query(ConfigRecord({"query": "weights"}), settings, {"partition-id": 0})
    with pytest.raises(ValueError, match="local-models lists 2 entries for 3 sites"):
        FederatedConfig.model_validate({"sites": ",".join(map(str, synthetic_sites)), "local-models": "/a.pt,"})


def test_the_report_escapes_site_names_and_reasons_in_the_matrix(tmp_path):
    hostile = '<script>alert("site")</script>'
    matrix = {"split": "test", "best-round": 2, "sites": ["hospital-1", hostile],
              "models": [{"kind": "global", "site": None, "pooled": {"macro_auc": 0.7, "macro_auc_bound": 0.05,
                                                                       "num-examples": 40, "sites": 2},
                          "cells": [{"status": "scored", "macro_auc": 0.75, "macro_auc_bound": 0.1, "num-examples": 20},
                                    {"status": "opted out", "reason": "<b>no</b>"}]}],
              "local-models-not-scored": [{"site": hostile, "reason": "the site shares no local model"}]}
    files = RunFiles(name="run", config={}, rounds=[], final=None, plots={}, cross_site=matrix)
    page = run_report_html(files, "")
    assert "<script" not in page and "<b>no</b>" not in page
    assert "global model (round 2)" in page and 'title="&lt;b&gt;no&lt;/b&gt;">opted out<' in page
    assert _metric_cells(page)["cross-site-global-hospital-1"] == ("0.75", "0.750 ± 0.100")


def _metric_cells(page: str) -> dict[str, tuple[str, str]]:
    """data-metric -> (data-value, the cell's text) of a rendered page."""
    cells = re.findall(r'data-metric="([^"]*)" data-value="([^"]*)">([^<]*)<', page)
    return {html.unescape(name): (html.unescape(value), html.unescape(text)) for name, value, text in cells}
