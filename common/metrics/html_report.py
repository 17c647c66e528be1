"""report.html: one self-contained page per federated run or experiment, to open in a browser.

Every number on the page is read from the files the run or experiment wrote (config.json,
metrics.json, final.json, results.json and the seeds' summary): nothing is recomputed here, so the
page and the files cannot disagree. The plots are the PNGs already drawn (`plots.py`), embedded as
base64 data URIs; the page has inline CSS and no script, and loads nothing from anywhere.

A metric cell shows its value to three decimals (`format_metric`) and carries the value exactly
as read in `data-value`, named by `data-metric`, so a reader (or a test) can check it against the
JSON.

Reading the files (`RunFiles.read`, `ExperimentFiles.read`) is kept apart from building the page
(`run_report_html`, `experiment_report_html`, which are pure).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What a site's TRAIN reply carries besides its metrics, per bn-mode (docs/privacy.md).
ARRAYS_SENT = {
    "shared": "every model tensor (weights, BatchNorm affine parameters and statistics)",
    "fedbn": "every model tensor except all BatchNorm tensors, which stay at the site",
    "silobn": "every model tensor except the BatchNorm running statistics, which stay at the site",
}
METRICS_SENT = (
    "once per run: the number of training ROIs and their class counts; "
    "every round: num-examples, train loss and accuracy; on evaluation: num-examples, loss, accuracy, "
    "a K x K confusion matrix and per-class counts of ROIs along a shared score axis. No pixels, patient "
    "keys, file names or per-ROI scores."
)
# DP-SGD's run-config keys: a line of their own, with each site's spend from metrics.json's `dp-sgd`.
DP_SGD_KEYS = ("dp-target-epsilon", "dp-delta", "dp-max-grad-norm")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1600px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
caption { text-align: left; font-weight: bold; padding-bottom: .3em; }
.side-by-side { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
.note { color: #555; font-size: .9em; }
"""


# ------------------------------------------------------------------------------ reading the files


@dataclass(frozen=True)
class RunFiles:
    """What a federated run directory holds that the report shows (see server/outputs.py)."""

    name: str
    config: dict[str, Any]
    rounds: list[dict[str, Any]]  # metrics.json
    final: dict[str, Any] | None  # final.json, absent when no round produced a pooled AUC
    plots: dict[str, bytes]  # plots/<name>.png -> its bytes
    cross_site: dict[str, Any] | None = None  # cross_site.json, present with cross-site-validation

    @classmethod
    def read(cls, path: Path) -> RunFiles:
        return cls(
            name=path.name,
            config=_read_json(path / "config.json", {}),
            rounds=_read_json(path / "metrics.json", []),
            final=_read_json(path / "final.json", None),
            plots={png.name: png.read_bytes() for png in sorted((path / "plots").glob("*.png"))},
            cross_site=_read_json(path / "cross_site.json", None),
        )


@dataclass(frozen=True)
class SeedResults:
    """One seed's results.json (`label` is "" when the experiment has no `seeds`) and its groups' curves."""

    label: str
    results: dict[str, Any]
    curves: dict[str, bytes]  # group -> <group>/curves.png


@dataclass(frozen=True)
class ExperimentFiles:
    """An experiment folder (simulations/experiment.py): per seed its results, and the summary across seeds."""

    name: str
    seeds: list[SeedResults]
    seed_summary: list[dict[str, Any]]  # the rows of summary.csv (empty without `seeds`)

    @classmethod
    def read(cls, out: Path, seeds: Sequence[int] | None = None,
             seed_summary: Sequence[dict[str, Any]] = ()) -> ExperimentFiles:
        """`out` as the experiment writes it: results.json there, or with `seeds` in seed-<n>/ (those
        finished so far, as in the summary; a folder of a seed no longer configured is left out)."""
        folders = [out] if seeds is None else [out / f"seed-{seed}" for seed in seeds]
        folders = [folder for folder in folders if (folder / "results.json").is_file()]
        found = []
        for folder in folders:
            results = json.loads((folder / "results.json").read_text())
            groups = dict.fromkeys(arm["group"] for arm in results["arms"])
            curves = {g: (folder / g / "curves.png").read_bytes() for g in groups if (folder / g / "curves.png").is_file()}
            found.append(SeedResults("" if folder == out else folder.name, results, curves))
        name = found[0].results["config"]["name"] if found else out.name
        return cls(name=name, seeds=found, seed_summary=list(seed_summary))


def _read_json(path: Path, missing: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else missing


# ------------------------------------------------------------------------------ HTML pieces


def format_metric(value: float | None) -> str:
    """How the page shows a metric: three decimals, an en dash where it is undefined."""
    return "–" if value is None else f"{value:.3f}"


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _metric(value: float | None, name: str = "", sd: float | None = None) -> str:
    """A table cell with the metric (and its sd), its exact value in data-value and, when named, its data-metric."""
    named = f' data-metric="{_text(name)}"' if name else ""
    spread = "" if sd is None else f" ± {format_metric(sd)}"
    return f'<td class="num"{named} data-value="{_text(json.dumps(value))}">{_text(format_metric(value) + spread)}</td>'


def _interval(ci: Sequence[float] | None) -> str:
    return "<td>–</td>" if not ci else f'<td class="num">[{format_metric(ci[0])}, {format_metric(ci[1])}]</td>'


def _cell(value: Any) -> str:
    return f"<td>{_text(value)}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "") -> str:
    """`rows` hold finished <td> cells; the header and caption are escaped here."""
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    title = f"<caption>{_text(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<p class="note">({_text(alt)}: no plot in the run directory)</p>'
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _page(title: str, body: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        # No network at view time, and no script even if a string slipped past the escaping.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        f"<title>{_text(title)}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


# ------------------------------------------------------------------------------ a federated run


def run_report_html(files: RunFiles, reproduce: str) -> str:
    """The page of one federated run; `reproduce` is the command line that runs it again."""
    config, rounds, final = files.config, files.rounds, files.final
    headline = [f"strategy {config.get('strategy', '?')}",
                f"{len(rounds)} of {config.get('num-server-rounds', '?')} rounds recorded"]
    if final is not None:
        headline += [f"best round {final.get('best-round')}",
                     f"test macro AUC {format_metric(final.get('macro_auc'))}"]
    body = [
        f"<h1>Federated run {_text(files.name)}</h1>",
        f"<p>{_text(', '.join(headline))}; Flower run id {_text(config.get('flower-run-id', '?'))}.</p>",
        "<h2>Reproduce</h2>",
        ('<p class="note">The command that runs these settings again. A run directory that already holds a run '
         "is refused: give it another <code>run-dir</code>.</p>"),
        f'<pre id="reproduce"><code>{_text(reproduce)}</code></pre>',
        _privacy_section(config, rounds),
        "<h2>Per-round curves</h2>",
        _image(files.plots.get("curves.png"), "loss, accuracy and pooled macro AUC per round"),
        _rounds_table(rounds),
    ]
    if final is not None:
        body += [f"<h2>Final evaluation on the sites' test parts (best round {_text(final.get('best-round'))})</h2>",
                 _evaluation(final, "final", files.plots.get("roc_test.png"), files.plots.get("confusion_test.png"))]
    else:
        body.append("<h2>Final evaluation</h2><p>None: no round produced a pooled AUC, so no best model was "
                    "evaluated on the test parts.</p>")
    if files.cross_site is not None:
        body.append(_cross_site_section(files.cross_site))
    if rounds:
        last = rounds[-1]
        body += [f"<h2>Last round (round {_text(last.get('round'))}) on the sites' validation parts</h2>",
                 _evaluation(last, "last-round", files.plots.get("roc.png"), files.plots.get("confusion.png"))]
    body += [_rejections_section(config, rounds, final), "<h2>Configuration</h2>",
             _table(["key", "value"], [[_cell(k), _cell(json.dumps(v))] for k, v in config.items()],
                    "config.json")]
    return _page(f"pneumofed run {files.name}", body)


def _privacy_section(config: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> str:
    mode = config.get("bn-mode", "shared")
    arrays = ARRAYS_SENT.get(mode, "see docs/privacy.md")
    secure = ("on: the server sees only the sum of the sites' updates (SecAgg+), never one in clear"
              if config.get("secure-aggregation") else "off (the server sees each site's update in clear)")
    items = [
        f'bn-mode: <b id="bn-mode">{_text(mode)}</b>; model arrays a site sends: {_text(arrays)}.',
        f"Metrics a site sends: {_text(METRICS_SENT)}",
        f'<span id="dp">{_text(_site_dp_line(config, rounds))}</span>',
        f'<span id="dp-sgd">{_text(_dp_sgd_line(config))}</span>',
        f'<span id="secure-aggregation">Secure aggregation: {_text(secure)}.</span>',
    ]
    if "update-encoding" in config:
        items.insert(1, f"update-encoding (how the arrays travel): {_text(config['update-encoding'])}")
    listed = "".join(f"<li>{item}</li>" for item in items)
    return (f'<h2>Privacy</h2><ul>{listed}</ul>{_dp_sgd_table(rounds)}'
            '<p class="note">Field by field: docs/privacy.md.</p>')


def _site_dp_line(config: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> str:
    mode = config.get("site-dp", "off")
    if mode == "off":
        return "Site-level DP: off"
    line = (f"Site-level DP: {mode} clipping (Flower), each site's update clipped to norm "
            f"{config.get('site-dp-clipping-norm')}, noise multiplier {config.get('site-dp-noise-multiplier')}")
    spent = [record for record in rounds if "site-dp-epsilon" in record]
    if spent:
        last = spent[-1]
        line += (f"; epsilon {format_metric(last['site-dp-epsilon'])} at delta {last.get('site-dp-delta')} "
                 f"after {last.get('site-dp-releases')} aggregated round(s)")
    return line


def _dp_sgd_line(config: Mapping[str, Any]) -> str:
    if not config.get("dp-target-epsilon"):
        return "DP-SGD at the sites: off"
    return (f"DP-SGD at every site (patient-level): target epsilon {config['dp-target-epsilon']} at delta "
            f"{config.get('dp-delta')} after all rounds, each ROI's gradient clipped to {config.get('dp-max-grad-norm')}; "
            "sites send their epsilon instead of their train loss and accuracy")


def _dp_sgd_table(rounds: Sequence[Mapping[str, Any]]) -> str:
    """Each site's epsilon as it stated it: after every round it trained, and after its last."""
    spends: dict[str, list[tuple[Any, Mapping[str, float]]]] = {}
    for record in rounds:
        for site, spend in record.get("dp-sgd", {}).items():
            spends.setdefault(site, []).append((record.get("round"), spend))
    rows = [[_cell(site), _cell(len(spent)),
             _cell(", ".join(f"{number}: {format_metric(spend.get('dp-epsilon'))}" for number, spend in spent)),
             _metric(spent[-1][1].get("dp-epsilon"), f"dp-epsilon-{site}"), _cell(spent[-1][1].get("dp-delta"))]
            for site, spent in sorted(spends.items())]
    if not rows:
        return ""
    return _table(["site (node)", "rounds trained", "epsilon after each round (round: epsilon)",
                   "epsilon spent", "delta"], rows, "Each site's DP-SGD privacy spend (metrics.json dp-sgd)")


def _rounds_table(rounds: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [_cell(r.get("round")), _metric(r.get("train-loss")), _metric(r.get("eval-loss")),
         _metric(r.get("train-accuracy")), _metric(r.get("accuracy")),
         _metric(r.get("macro_auc"), f"round-{r.get('round')}-macro-auc"),
         _cell(len(r.get("rejected-updates", [])) + len(r.get("rejected-evaluations", [])))]
        for r in rounds
    ]
    return _table(["round", "train loss", "eval loss", "train accuracy", "eval accuracy", "pooled macro AUC",
                   "rejected replies"], rows, "metrics.json, one row per round")


def _evaluation(evaluation: Mapping[str, Any], prefix: str, roc: bytes | None, confusion: bytes | None) -> str:
    """Pooled table beside the per-site one, then the pooled ROC and the confusion matrix."""
    classes = [c["name"] for c in evaluation.get("per_class", [])]
    tables = [_pooled_table(evaluation, prefix), _site_table(evaluation.get("site-auc", {}), classes, prefix)]
    federated = "auc-ci-hanley-mcneil" in evaluation
    note = "" if not federated else (
        '<p class="note">Sites send coarse score summaries, never scores: each pooled AUC is within its bound '
        "of the AUC of the sites' scores, and its 95 % CI is Hanley &amp; McNeil's (from the AUC and the class "
        "counts) widened by that bound; <code>pneumofed evaluate models/best.pt</code> on a site's store gives "
        "bootstrap and DeLong CIs there.</p>")
    figures = [_image(roc, "pooled ROC per class"), _image(confusion, "confusion matrix"),
               _confusion_table(evaluation.get("confusion_matrix", []), classes)]
    return (f'<div class="side-by-side">{"".join(tables)}</div>{note}'
            f'<div class="side-by-side">{"".join(figures)}</div>')


def _pooled_table(evaluation: Mapping[str, Any], prefix: str) -> str:
    caption = f"Pooled over sites (accuracy {format_metric(evaluation.get('accuracy'))}, " \
              f"loss {format_metric(evaluation.get('eval-loss'))})"
    head = ["class", "support", "precision", "recall", "F1", "AUC"]
    macro = [_cell("macro"), _cell(evaluation.get("num-examples")), _metric(evaluation.get("macro_precision")),
             _metric(evaluation.get("macro_recall")), _metric(evaluation.get("macro_f1")),
             _metric(evaluation.get("macro_auc"), f"{prefix}-macro-auc")]
    rows = [
        [_cell(c["name"]), _cell(c["support"]), _metric(c["precision"]), _metric(c["recall"]), _metric(c["f1"]),
         _metric(c["auc"], f"{prefix}-auc-{c['name']}")]
        for c in evaluation.get("per_class", [])
    ]
    if "auc-ci-hanley-mcneil" in evaluation:  # a federated evaluation: counts, no scores
        hanley = evaluation["auc-ci-hanley-mcneil"]
        for row, c in zip(rows, evaluation.get("per_class", []), strict=True):
            row += [_metric(c.get("auc_bound"), f"{prefix}-auc-bound-{c['name']}"), _interval(hanley.get(c["name"]))]
        rows.append(macro + [_metric(evaluation.get("macro_auc_bound"), f"{prefix}-macro-auc-bound"), "<td>–</td>"])
        return _table(head + ["AUC bound", "95 % CI (Hanley-McNeil + bound)"], rows, caption)
    bootstrap, delong = evaluation.get("auc-ci") or {}, evaluation.get("auc-ci-delong") or {}
    for row, c in zip(rows, evaluation.get("per_class", []), strict=True):
        row += [_interval(bootstrap.get(c["name"])), _interval(delong.get(c["name"]))]
    rows.append(macro + [_interval(evaluation.get("macro-auc-ci")), "<td>–</td>"])
    return _table(head + ["bootstrap 95 % CI", "DeLong 95 % CI"], rows, caption)


def _site_table(site_auc: Mapping[str, Mapping[str, float | None]], classes: Sequence[str], prefix: str) -> str:
    if not site_auc:
        return '<p class="note">No per-site AUCs recorded.</p>'
    rows = [
        [_cell(site), *(_metric(aucs.get(c), f"{prefix}-site-{site}-auc-{c}") for c in classes),
         _metric(aucs.get("macro"), f"{prefix}-site-{site}-macro-auc")]
        for site, aucs in site_auc.items()
    ]
    return _table(["site", *(f"AUC {c}" for c in classes), "macro AUC"], rows, "Each site alone")


def _cross_site_section(matrix: Mapping[str, Any]) -> str:
    """The site x model macro-AUC matrix of cross-site validation, with a pooled row per model."""
    models = matrix.get("models", [])
    ids = ["global" if m["kind"] == "global" else f"local-{m['site']}" for m in models]
    header = ["site", *(f"global model (round {matrix.get('best-round')})" if m["kind"] == "global"
                        else f"local model of {m['site']}" for m in models)]

    def cell(value: Mapping[str, Any] | None, name: str) -> str:
        if value is None:
            return "<td>–</td>"
        if value.get("status", "scored") != "scored":
            return f'<td title="{_text(value.get("reason", ""))}">{_text(value["status"])}</td>'
        return _metric(value.get("macro_auc"), name, value.get("macro_auc_bound"))

    rows = [[_cell(site), *(cell(m["cells"][i], f"cross-site-{id_}-{site}") for m, id_ in zip(models, ids, strict=True))]
            for i, site in enumerate(matrix.get("sites", []))]
    rows.append([_cell("pooled"), *(cell(m.get("pooled"), f"cross-site-{id_}-pooled")
                                    for m, id_ in zip(models, ids, strict=True))])
    unscored = "; ".join(f"{item['site']}: {item['reason']}" for item in matrix.get("local-models-not-scored", []))
    return (
        "<h2>Cross-site validation on the sites' test parts</h2>"
        '<p class="note">Each site (row) scores the global model and every local-only model a site shares '
        "(column) on its test part: macro AUC ± its bound. A site's own AUC is shown only where it shares it; "
        "a site that does not evaluate its test part is shown as opted out.</p>"
        + _table(header, rows, "cross_site.json")
        + (f'<p class="note" id="local-models-not-scored">Local models not scored: {_text(unscored)}</p>'
           if unscored else "")
    )


def _confusion_table(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    rows = [[_cell(f"true {name}"), *(f'<td class="num">{_text(n)}</td>' for n in row)]
            for name, row in zip(classes, matrix, strict=False)]
    return _table(["", *(f"predicted {c}" for c in classes)], rows, "Confusion matrix (counts)")


def _rejections_section(config: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]],
                        final: Mapping[str, Any] | None) -> str:
    rejected = [(r.get("round"), kind, item)
                for r in rounds
                for kind, key in (("training update", "rejected-updates"), ("evaluation", "rejected-evaluations"))
                for item in r.get(key, [])]
    rejected += [("final (test)", "evaluation", item) for item in (final or {}).get("rejected-evaluations", [])]
    bounds = (f"An update is refused beyond {config.get('max-update-ratio', '?')}x the global model's norm, or, "
              f"with three or more updates, beyond {config.get('max-update-median-ratio', '?')}x the round's median "
              "update norm; every reply is checked for shapes, dtypes, finiteness and consistent counts "
              "(server/validation.py).")
    if not rejected:
        table = '<p id="rejected">None: every reply passed the server\'s checks.</p>'
    else:
        table = _table(["round", "reply", "node", "reason"],
                       [[_cell(rnd), _cell(kind), _cell(item.get("node")), _cell(item.get("reason"))]
                        for rnd, kind, item in rejected], "Rejected replies")
    return f"<h2>Rejected replies</h2><p class=\"note\">{_text(bounds)}</p>{table}"


# ------------------------------------------------------------------------------ an experiment


def experiment_report_html(files: ExperimentFiles) -> str:
    """The page of one experiment: the summary across seeds, then each seed's arms and curves."""
    body = [f"<h1>Experiment {_text(files.name)}</h1>"]
    if files.seed_summary:
        body += ["<h2>Across seeds</h2>",
                 ('<p class="note">Per arm over seeds: macro AUC mean ± sd with the t-based 95 % CI of the mean, '
                  f"each seed's own bootstrap 95 % CI beside it; 'AUC − {_text(files.seed_summary[0]['reference'])}' is "
                  "paired by seed (a CI that contains 0 resolves no difference). As summary.csv.</p>"),
                 _seed_summary_table(files.seed_summary)]
    for seed in files.seeds:
        prefix = seed.label or "arms"
        body.append(f"<h2>{_text(seed.label or 'Arms')}</h2>")
        arms = seed.results["arms"]
        for group in dict.fromkeys(arm["group"] for arm in arms):
            body += [f"<h3>{_text(group)}</h3>",
                     _arms_table([a for a in arms if a["group"] == group], f"{prefix}-{group}")]
            if group in seed.curves:
                body.append(_image(seed.curves[group], f"{group}: validation macro AUC per epoch of training"))
        body.append(f"<details><summary>Configuration ({_text(seed.label or 'results.json')})</summary>"
                    f"<pre>{_text(json.dumps(seed.results.get('config'), indent=1))}</pre></details>")
    return _page(f"pneumofed experiment {files.name}", body)


def _seed_summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    table = []
    for row in rows:
        name = f"{row['group']}-{row['arm']}-{row['name']}"
        difference = row.get("auc - reference")
        table.append([
            _cell(row["group"]), _cell(row["arm"]), _cell(row["name"]), _cell(row["seeds"]), _cell(row["test-rois"]),
            _metric(row.get("macro auc mean"), f"summary-{name}-macro-auc-mean", row.get("macro auc sd")),
            _interval(None if row.get("macro auc ci-low") is None else (row["macro auc ci-low"], row["macro auc ci-high"])),
            _cell(row.get("per-seed bootstrap ci") or "–"),
            _metric(row.get("macro recall mean"), sd=row.get("macro recall sd")),
            _metric(row.get("auc / reference")),
            _cell("–" if difference is None else f"{difference:+.3f}"),
            _interval(None if row.get("auc - reference ci-low") is None
                      else (row["auc - reference ci-low"], row["auc - reference ci-high"])),
        ])
    reference = rows[0]["reference"] if rows else "pooled"
    return _table(["group", "arm", "name", "seeds", "test ROIs", "macro AUC mean ± sd", "95 % CI of the mean",
                   "per-seed bootstrap 95 % CI", "macro recall mean ± sd", f"AUC / {reference}", f"AUC − {reference}",
                   "95 % CI"], table)


def _arms_table(arms: Sequence[Mapping[str, Any]], prefix: str) -> str:
    classes = [c["name"] for c in arms[0]["summary"]["per_class"]]
    rows = []
    for arm in arms:
        s = arm["summary"]
        metric = f"{prefix}-{arm['kind']}-{arm['name']}"
        bootstrap = s.get("auc-ci") or {}
        per_class = {c["name"]: c["auc"] for c in s["per_class"]}
        rows.append([
            _cell(arm["kind"]), _cell(arm["name"]), _cell(s["num-examples"]), _metric(s["accuracy"]),
            _metric(s["macro_precision"]), _metric(s["macro_recall"]), _metric(s["macro_f1"]),
            *(cell for c in classes for cell in (_metric(per_class.get(c), f"{metric}-auc-{c}"),
                                                  _interval(bootstrap.get(c)))),
            _metric(s["macro_auc"], f"{metric}-macro-auc"), _interval(s.get("macro-auc-ci")),
            f'<td class="num">{arm.get("wall_s", 0):.0f}</td>', f'<td class="num">{arm.get("peak_gib", 0):.2f}</td>',
        ])
    header = ["arm", "name", "test ROIs", "accuracy", "precision", "recall", "F1",
              *(h for c in classes for h in (f"AUC {c}", "95 % CI")), "macro AUC", "95 % CI", "wall s", "peak GiB"]
    return _table(header, rows, "Scored on the union of the sites' test parts; bootstrap 95 % CIs")
