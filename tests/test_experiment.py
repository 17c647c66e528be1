from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from pneumofed.simulations.cli.experiment import configure_parser, run
from pneumofed.simulations.experiment import (
    ProcessTreeMemory,
    load_config,
    markdown_table,
)

CONFIGS = Path(__file__).resolve().parents[1] / "simulations" / "configs"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(config: Path) -> None:
    assert load_config(config).name


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    base = 'name = "x"\n[data]\nkind = "synthetic"\n[partitions.a]\nscheme = "natural"\n'
    with pytest.raises(ValidationError, match="fedsgd"):
        load_config(_write(tmp_path / "a.toml", base + '[federated]\nstrategies = ["fedsgd"]\n'))
    with pytest.raises(ValidationError, match="unknown model"):
        load_config(_write(tmp_path / "b.toml", base + '[centralised]\nmodels = ["vgg16"]\n'))
    with pytest.raises(ValidationError, match="run_config may not set"):
        load_config(_write(tmp_path / "c.toml", base + '[federated]\nrun_config = { "run-dir" = "/tmp/x" }\n'))
    with pytest.raises(ValidationError, match="proximal"):
        load_config(_write(tmp_path / "d.toml", base + '[federated]\nrun_config = { "proximal-mu" = -1 }\n'))
    with pytest.raises(ValidationError, match="needs dicom_dir"):
        load_config(_write(tmp_path / "e.toml", 'name = "x"\n[data]\nkind = "dicom"\n'))
    with pytest.raises(ValidationError, match="Extra inputs"):
        load_config(_write(tmp_path / "f.toml", base + "[training]\nepoch = 3\n"))
    with pytest.raises(ValidationError, match="reference 'fedprox' is not an arm of this experiment; choose from fedavg, pooled"):
        load_config(_write(tmp_path / "g.toml", 'reference = "fedprox"\n' + base + "[federated]\n"))


def test_relative_data_paths_are_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    config = load_config(_write(tmp_path / "cfg" / "x.toml",
                                'name = "x"\nlocal = false\npooled = false\n[data]\nkind = "stores"\nstores = ["../s1"]\n'))
    assert config.data.stores == [(tmp_path / "s1").resolve()]


def test_process_tree_memory_counts_child_processes() -> None:
    with ProcessTreeMemory(interval_s=0.05) as alone:
        time.sleep(0.3)
    # Non-zero bytes so the pages are really touched (zeroed memory may stay unmapped).
    script = "b = b'x' * (300 * 2**20); print('ready', flush=True); import time; time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with ProcessTreeMemory(interval_s=0.05) as with_child:
            time.sleep(0.3)
    finally:
        child.kill()
        child.wait()
    assert with_child.peak_bytes - alone.peak_bytes > 250 * 2**20


def test_markdown_table_shows_ci_and_dashes_for_undefined() -> None:
    row = {"arm": "local", "name": "site-01", "test-rois": 9, "accuracy": 0.5, "precision": 0.4, "recall": 0.3,
           "f1": 0.35, "auc nodule": 0.8, "auc nodule ci-low": 0.6, "auc nodule ci-high": 0.95,
           "auc emphysema": None, "auc emphysema ci-low": None, "auc emphysema ci-high": None,
           "macro auc": 0.8, "macro auc ci-low": 0.6, "macro auc ci-high": 0.95, "wall s": 12.0, "peak rss gib": 1.5}
    table = markdown_table([row]).splitlines()
    assert table[0].count("|") == table[2].count("|")
    assert "0.800 [0.60, 0.95]" in table[2] and "| – |" in table[2]


@pytest.mark.slow
def test_small_experiment_fills_every_column(synthetic_sites: list[Path], tmp_path: Path, capsys) -> None:
    stores = ", ".join(f'"{s}"' for s in synthetic_sites[:2])
    config = _write(tmp_path / "tiny.toml", f"""
name = "tiny"
bootstrap = 50
model = "shufflenet_v2_eca"
[data]
kind = "stores"
roi_size = 32
stores = [{stores}]
[training]
epochs = 1
learning_rate = 1e-3
augment = false
[centralised]
models = ["shufflenet_v2"]
folds = 2
[federated]
strategies = ["fedavg"]
rounds = 1
[partitions.natural]
scheme = "natural"
""")
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert run(parser.parse_args([str(config), "--out", str(tmp_path / "out")])) == 0

    out = tmp_path / "out"
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["group"], r["arm"], r["name"]) for r in rows] == [
        ("centralised-cv", "centralised (2-fold CV)", "shufflenet_v2"),
        ("natural", "pooled", "pooled"),
        ("natural", "federated", "fedavg"),
        ("natural", "local", "local-site-01"),
        ("natural", "local", "local-site-02"),
    ]
    for row in rows:
        empty = [key for key, value in row.items() if value in ("", None)]
        assert not empty, f"{row['name']}: empty {empty}"
        assert float(row["macro auc ci-low"]) <= float(row["macro auc"]) <= float(row["macro auc ci-high"])
        assert float(row["peak rss gib"]) > 0.1
    # All per-partition arms are scored on the same test ROIs; the CV arm on every ROI once.
    assert len({r["test-rois"] for r in rows[1:]}) == 1
    pooled_size = sum(len(json.loads((s / "index.json").read_text())["records"]) for s in synthetic_sites[:2])
    assert int(rows[0]["test-rois"]) == pooled_size

    arms = json.loads((out / "results.json").read_text())["arms"]
    federated = next(a for a in arms if a["kind"] == "federated")
    assert federated["extra"]["agrees-with-final-json"]
    assert "| federated | fedavg |" in (out / "results.md").read_text()
    assert (out / "natural" / "curves.png").is_file()
    assert (out / "natural" / "federated-fedavg" / "test_roc.png").is_file()
    # A CV arm is keyed by its own model, not the per-partition arms' model.
    assert json.loads((out / "centralised-cv" / "shufflenet_v2" / "arm.json").read_text())["settings"]["model"] == (
        "shufflenet_v2")

    # A second run with unchanged settings reuses every arm instead of training again.
    capsys.readouterr()
    assert run(parser.parse_args([str(config), "--out", str(out)])) == 0
    announced = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[experiment] r")]
    assert announced == ["reusing"] * len(rows)


def test_an_arm_is_reused_until_something_it_depends_on_changes(synthetic_sites, tmp_path, capsys):
    stores = ", ".join(f'"{s}"' for s in synthetic_sites[:2])

    def experiment(rounds: int, variants: str) -> dict[str, str]:
        """Run the experiment; each arm's folder name -> 'running' or 'reusing'."""
        config = _write(tmp_path / "reuse.toml", f"""
name = "reuse"
bootstrap = 20
model_width = 0.5
local = false
[data]
kind = "stores"
roi_size = 32
stores = [{stores}]
[training]
epochs = 1
augment = false
[federated]
strategies = ["fedavg"]
rounds = {rounds}
engine = "in-process"
variants = {variants}
[partitions.natural]
scheme = "natural"
""")
        parser = argparse.ArgumentParser()
        configure_parser(parser)
        capsys.readouterr()
        assert run(parser.parse_args([str(config), "--out", str(tmp_path / "out")])) == 0
        lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("[experiment] r")]
        return {Path(words[2]).name: words[1] for words in lines}

    assert experiment(1, "{}") == {"pooled": "running", "federated-fedavg": "running"}
    # Another variant runs only itself: the arms already there do not depend on it.
    assert experiment(1, '{ fedbn = { "bn-mode" = "fedbn" } }') == {
        "pooled": "reusing", "federated-fedavg": "reusing", "federated-fedbn": "running"}
    # More rounds change every federated arm's run, and nothing of the pooled arm's.
    assert experiment(2, '{ fedbn = { "bn-mode" = "fedbn" } }') == {
        "pooled": "reusing", "federated-fedavg": "running", "federated-fedbn": "running"}


def test_seeds_in_process_variants_and_the_paired_summary_across_seeds(synthetic_sites, tmp_path):
    stores = ", ".join(f'"{s}"' for s in synthetic_sites[:2])
    config = _write(tmp_path / "seeds.toml", f"""
name = "seeds"
bootstrap = 50
model_width = 0.5
seeds = [3, 4]
local = false
[data]
kind = "stores"
roi_size = 32
stores = [{stores}]
[training]
epochs = 2
augment = false
[federated]
strategies = ["fedavg"]
rounds = 2
engine = "in-process"
variants = {{ fedbn = {{ "bn-mode" = "fedbn" }} }}
[partitions.natural]
scheme = "natural"
""")
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    out = tmp_path / "out"
    assert run(parser.parse_args([str(config), "--out", str(out), "--seeds", "3"])) == 0
    assert run(parser.parse_args([str(config), "--out", str(out), "--seeds", "4"])) == 0
    assert run(parser.parse_args([str(config), "--out", str(out), "--seeds", "5"])) == 2

    with (out / "summary.csv").open() as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"pooled", "fedavg", "fedbn"} and all(row["seeds"] == "2" for row in rows.values())
    per_seed = {seed: {a["name"]: a["summary"]["macro_auc"] for a in json.loads(
        (out / f"seed-{seed}" / "results.json").read_text())["arms"]} for seed in (3, 4)}
    fedbn = [per_seed[s]["fedbn"] for s in (3, 4)]
    assert float(rows["fedbn"]["macro auc mean"]) == pytest.approx(np.mean(fedbn))
    assert float(rows["fedbn"]["macro auc sd"]) == pytest.approx(np.std(fedbn, ddof=1))
    difference = [per_seed[s]["fedbn"] - per_seed[s]["pooled"] for s in (3, 4)]
    assert float(rows["fedbn"]["auc - reference"]) == pytest.approx(np.mean(difference))
    assert float(rows["fedbn"]["auc - reference ci-low"]) <= np.mean(difference) <= float(rows["fedbn"]["auc - reference ci-high"])
    assert {row["reference"] for row in rows.values()} == {"pooled"} and rows["pooled"]["auc - reference"] == ""
    assert per_seed[3] != per_seed[4], "the seeds trained the same models"
    fedbn_run = json.loads((out / "seed-3" / "natural" / "federated-fedbn" / "run" / "config.json").read_text())
    assert fedbn_run["bn-mode"] == "fedbn" and fedbn_run["strategy"] == "fedavg"
    # Each site's test part was scored with the site's own BatchNorm, as the federated test round did.
    fedbn_arm = next(a for a in json.loads((out / "seed-3" / "results.json").read_text())["arms"] if a["name"] == "fedbn")
    assert fedbn_arm["extra"]["agrees-with-final-json"]
    assert "| federated | fedbn | 2 |" in (out / "summary.md").read_text()


def test_a_fedbn_arm_needs_the_in_process_engine_to_be_scored_per_site(tmp_path):
    config = _write(tmp_path / "bad.toml", """
name = "bad"
[data]
kind = "synthetic"
[federated]
variants = { fedbn = { "bn-mode" = "fedbn" } }
[partitions.natural]
scheme = "natural"
""")
    with pytest.raises(ValidationError, match="in-process"):
        load_config(config)
