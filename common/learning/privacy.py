"""Patient-level differential privacy of a site's local training: DP-SGD (Abadi et al. 2016) with Opacus.

The unit of privacy is the patient: every step draws each patient of the training part
independently with probability `sample_rate` (Poisson sampling over patients) and takes one of
the drawn patient's ROIs, chosen at random; Opacus clips every ROI's gradient to `max_grad_norm`
and adds Gaussian noise of `noise_multiplier * max_grad_norm` to their sum. One patient thus moves
a step's summed gradient by at most `max_grad_norm`, however many ROIs they have, and the RDP
accountant's (epsilon, delta) holds for adding or removing one patient with all their ROIs.
"Epoch" means as many steps as patients are drawn once each in expectation (`steps_per_epoch`).

A site plans its noise once for the whole run (`PrivacyPlan.for_site`): from the run's target
epsilon and delta, its own sample rate and the number of steps all rounds take, Opacus'
`get_noise_multiplier` finds the noise with which the accountant reaches the target, never more,
after the last round. The accountant's history (`PrivacyAccount`) is kept by the site between
rounds as plain numbers.

The noise and the patient draws come from generators seeded from the operating system's
randomness, never from the run's seed: the server knows that seed and could otherwise replay the
noise. A DP run is therefore not bitwise reproducible.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import wrap_collate_with_empty
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


@dataclass(frozen=True)
class PrivacyPlan:
    """A site's DP-SGD settings for a whole run, fixed by the run's settings and its training part."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # probability that a patient is drawn in a step
    steps_per_epoch: int
    delta: float

    @classmethod
    def for_site(
        cls, *, target_epsilon: float, delta: float, max_grad_norm: float, batch_size: int, patients: int, epochs: int
    ) -> PrivacyPlan:
        """The noise with which `epochs` epochs over `patients` patients, `batch_size` drawn per step
        in expectation, reach `target_epsilon` at `delta` (within Opacus' tolerance of 0.01 below)."""
        if patients < 1:
            raise ValueError("DP-SGD needs at least one patient in the training part")
        steps_per_epoch = math.ceil(patients / batch_size)
        sample_rate = 1 / steps_per_epoch
        noise = _noise_multiplier(target_epsilon, delta, sample_rate, epochs * steps_per_epoch)
        return cls(noise, max_grad_norm, sample_rate, steps_per_epoch, delta)


@lru_cache(maxsize=256)  # seconds of bisection, the same every round of a run
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                steps=steps, accountant="rdp")


@dataclass
class PrivacyAccount:
    """A site's RDP accountant over all its training in a run, kept between rounds as plain numbers."""

    accountant: RDPAccountant = field(default_factory=RDPAccountant)

    @classmethod
    def from_record(cls, record: Mapping[str, Sequence[float | int]] | None) -> PrivacyAccount:
        account = cls()
        if record:
            account.accountant.history = [
                (float(noise), float(rate), int(steps))
                for noise, rate, steps in zip(record["noise-multipliers"], record["sample-rates"], record["steps"],
                                              strict=True)
            ]
        return account

    def to_record(self) -> dict[str, list[float] | list[int]]:
        history = self.accountant.history
        return {"noise-multipliers": [float(noise) for noise, _, _ in history],
                "sample-rates": [float(rate) for _, rate, _ in history],
                "steps": [int(steps) for _, _, steps in history]}

    def epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta)) if self.accountant.history else 0.0

    def epsilon_after(self, plan: PrivacyPlan, steps: int) -> float:
        """The epsilon this account would reach with `steps` more steps of `plan`."""
        return _epsilon([*self.accountant.history, (plan.noise_multiplier, plan.sample_rate, steps)], plan.delta)


def steps_epsilon(plan: PrivacyPlan, steps: int) -> float:
    """The epsilon of `steps` steps of `plan` alone (one round's spend, on its own)."""
    return _epsilon([(plan.noise_multiplier, plan.sample_rate, steps)], plan.delta)


def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta))


class PatientPoissonSampler(Sampler[list[int]]):
    """Batches of ROI indices: per step every patient with probability `sample_rate`, one random ROI
    of each patient drawn. A batch may be empty; it is a step all the same (noise only)."""

    def __init__(self, patient_keys: Sequence[str], sample_rate: float, steps: int, generator: torch.Generator) -> None:
        groups: dict[str, list[int]] = {}
        for index, key in enumerate(patient_keys):
            groups.setdefault(key, []).append(index)
        self.rois = [torch.tensor(indices) for indices in groups.values()]
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            drawn = torch.rand(len(self.rois), generator=self.generator) < self.sample_rate
            yield [int(self.rois[patient][torch.randint(len(self.rois[patient]), (1,), generator=self.generator)])
                   for patient in drawn.nonzero().flatten().tolist()]


@dataclass
class DPSGD:
    """One call of `training.train` under DP-SGD: the site's plan, its training ROIs' patients (in
    dataset order) and its account, which the optimiser's steps are added to."""

    plan: PrivacyPlan
    patient_keys: Sequence[str]
    account: PrivacyAccount

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(len(set(self.patient_keys)) * self.plan.sample_rate))

    def loader(self, dataset: Dataset, pin_memory: bool) -> DataLoader:
        """One epoch (`steps_per_epoch` patient-level Poisson batches) per pass over it."""
        if len(self.patient_keys) != len(dataset):
            raise ValueError(f"{len(self.patient_keys)} patient keys for {len(dataset)} training ROIs")
        sampler = PatientPoissonSampler(self.patient_keys, self.plan.sample_rate, self.plan.steps_per_epoch,
                                        _unpredictable_generator(torch.device("cpu")))
        image, _ = dataset[0]
        collate = wrap_collate_with_empty(collate_fn=default_collate, sample_empty_shapes=[(0, *image.shape), (0,)],
                                          dtypes=[image.dtype, torch.int64])
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, pin_memory=pin_memory)

    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[GradSampleModule, DPOptimizer]:
        """`model` computing per-sample gradients and `optimizer` clipping and noising them, each
        step recorded in the account; `release` returns `model` to plain use."""
        # Opacus' hooks observe each layer's output; an in-place activation would overwrite it.
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        ModuleValidator.validate(model.train(), strict=True)  # e.g. BatchNorm: not norm-layer=group
        device = next(model.parameters()).device
        private_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        private_optimizer = DPOptimizer(optimizer, noise_multiplier=self.plan.noise_multiplier,
                                        max_grad_norm=self.plan.max_grad_norm,
                                        expected_batch_size=self.expected_batch_size, loss_reduction="mean",
                                        generator=_unpredictable_generator(device))
        private_optimizer.attach_step_hook(self.account.accountant.get_optimizer_hook_fn(self.plan.sample_rate))
        return private_model, private_optimizer

    @staticmethod
    def release(private_model: GradSampleModule) -> None:
        private_model.cleanup()

    def round_epsilon(self, epochs: int) -> float:
        """The epsilon of `epochs` epochs of this plan alone (one round's spend, on its own)."""
        return steps_epsilon(self.plan, epochs * self.plan.steps_per_epoch)

    @staticmethod
    def loss(weights: torch.Tensor | None) -> nn.Module:
        return per_sample_cross_entropy(weights)


def per_sample_cross_entropy(weights: torch.Tensor | None) -> nn.Module:
    """Mean over the batch of each ROI's (class-weighted) cross-entropy. Unlike the weighted mean of
    `nn.CrossEntropyLoss`, which divides by the batch's summed weights, no ROI's loss depends on the
    rest of its batch, as DP-SGD's per-sample clipping requires; an empty batch gives 0."""
    return _PerSampleCrossEntropy(weights)


class _PerSampleCrossEntropy(nn.Module):
    def __init__(self, weights: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = nn.functional.cross_entropy(logits, targets, weight=self.weights, reduction="none")
        return losses.sum() / max(len(targets), 1)


def _unpredictable_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))
