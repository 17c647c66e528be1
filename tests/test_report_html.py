"""report.html: its numbers are those of the run's files, data cannot inject markup, it loads nothing
from the network, and a real browser renders it without a console message."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.metrics.html_report import (
    ExperimentFiles,
    RunFiles,
    experiment_report_html,
    format_metric,
    run_report_html,
)
from pneumofed.common.metrics.plots import plot_confusion, plot_curves, plot_roc
from pneumofed.server.outputs import RunDirectory, reproduce_command

HOSTILE_SITE = '<script>alert("site")</script>'
CLASSES = ["nodule", "interstitial", "emphysema"]


def _evaluation(macro_auc: float, aucs: list[float | None]) -> dict[str, Any]:
    """An evaluation record shaped as `PooledEvaluation.summary()` writes it."""
    return {
        "eval-loss": 1.0382980292873865, "num-examples": 19, "num_samples": 19, "accuracy": 0.47368421052631576,
        "macro_precision": 0.3428571428571428, "macro_recall": 0.3968253968253968, "macro_f1": 0.3333333333333333,
        "macro_auc": macro_auc, "macro_auc_bound": 0.1125,
        "per_class": [{"name": name, "support": 6, "precision": 0.5, "recall": 0.25, "f1": 0.3333, "auc": auc,
                       "auc_bound": None if auc is None else 0.125}
                      for name, auc in zip(CLASSES, aucs, strict=True)],
        "auc-ci-hanley-mcneil": {name: [auc - 0.3, min(1.0, auc + 0.3)]
                                 for name, auc in zip(CLASSES, aucs, strict=True) if auc is not None},
        "confusion_matrix": [[6, 1, 0], [6, 3, 0], [2, 1, 0]],
        "site-auc": {"hospital-1": {"nodule": 0.6, "interstitial": 1.0, "emphysema": None, "macro": 0.8},
                     HOSTILE_SITE: {"nodule": 0.375, "interstitial": 0.5555555555555556, "emphysema": 0.0,
                                    "macro": 0.3101851851851852}},
        "rejected-evaluations": [],
    }


def _write_run(path: Path, plots: bool) -> Path:
    config = FederatedConfig(num_server_rounds=2, sites="/data/a,/data/b", run_dir=str(path))
    rounds = [
        {"round": 1, "train-loss": 1.1, "train-accuracy": 0.33, **_evaluation(0.4567, [0.3, 0.5, 0.57]),
         "rejected-updates": [{"node": 7, "reason": "update norm is 12x <b>bound</b>"}]},
        {"round": 2, "train-loss": 1.07, "train-accuracy": 0.44,
         **_evaluation(0.5336219336219337, [0.3073593073593074, 0.5844155844155845, 0.7090909090909092]),
         "rejected-updates": []},
    ]
    final = {"best-round": 2, "split": "test", **_evaluation(0.629431216931217,
                                                             [0.5952380952380953, 0.6888888888888889, None])}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_run_config() | {"flower-run-id": 42}))
    (path / "metrics.json").write_text(json.dumps(rounds))
    (path / "final.json").write_text(json.dumps(final))
    if plots:
        plot_curves(path / "plots" / "curves.png", [1, 2], {"eval loss": [1.1, 1.0], "pooled macro auc": [0.46, 0.53]},
                    "round", "Federated training")
        plot_roc(path / "plots" / "roc_test.png", {"nodule": ([0, 0.5, 1], [0, 0.7, 1])}, {"nodule": 0.595}, "ROC")
        plot_confusion(path / "plots" / "confusion_test.png", final["confusion_matrix"], CLASSES, "Test")
    return path


class _Metrics(HTMLParser):
    """data-metric -> (data-value, the cell's text) of a rendered page."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, tuple[str, str]] = {}
        self._open: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if "data-metric" in named:
            self._open = (named["data-metric"], named["data-value"])

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self.cells[self._open[0]] = (self._open[1], data)
            self._open = None


def _metric_cells(page: str) -> dict[str, tuple[str, str]]:
    parser = _Metrics()
    parser.feed(page)
    return parser.cells


def _assert_numbers_match_the_files(page: str, run: Path) -> None:
    cells = _metric_cells(page)
    final = json.loads((run / "final.json").read_text())
    last = json.loads((run / "metrics.json").read_text())[-1]
    expected = {"final-macro-auc": final["macro_auc"], "last-round-macro-auc": last["macro_auc"],
                "round-2-macro-auc": last["macro_auc"]}
    expected |= {f"final-auc-{c['name']}": c["auc"] for c in final["per_class"]}
    expected |= {f"final-auc-bound-{c['name']}": c["auc_bound"] for c in final["per_class"]}
    expected["final-macro-auc-bound"] = final["macro_auc_bound"]
    expected |= {f"final-site-{site}-macro-auc": aucs["macro"] for site, aucs in final["site-auc"].items()}
    for name, value in expected.items():
        shown_value, shown_text = cells[name]
        assert json.loads(shown_value) == value, name
        assert shown_text == format_metric(value), name


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _write_run(tmp_path / "run", plots=False)


def test_the_report_shows_the_metrics_as_read_from_the_run_files(run_dir: Path) -> None:
    page = run_report_html(RunFiles.read(run_dir), "pneumofed simulate")
    _assert_numbers_match_the_files(page, run_dir)
    assert ">0.629<" in page and ">0.595<" in page and ">0.689<" in page  # final macro and per-class AUCs
    assert "Site-level DP: off" in page and "DP-SGD at the sites: off" in page and ">shared<" in page
    assert "Secure aggregation: off" in page
    assert "95 % CI (Hanley-McNeil + bound)" in page and "[0.295, 0.895]" in page  # nodule's CI, as recorded
    assert "hospital-1" in page and "Each site alone" in page
    assert "update norm is 12x &lt;b&gt;bound&lt;/b&gt;" in page  # the rejected update, with its reason


def test_data_cannot_inject_markup(run_dir: Path) -> None:
    page = run_report_html(RunFiles.read(run_dir), 'pneumofed simulate --set x="</pre><script>1</script>"')
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;site&quot;)&lt;/script&gt;" in page
    assert "<b>bound</b>" not in page


def test_the_report_references_nothing_on_the_network(run_dir: Path) -> None:
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    page = run_report_html(RunFiles.read(run_dir), "pneumofed simulate")
    assert "http://" not in page and "https://" not in page
    references = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert references and all(ref.startswith("data:image/png;base64,") for ref in references)


def test_site_level_dp_settings_and_the_epsilon_spent_are_shown(run_dir: Path) -> None:
    files = RunFiles.read(run_dir)
    files.config.update({"site-dp": "server-fixed", "site-dp-noise-multiplier": 1.1, "site-dp-clipping-norm": 0.5})
    files.rounds[-1].update({"site-dp-epsilon": 12.3456, "site-dp-delta": 1e-5, "site-dp-releases": 2})
    page = run_report_html(files, "")
    assert "Site-level DP: server-fixed clipping (Flower), each site&#x27;s update clipped to norm 0.5, noise multiplier 1.1" in page
    assert "epsilon 12.346 at delta 1e-05 after 2 aggregated round(s)" in page


def test_secure_aggregation_is_shown_when_on(run_dir: Path) -> None:
    files = RunFiles.read(run_dir)
    files.config["secure-aggregation"] = True
    assert "Secure aggregation: on: the server sees only the sum" in run_report_html(files, "")


def test_the_run_directory_writes_its_report_with_its_plots(tmp_path: Path) -> None:
    config = FederatedConfig(num_server_rounds=1, run_dir=str(tmp_path / "run"), sites="/data/a")
    run = RunDirectory.open(config, flower_run_id=5)
    run.history = [{"round": 1, "train-loss": 1.0, "eval-loss": 0.9, "macro_auc": 0.61, "rejected-updates": []}]
    (run.path / "metrics.json").write_text(json.dumps(run.history))  # as `record_round` leaves it
    run.write_plots(None)
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'data-metric="round-1-macro-auc" data-value="0.61">0.610<' in page
    assert "data:image/png;base64," in page  # plots/curves.png, embedded
    assert shlex.join(["--run-dir", str(tmp_path / "run")]) in page


def test_the_reproduce_command_sets_what_differs_from_the_defaults(tmp_path: Path) -> None:
    from pneumofed.simulations.cli.simulate import _parse_override, configure_parser

    config = FederatedConfig(num_server_rounds=3, bn_mode="fedbn", class_names="a b,c", sites="/s/one,/s/two",
                             run_dir="/runs/x", resume=True)
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    words = shlex.split(reproduce_command(config, Path("/runs/x")))
    assert words[:2] == ["pneumofed", "simulate"]
    args = parser.parse_args(words[2:])
    assert args.sites == [Path("/s/one"), Path("/s/two")] and args.run_dir == Path("/runs/x")
    assert dict(map(_parse_override, args.overrides)) == {"num-server-rounds": 3, "class-names": "a b,c",
                                                          "bn-mode": "fedbn"}
    deployed = reproduce_command(FederatedConfig(learning_rate=1e-4), Path("/runs/y"))
    assert deployed.splitlines()[-1] == "flwr run FLOWER_APP FEDERATION --run-config learning-rate=0.0001 --stream"


def test_the_experiment_report_shows_the_summary_across_seeds(tmp_path: Path) -> None:
    from pneumofed.simulations.experiment import ExperimentConfig, summarise_seeds

    config = ExperimentConfig.model_validate({"name": "small", "seeds": [0, 1], "data": {"kind": "synthetic"},
                                              "pooled": False, "local": False})

    def arm(kind: str, name: str, macro_auc: float) -> dict[str, Any]:
        summary = _evaluation(macro_auc, [0.5, 0.6, 0.7]) | {"auc-ci": {c: [0.4, 0.8] for c in CLASSES},
                                                             "macro-auc-ci": [0.45, 0.75]}
        return {"name": name, "group": "iid", "kind": kind, "model": "m", "summary": summary, "curve": [],
                "wall_s": 3.0, "peak_gib": 0.5, "extra": {}}

    for seed, auc in ((0, 0.61), (1, 0.65)):
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        results = {"config": config.model_dump(mode="json"),
                   "arms": [arm("pooled", "pooled", auc + 0.05), arm("federated", HOSTILE_SITE, auc)]}
        (folder / "results.json").write_text(json.dumps(results))
    rows = summarise_seeds(config, tmp_path)
    page = experiment_report_html(ExperimentFiles.read(tmp_path, config.seeds, rows))
    cells = _metric_cells(page)
    federated = next(row for row in rows if row["arm"] == "federated")
    shown_value, shown_text = cells[f"summary-iid-federated-{HOSTILE_SITE}-macro-auc-mean"]
    assert json.loads(shown_value) == federated["macro auc mean"]
    assert shown_text == f"{format_metric(federated['macro auc mean'])} ± {format_metric(federated['macro auc sd'])}"
    assert json.loads(cells[f"seed-1-iid-federated-{HOSTILE_SITE}-macro-auc"][0]) == 0.65
    assert "<script" not in page and "seed-0" in page and "seed-1" in page
    single = _metric_cells(experiment_report_html(ExperimentFiles.read(tmp_path / "seed-0")))  # no `seeds`
    assert json.loads(single[f"arms-iid-federated-{HOSTILE_SITE}-macro-auc"][0]) == 0.61


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)


def test_a_headless_browser_renders_the_report_with_no_console_message(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (`make system-packages` installs it as root with apt)")
    run = _write_run(tmp_path / "run", plots=True)
    report = run / "report.html"
    report.write_text(run_report_html(RunFiles.read(run), "pneumofed simulate --sites /data/a /data/b"))
    # A profile of its own, so parallel runs and the user's Chromium never share one.
    command = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*command, "--dump-dom", report.as_uri()], check=False, capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr
    # Chromium logs every console message, a blocked resource or script included, as INFO:CONSOLE.
    assert ":CONSOLE" not in dom.stderr, [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert "Final evaluation on the sites' test parts" in dom.stdout
    _assert_numbers_match_the_files(dom.stdout, run)

    screenshot = tmp_path / "report.png"  # kept in pytest's tmp_path to look at
    shot = subprocess.run([*command, f"--screenshot={screenshot}", "--window-size=1600,3000", report.as_uri()],
                          check=False, capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0, shot.stderr
    assert ":CONSOLE" not in shot.stderr
    assert screenshot.stat().st_size > 10_000  # a drawn page, not a blank one
