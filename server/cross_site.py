"""Cross-site validation (NVIDIA FLARE's cross-site model evaluation), run after the final test
evaluation when run config `cross-site-validation` is set.

The server asks every site (a QUERY `local-model`) for the local-only model it shares (node config
`local-model`); a shared model is checked against the run's model, card and arrays, and refused
with a logged reason when it does not fit. Every site then scores, on its test part, the global
best model (with its own BatchNorm part under `fedbn`/`silobn`, as in the final evaluation) and
each accepted local model as it is (`whole-model`: the site's BatchNorm is never substituted).

The result is a site x model matrix of macro AUCs with a pooled row per model
(`cross_site.json`, a table in report.html). A site's own AUC appears only where it shares it
(`share-site-auc`); a site that refuses its test part (`evaluate-splits`) or fails is shown as
opted out, and a reply that fails the server's checks as rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from pydantic import ValidationError

from pneumofed.common.federation.audit import array_digest
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.encoding import encode_arrays
from pneumofed.common.federation.pooling import PooledEvaluation, pool_evaluations
from pneumofed.common.learning.modelfile import IncompatibleModelFile, ModelCard, require_compatible
from pneumofed.common.learning.state import floating_state
from pneumofed.server.outputs import RunDirectory
from pneumofed.server.validation import arrays_problem, as_numpy, evaluation_problem

log = logging.getLogger("pneumofed.server")

SCORED, NOT_SHARED, OPTED_OUT, REJECTED = "scored", "not shared", "opted out", "rejected"


@dataclass(frozen=True)
class CandidateModel:
    """A model every site scores: the global one, or the local-only model that `site` shares."""

    kind: str  # "global" or "local"
    site: str | None
    arrays: ArrayRecord


@dataclass(frozen=True)
class LocalModels:
    """What the sites answered when asked for their local-only models."""

    names: dict[int, str]  # node -> site name (from its reply)
    accepted: list[CandidateModel]
    not_shared: dict[int, str]  # node -> why no local model of it is scored (none shared, refused, no reply)


def cross_site_validation(grid: Grid, config: FederatedConfig, run: RunDirectory, best: ArrayRecord) -> None:
    """Score the global `best` model and every shared local model on every site's test part, and
    write the matrix to the run directory."""
    nodes = sorted(grid.get_node_ids())
    local = collect_local_models(grid, nodes, config)
    candidates = [CandidateModel("global", None, best), *local.accepted]
    log.info("cross-site validation: %d model(s) on %d site(s)", len(candidates), len(nodes))
    statistics = config.batchnorm_statistics()
    encoded = [encode_arrays(c.arrays, config.update_encoding, statistics=statistics) for c in candidates]
    # Before any is sent: which models go to every site, as they travel (why a site's local model
    # is not among them is in cross_site.json).
    run.audit("cross-site-validation", participants=nodes, details={
        "models": [{"kind": c.kind, "site": c.site, "sha256": array_digest(arrays)}
                   for c, arrays in zip(candidates, encoded, strict=True)],
    })
    columns = []
    names = dict(local.names)
    for candidate, arrays in zip(candidates, encoded, strict=True):
        replies = _evaluate_everywhere(grid, nodes, candidate, arrays, config)
        for node, reply in replies.items():  # a site whose QUERY failed still names itself here
            site = None if reply.has_error() else reply.content.config_records.get("site")
            if node not in names and site is not None and "name" in site:
                names[node] = str(site["name"])
        columns.append((candidate, replies))
    rows = [names.get(node, f"node-{node}") for node in nodes]
    models = [_column(candidate, replies, nodes, rows, config.classes) for candidate, replies in columns]
    not_scored = [{"site": names.get(node, f"node-{node}"), "reason": reason} for node, reason in local.not_shared.items()]
    run.write_cross_site({"split": "test", "best-round": run.best_round, "sites": rows, "models": models,
                          "local-models-not-scored": not_scored})


def collect_local_models(grid: Grid, nodes: Sequence[int], config: FederatedConfig) -> LocalModels:
    """Ask `nodes` for the local-only models they share; keep those that fit the run's model."""
    query = RecordDict({"config": ConfigRecord({"query": "local-model", "server-round": config.num_server_rounds})})
    replies = grid.send_and_receive([Message(query, node, MessageType.QUERY) for node in nodes],
                                    timeout=config.round_timeout)
    reference = floating_state(config.build_model())
    names, accepted = {}, []
    not_shared = dict.fromkeys(nodes, "no reply within round-timeout")
    for reply in sorted(replies, key=lambda reply: reply.metadata.src_node_id):
        node = reply.metadata.src_node_id
        site = None if reply.has_error() else reply.content.config_records.get("site")
        if site is not None and "name" in site:
            names[node] = str(site["name"])
        name = names.get(node, f"node-{node}")
        if reply.has_error():
            reason = f"the node replied with an error: {reply.error.reason}"
        elif site is None or not site.get("shares-local-model", False):
            reason = "the site shares no local model"
        elif (reason := local_model_problem(reply.content, name, config, reference)) is None:
            accepted.append(CandidateModel("local", name, next(iter(reply.content.array_records.values()))))
            del not_shared[node]
            continue
        else:
            log.warning("cross-site validation: refusing the local model of %s: %s", name, reason)
        not_shared[node] = reason
    return LocalModels(names, accepted, not_shared)


def local_model_problem(
    content: RecordDict, site: str, config: FederatedConfig, reference: Mapping[str, Any]
) -> str | None:
    """Why the local model in `content` cannot be scored as a model of this run, or None: its card
    must match the run's model, width, classes (in order) and ROI size, and its arrays be exactly
    the floating-point state of such a model (`reference`), finite, with positive BatchNorm variances."""
    if len(content.array_records) != 1 or "card" not in content.config_records:
        return "expected one ArrayRecord and the model's card"
    card_fields = content.config_records["card"]
    try:
        card = ModelCard.model_validate({key.replace("-", "_"): value for key, value in card_fields.items()})
        require_compatible(card, f"the local model of {site}", model=config.model, width=config.model_width,
                           class_names=config.classes, roi_size=config.roi_size, norm_layer=config.norm_layer, fixes={})
    except ValidationError as error:
        return "its card is malformed: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    except IncompatibleModelFile as error:
        return str(error)
    try:
        values = as_numpy(next(iter(content.array_records.values())))
    except ValueError as error:
        return str(error)
    if set(values) != set(reference):
        missing, unexpected = sorted(set(reference) - set(values)), sorted(set(values) - set(reference))
        return f"its arrays are not the run model's tensors: missing {missing[:3]}, unexpected {unexpected[:3]}"
    variances = {name for name in config.batchnorm_statistics() if name.endswith("running_var")}
    return arrays_problem({name: tensor.numpy() for name, tensor in reference.items()}, values, variances)


def _evaluate_everywhere(grid: Grid, nodes: Sequence[int], candidate: CandidateModel, arrays: ArrayRecord,
                         config: FederatedConfig) -> dict[int, Message]:
    """Every node's reply to an EVALUATE of `candidate`, sent as `arrays` (encoded), on its test part, by node."""
    instruction = ConfigRecord({"split": "test", "server-round": config.num_server_rounds,
                                "whole-model": candidate.kind == "local"})
    messages = [Message(RecordDict({"arrays": arrays, "config": instruction}), node, MessageType.EVALUATE)
                for node in nodes]
    return {reply.metadata.src_node_id: reply
            for reply in grid.send_and_receive(messages, timeout=config.round_timeout)}


def _column(candidate: CandidateModel, replies: Mapping[int, Message], nodes: Sequence[int], rows: Sequence[str],
            class_names: list[str]) -> dict[str, Any]:
    """One model's cells, a site per row, and its pooled AUC over the sites' sound replies."""
    label = "the global model" if candidate.kind == "global" else f"the local model of {candidate.site}"
    cells, sound = [], []
    for node, row in zip(nodes, rows, strict=True):
        reply = replies.get(node)
        if reply is None:
            cell = {"status": OPTED_OUT, "reason": "no reply within round-timeout"}
        elif reply.has_error():
            cell = {"status": OPTED_OUT, "reason": f"the node replied with an error: {reply.error.reason}"}
        elif (problem := evaluation_problem(reply.content, len(class_names))) is not None:
            cell = {"status": REJECTED, "reason": problem}
        else:
            sound.append(reply)
            cell = _site_cell(reply, row, class_names)
        if cell["status"] in (OPTED_OUT, REJECTED):
            log.warning("cross-site validation: %s on %s: %s (%s)", label, row, cell["status"], cell["reason"])
        cells.append(cell)
    pooled = None
    if sound:
        evaluation = pool_evaluations([reply.content for reply in sound], [f"node-{r.metadata.src_node_id}" for r in sound],
                                      class_names, [False] * len(sound))
        pooled = _auc(evaluation) | {"sites": len(sound)}
    return {"kind": candidate.kind, "site": candidate.site, "cells": cells, "pooled": pooled}


def _site_cell(reply: Message, row: str, class_names: list[str]) -> dict[str, Any]:
    site = reply.content.config_records.get("site")
    if not (site and site.get("share-site-auc", False)):
        return {"status": NOT_SHARED}
    return {"status": SCORED} | _auc(pool_evaluations([reply.content], [row], class_names, [True]))


def _auc(evaluation: PooledEvaluation) -> dict[str, Any]:
    return {"macro_auc": evaluation.report.macro_auc, "macro_auc_bound": evaluation.report.macro_auc_bound,
            "num-examples": evaluation.num_examples}
