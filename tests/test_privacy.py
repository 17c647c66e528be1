"""Patient-level DP-SGD at the sites: GroupNorm models, each site's accountant and budget, and the
records of every site's privacy spend."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from pydantic import ValidationError
from test_federated import RecordingGrid, run_config
from torch import nn
from torch.utils.data import TensorDataset

from pneumofed.client.app import PRIVACY_ACCOUNTANT, train_locally
from pneumofed.common.data.site import load_site
from pneumofed.common.federation.audit import append_reply_audit, read_audit
from pneumofed.common.federation.config import FederatedConfig
from pneumofed.common.federation.site_policy import PrivacyBudget
from pneumofed.common.learning import training
from pneumofed.common.learning.models import DP_SGD_MODELS, MODEL_NAMES, build_model
from pneumofed.common.learning.privacy import (
    DPSGD,
    PatientPoissonSampler,
    PrivacyAccount,
    PrivacyPlan,
    steps_epsilon,
)
from pneumofed.server.outputs import RunDirectory
from pneumofed.server.rounds import initial_arrays, run_federation

DP_RUN = {"norm-layer": "group", "dp-target-epsilon": 4.0, "num-server-rounds": 2, "batch-size": 8, "augment": False}


def _fresh_process(state: RecordDict) -> RecordDict:
    """What a new ClientApp process receives: the context state as it crossed the process boundary."""
    return recorddict_from_proto(recorddict_to_proto(state))


def _plan_of(site, config: FederatedConfig) -> PrivacyPlan:
    return PrivacyPlan.for_site(target_epsilon=config.dp_target_epsilon, delta=config.dp_delta,
                                max_grad_norm=config.dp_max_grad_norm, batch_size=config.batch_size,
                                patients=len(set(load_site(site, config.seed).train.patient_keys)),
                                epochs=config.num_server_rounds * config.local_epochs)


def test_a_site_reaches_its_target_epsilon_after_the_last_round_with_its_accountant_kept_across_processes(
        synthetic_sites, tmp_path):
    config_dict = run_config(tmp_path, **DP_RUN)
    config = FederatedConfig.from_run_config(config_dict)
    node = {"data-path": str(synthetic_sites[0])}
    state, arrays, epsilons = RecordDict(), initial_arrays(config), []
    site_log = tmp_path / "site-audit.jsonl"
    for server_round in (1, 2):
        reply = train_locally(arrays, ConfigRecord({"server-round": server_round}), config_dict, node, state)
        metrics = reply["metrics"]
        epsilons.append(metrics["dp-epsilon"])
        assert metrics["dp-delta"] == config.dp_delta
        assert metrics["dp-round-epsilon"] == pytest.approx(epsilons[0])  # every round spends alike
        assert "train-loss" not in metrics and "train-accuracy" not in metrics  # noiseless, so not sent
        # The site's own audit log (what its ClientApp appends per reply) holds the spend itself.
        entry = append_reply_audit(site_log, run_id=7, server_round=server_round, kind="train", content=reply)
        assert entry["privacy"] == {key: metrics[key] for key in ("dp-epsilon", "dp-round-epsilon", "dp-delta")}
        state, arrays = _fresh_process(state), reply["arrays"]
    assert [entry["privacy"]["dp-epsilon"] for entry in read_audit(site_log)[1:]] == epsilons

    assert 0 < epsilons[0] < epsilons[1]
    assert config.dp_target_epsilon * 0.95 <= epsilons[1] <= config.dp_target_epsilon
    # The second round continued the first round's accountant: twice its steps, under one plan.
    ((noise, rate, steps),) = PrivacyAccount.from_record(state[PRIVACY_ACCOUNTANT]).accountant.history
    plan = _plan_of(synthetic_sites[0], config)
    assert (noise, rate, steps) == (plan.noise_multiplier, plan.sample_rate, 2 * plan.steps_per_epoch)


def test_every_sites_epsilon_is_recorded_and_a_site_over_its_budget_refuses_while_the_round_goes_on(
        synthetic_sites, tmp_path, flower_identity):
    sites = synthetic_sites[:2]
    config_dict = run_config(tmp_path, **DP_RUN)
    config = FederatedConfig.from_run_config(config_dict)
    grid = RecordingGrid(sites, config_dict)
    spender, capped = grid.get_node_ids()
    plan = _plan_of(sites[1], config)
    after_one_round = steps_epsilon(plan, plan.steps_per_epoch)
    budget = (after_one_round + steps_epsilon(plan, 2 * plan.steps_per_epoch)) / 2  # enough for one round only
    grid.node_configs[capped]["dp-epsilon-budget"] = budget
    run = RunDirectory.open(config, flower_run_id=1)
    run_federation(grid, config, run)

    history = json.loads((run.path / "metrics.json").read_text())
    assert set(history[0]["dp-sgd"]) == {str(spender), str(capped)}
    assert set(history[1]["dp-sgd"]) == {str(spender)}  # the capped site trained no second round
    assert "dp-epsilon" not in history[0]  # no average of the sites' spends
    assert history[0]["dp-sgd"][str(capped)]["dp-epsilon"] == pytest.approx(after_one_round)
    spender_epsilons = [record["dp-sgd"][str(spender)]["dp-epsilon"] for record in history]
    assert spender_epsilons[0] < spender_epsilons[1] <= config.dp_target_epsilon
    refusals = [reply.error.reason for reply in grid.replies if reply.has_error()]
    assert len(refusals) == 1 and "privacy budget spent: epsilon" in refusals[0] and f"of {budget:g}" in refusals[0]
    assert (run.path / "models" / "round-002.pt").is_file()  # the round completed with the other site

    rounds = [entry for entry in read_audit(run.path / "audit.jsonl") if entry["event"] == "round"]
    assert rounds[1]["details"]["dp-epsilon"] == {str(spender): spender_epsilons[1]}
    assert rounds[1]["participants"] == [str(spender)]
    page = (run.path / "report.html").read_text()
    assert f'data-metric="dp-epsilon-{spender}" data-value="{json.dumps(spender_epsilons[1])}"' in page
    assert "DP-SGD at every site (patient-level): target epsilon 4.0" in page


def test_the_budget_refuses_a_round_that_would_exceed_it_and_defaults_to_the_run_target():
    PrivacyBudget.from_node_config({}).check(epsilon_after=3.99, target_epsilon=4.0)
    with pytest.raises(PermissionError, match=r"privacy budget spent: epsilon 4\.010 of 4 "):
        PrivacyBudget.from_node_config({}).check(epsilon_after=4.01, target_epsilon=4.0)
    with pytest.raises(PermissionError, match=r"epsilon 2\.500 of 2 "):
        PrivacyBudget.from_node_config({"dp-epsilon-budget": 2.0}).check(epsilon_after=2.5, target_epsilon=4.0)
    with pytest.raises(ValidationError, match="greater than 0"):
        PrivacyBudget.from_node_config({"dp-epsilon-budget": -1})


@pytest.mark.parametrize(("settings", "message"), [
    ({"dp-target-epsilon": 1.0}, "needs norm-layer=group"),
    ({"dp-target-epsilon": 1.0, "norm-layer": "group", "model": "resnet50"}, "supports model shufflenet_v2_eca"),
    ({"dp-target-epsilon": 1.0, "norm-layer": "group", "strategy": "fedprox"}, "proximal term"),
    ({"dp-target-epsilon": 1.0, "norm-layer": "group", "resume": True}, "cannot be resumed"),
    ({"norm-layer": "group", "bn-mode": "fedbn"}, "set bn-mode=shared"),
])
def test_settings_dp_sgd_cannot_honour_are_refused_at_config_time(settings, message):
    with pytest.raises(ValidationError, match=message):
        FederatedConfig.model_validate(settings)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_group_norm_builds_every_registry_model_without_batchnorm(name):
    model = build_model(name, 3, in_channels=1, width=0.5 if name.startswith("shufflenet") else 1.0, norm_layer="group")
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    assert any(isinstance(module, nn.GroupNorm) for module in model.modules())
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    assert FederatedConfig.model_validate({"model": name, "norm-layer": "group"}).batchnorm_statistics() == frozenset()
    # What the config refuses, Opacus' per-sample gradients cannot do (even with every ReLU module
    # made out-of-place, as DP-SGD makes them); what it accepts, they can.
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    private = GradSampleModule(model)
    if name in DP_SGD_MODELS:
        private(torch.rand(2, 1, 32, 32)).sum().backward()
        assert all(p.grad_sample.shape[0] == 2 for p in model.parameters())
    else:
        with pytest.raises(RuntimeError, match="modified inplace"):
            private(torch.rand(2, 1, 32, 32)).sum().backward()


def _tiny_data(n: int = 24) -> tuple[TensorDataset, list[str]]:
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.rand(n, 1, 32, 32, generator=generator), torch.randint(0, 3, (n,), generator=generator))
    return dataset, [f"patient-{i // 2}" for i in range(n)]  # two ROIs per patient


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("shufflenet_v2_eca", 3, width=0.5, norm_layer="group")


def _moved(dp: DPSGD | None) -> float:
    model, (dataset, _) = _tiny_model(), _tiny_data()
    start = [p.detach().clone() for p in model.parameters()]
    training.train(model, dataset, training.TrainConfig(epochs=1, batch_size=4, learning_rate=1e-2, progress=False),
                   class_weights=[1.0, 2.0, 0.5], dp=dp)
    return max(float((p.detach() - s).abs().max()) for p, s in zip(model.parameters(), start, strict=True))


def test_training_clips_every_per_sample_gradient():
    keys = _tiny_data()[1]
    # Per-sample gradients clipped to (next to) nothing, and no noise: the model must stay where it is.
    clipped_away = PrivacyPlan(noise_multiplier=0.0, max_grad_norm=1e-12, sample_rate=0.5, steps_per_epoch=2, delta=1e-5)
    assert _moved(None) > 1e-3
    assert _moved(DPSGD(clipped_away, keys, PrivacyAccount())) < 1e-5


def test_the_optimiser_sums_each_samples_clipped_gradient_with_noise_from_no_known_seed():
    dataset, keys = _tiny_data(8)
    images, _ = dataset.tensors
    plan = PrivacyPlan(noise_multiplier=0.0, max_grad_norm=0.01, sample_rate=1.0, steps_per_epoch=1, delta=1e-5)
    model = _tiny_model()
    private_model, optimizer = DPSGD(plan, keys, PrivacyAccount()).make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0))
    assert isinstance(private_model, GradSampleModule) and isinstance(optimizer, DPOptimizer)
    private_model(images).sum().backward()
    optimizer.step()
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    # Eight ROIs' gradients, each clipped to 0.01, summed and divided by the expected batch of four patients.
    assert 0 < float(total) <= 8 * plan.max_grad_norm / 4 + 1e-6

    noisy = PrivacyPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps_per_epoch=2, delta=1e-5)
    runs = []
    for _ in range(2):  # the same run seed: without DP two trainings are bitwise equal
        model = _tiny_model()
        training.train(model, dataset, training.TrainConfig(epochs=1, batch_size=4, progress=False),
                       dp=DPSGD(noisy, keys, PrivacyAccount()))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(*runs)


def test_poisson_batches_hold_at_most_one_roi_per_patient_and_empty_batches_are_steps():
    dataset, keys = _tiny_data()
    sampler = PatientPoissonSampler(keys, sample_rate=0.5, steps=50, generator=torch.Generator().manual_seed(1))
    batches = list(sampler)
    assert len(batches) == 50
    assert all(len({keys[i] for i in batch}) == len(batch) for batch in batches)
    assert {i for batch in batches for i in batch} == set(range(len(keys)))  # every ROI can be drawn

    rare = PrivacyPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01, steps_per_epoch=3, delta=1e-5)
    account = PrivacyAccount()
    history = training.train(_tiny_model(), dataset, training.TrainConfig(epochs=2, batch_size=4, progress=False),
                             dp=DPSGD(rare, keys, account))
    assert account.accountant.history == [(1.0, 0.01, 6)]  # every step counted, empty or not
    assert all(loss >= 0 for loss in history.loss)
