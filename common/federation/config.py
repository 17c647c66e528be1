"""The federated run configuration, validated once where it enters (Flower's run config)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

from pneumofed.common.federation.encoding import UpdateEncoding
from pneumofed.common.federation.exchange import BatchNormMode
from pneumofed.common.learning.batchnorm import batchnorm_names
from pneumofed.common.learning.models import MODEL_NAMES, build_model

StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedavgm", "fedmedian", "fedtrimmedavg", "krum"]


# Named sets of run-config values. `seed`: Dong et al. 2022 (Adam 1e-4, batch 16, 30 epochs), as
# 15 rounds of 2 local epochs.
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {"learning-rate": 1e-4, "batch-size": 16, "num-server-rounds": 15, "local-epochs": 2},
}


class FederatedConfig(BaseModel):
    """Typed view of the run configuration (with `flwr run --run-config` overrides) and the one place
    for its defaults: the generated Flower app's `[tool.flwr.app.config]` is written from them.

    Keys keep Flower's hyphenated spelling on the wire; attributes use underscores.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    num_server_rounds: int = Field(5, ge=1, alias="num-server-rounds")
    local_epochs: int = Field(2, ge=1, alias="local-epochs")
    strategy: StrategyName = "fedavg"
    model: str = "shufflenet_v2_eca"
    class_names: str = Field("nodule,interstitial,emphysema", alias="class-names")
    roi_size: int = Field(64, ge=16, alias="roi-size")
    model_width: float = Field(1.0, alias="model-width")
    batch_size: int = Field(16, ge=1, alias="batch-size")
    learning_rate: float = Field(1e-3, gt=0, alias="learning-rate")
    # Balanced class weights from the federation-wide class counts, the same at every site.
    class_weighting: bool = Field(True, alias="class-weighting")
    bn_mode: BatchNormMode = Field("shared", alias="bn-mode")
    # How the model travels, both ways: fp32, fp16 (1/2 the bytes) or int8 (about 1/4: sites send their
    # update, BatchNorm statistics go as fp16; see common/federation/encoding.py).
    update_encoding: UpdateEncoding = Field("fp32", alias="update-encoding")
    # Each site continues its own Adam moments from round to round (kept in its context.state, so a
    # resumed run, which Flower gives a new context, starts them afresh). Off until measured.
    keep_optimizer_state: bool = Field(False, alias="keep-optimizer-state")
    augment: bool = True
    fraction_train: float = Field(1.0, gt=0, le=1, alias="fraction-train")
    fraction_evaluate: float = Field(1.0, gt=0, le=1, alias="fraction-evaluate")
    min_nodes: int = Field(1, ge=1, alias="min-nodes")
    proximal_mu: float = Field(0.01, ge=0, alias="proximal-mu")
    server_learning_rate: float = Field(1e-3, gt=0, alias="server-learning-rate")
    server_momentum: float = Field(0.9, ge=0, lt=1, alias="server-momentum")
    trim_beta: float = Field(0.2, gt=0, lt=0.5, alias="trim-beta")
    krum_malicious: int = Field(0, ge=0, alias="krum-malicious")
    max_update_ratio: float = Field(10.0, gt=0, alias="max-update-ratio")
    # With three or more updates in a round, one above this multiple of the round's median norm is refused.
    max_update_median_ratio: float = Field(10.0, gt=1, alias="max-update-median-ratio")
    seed: int = 0
    sites: str = ""
    run_dir: str = Field("", alias="run-dir")
    # A pneumofed model file the first global model is taken from ("" = seeded random initialisation);
    # its card must match model, model-width, class-names and roi-size. A resumed run ignores it.
    init_model: str = Field("", alias="init-model")
    resume: bool = False
    round_timeout: float = Field(3600.0, gt=0, alias="round-timeout")

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
        return name

    @field_validator("run_dir", "init_model")
    @classmethod
    def _absolute_path(cls, path: str, info: ValidationInfo) -> str:
        # Each Flower message may run in a fresh process with another working directory.
        if path and not Path(path).is_absolute():
            raise ValueError(f"{info.field_name.replace('_', '-')} must be an absolute path, got {path!r}")
        return path

    @model_validator(mode="after")
    def _sites_are_absolute(self) -> FederatedConfig:
        for site in self.site_paths:
            if not site.is_absolute():
                raise ValueError(f"every entry of sites must be an absolute path, got {str(site)!r}")
        return self

    @property
    def classes(self) -> list[str]:
        return [name.strip() for name in self.class_names.split(",") if name.strip()]

    @property
    def site_paths(self) -> list[Path]:
        """ROI stores of the simulated sites, in partition order (simulation only)."""
        return [Path(part) for part in self.sites.split(",") if part.strip()]

    def build_model(self) -> nn.Module:
        """A freshly initialised network of the run's architecture, width and classes (1-channel ROIs)."""
        return build_model(self.model, len(self.classes), in_channels=1, width=self.model_width)

    def batchnorm_statistics(self) -> frozenset[str]:
        """Names of the model's BatchNorm running statistics, without building a model per message."""
        return _batchnorm_statistics(self.model, len(self.classes), self.model_width)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederatedConfig:
        return cls.model_validate(dict(run_config))

    def to_run_config(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


@lru_cache
def _batchnorm_statistics(model: str, num_classes: int, width: float) -> frozenset[str]:
    return batchnorm_names(build_model(model, num_classes, in_channels=1, width=width)).statistics
