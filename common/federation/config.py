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
from pneumofed.common.learning.models import DP_SGD_MODELS, MODEL_NAMES, NormLayer, build_model

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
    # --- privacy (docs/privacy.md)
    # Patient-level DP-SGD at every site (Opacus; 0 = off): the epsilon, at dp-delta, that a site's
    # training reaches after all rounds, from which each site derives its own noise.
    dp_target_epsilon: float = Field(0.0, ge=0, alias="dp-target-epsilon")
    dp_delta: float = Field(1e-5, gt=0, lt=1, alias="dp-delta")
    # Each ROI's gradient is clipped to this L2 norm (one ROI per drawn patient and step: docs/privacy.md).
    dp_max_grad_norm: float = Field(1.0, gt=0, alias="dp-max-grad-norm")
    # Normalisation layers: batch (BatchNorm) or group (GroupNorm, which DP-SGD needs: BatchNorm mixes
    # samples). Under group there is no BatchNorm, so bn-mode must be shared.
    norm_layer: NormLayer = Field("batch", alias="norm-layer")
    # Site-level DP with Flower's wrappers around the strategy (off, or where the clipping happens).
    site_dp: Literal["off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive"] = Field(
        "off", alias="site-dp")
    # Gaussian noise on the aggregate: its sd is noise-multiplier x clipping-norm / sampled sites.
    site_dp_noise_multiplier: float = Field(1.0, ge=0, alias="site-dp-noise-multiplier")
    # The bound on each site's update norm (adaptive clipping: its starting value).
    site_dp_clipping_norm: float = Field(1.0, gt=0, alias="site-dp-clipping-norm")
    # Fixed clipping is accounted (Flower's RDP accountant): epsilon reported at this delta, and the
    # run stops training before a round would take it above site-dp-max-epsilon (0 = no limit).
    site_dp_delta: float = Field(1e-5, gt=0, lt=1, alias="site-dp-delta")
    site_dp_max_epsilon: float = Field(0.0, ge=0, alias="site-dp-max-epsilon")
    # Flower's SecAgg+: the server sees only the sum of the sites' updates, never one in clear (needs
    # min-nodes >= 3, strategy fedavg/fedprox/fedadam/fedavgm, update-encoding fp32; docs/privacy.md).
    secure_aggregation: bool = Field(False, alias="secure-aggregation")
    # --- results
    # After the final test evaluation, every site scores the global model and the local-only models
    # that sites share (a site x model AUC matrix in the report).
    cross_site_validation: bool = Field(False, alias="cross-site-validation")
    # Log config, per-round metrics, plots and the best model to MLflow ("" tracking URI = a local
    # SQLite store beside the run directories).
    mlflow: bool = False
    mlflow_tracking_uri: str = Field("", alias="mlflow-tracking-uri")
    seed: int = 0
    sites: str = ""
    # The local-only model file each simulated site shares for cross-site validation, aligned with
    # `sites` ("" for a site that shares none; simulation only: a real site sets node config local-model).
    local_models: str = Field("", alias="local-models")
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

    @model_validator(mode="after")
    def _dp_sgd_is_sound(self) -> FederatedConfig:
        if self.norm_layer == "group" and self.bn_mode != "shared":
            raise ValueError(f"bn-mode={self.bn_mode} keeps BatchNorm at the sites, and norm-layer=group has none: "
                             "set bn-mode=shared")
        if self.dp_target_epsilon == 0:
            return self
        if self.norm_layer != "group":
            raise ValueError("dp-target-epsilon > 0 (DP-SGD) needs norm-layer=group: BatchNorm mixes the samples "
                             "of a batch, so no ROI has a gradient of its own to clip")
        if self.model not in DP_SGD_MODELS:
            raise ValueError(f"DP-SGD (dp-target-epsilon > 0) supports model {' and '.join(DP_SGD_MODELS)}, not "
                             f"{self.model}: torchvision's {self.model} changes normalisation outputs in place, "
                             "which Opacus' per-sample gradients cannot follow")
        if self.strategy == "fedprox":
            raise ValueError("DP-SGD (dp-target-epsilon > 0) clips per-sample gradients, and FedProx's proximal "
                             "term is not one: use another strategy")
        if self.resume:
            raise ValueError("a DP-SGD run (dp-target-epsilon > 0) cannot be resumed: each site's privacy "
                             "accountant lives in its Flower context, which a resumed run does not get back")
        return self

    @model_validator(mode="after")
    def _local_models_fit_the_sites(self) -> FederatedConfig:
        if self.local_models and len(self.local_model_paths) != len(self.site_paths):
            raise ValueError(f"local-models lists {len(self.local_model_paths)} entries for {len(self.site_paths)} "
                             "sites: give one per site, empty for a site that shares none")
        for model in filter(None, self.local_model_paths):
            if not Path(model).is_absolute():
                raise ValueError(f"every entry of local-models must be an absolute path, got {model!r}")
        return self

    @model_validator(mode="after")
    def _site_dp_is_sound(self) -> FederatedConfig:
        if self.site_dp == "off":
            return self
        if self.strategy not in ("fedavg", "fedprox"):
            raise ValueError(f"site-dp={self.site_dp} needs FedAvg's aggregation (strategy fedavg or fedprox), "
                             f"not {self.strategy}: the noise is calibrated to a plain average of clipped updates")
        if self.norm_layer == "batch" and self.bn_mode == "shared":
            raise ValueError(f"site-dp={self.site_dp} cannot send BatchNorm statistics, which no clipping bounds "
                             "and noise could make negative: set bn-mode=fedbn or silobn (or norm-layer=group)")
        if self.site_dp.startswith("client") and self.update_encoding == "int8":
            raise ValueError(f"site-dp={self.site_dp} clips the reply against the model received, which an "
                             "int8 reply (an update) is not: use update-encoding fp32 or fp16, or server-side clipping")
        if self.site_dp.endswith("fixed") and self.site_dp_noise_multiplier <= 0:
            raise ValueError("site-dp with fixed clipping is accounted and needs site-dp-noise-multiplier > 0")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_is_servable(self) -> FederatedConfig:
        # SecAgg+ (server/secure_aggregation.py) shows the server the sites' weighted sum and nothing else.
        if not self.secure_aggregation:
            return self
        if self.strategy in ("fedmedian", "fedtrimmedavg", "krum"):
            raise ValueError(f"strategy={self.strategy} needs every site's update, and secure-aggregation shows the "
                             "server only their sum: use fedavg, fedprox, fedadam or fedavgm")
        if self.update_encoding != "fp32":
            raise ValueError(f"secure-aggregation quantises the sites' updates itself (SecAgg+): set update-encoding "
                             f"fp32, not {self.update_encoding}")
        if self.site_dp != "off":
            raise ValueError(f"site-dp={self.site_dp} with secure-aggregation is not supported: site-level DP weighs "
                             "every site's clipped update equally (server-side clipping needs each update), SecAgg+ "
                             "weighs them by num-examples")
        if self.min_nodes < 3:
            raise ValueError(f"secure-aggregation needs min-nodes of at least 3, got {self.min_nodes}: with two sites "
                             "each could read the other's update off the global model, and one dropout stops a round")
        if 0 < len(self.site_paths) < self.min_nodes:
            raise ValueError(f"secure-aggregation with min-nodes={self.min_nodes} needs as many sites, "
                             f"the run lists {len(self.site_paths)}")
        return self

    @property
    def classes(self) -> list[str]:
        return [name.strip() for name in self.class_names.split(",") if name.strip()]

    @property
    def site_paths(self) -> list[Path]:
        """ROI stores of the simulated sites, in partition order (simulation only)."""
        return [Path(part) for part in self.sites.split(",") if part.strip()]

    @property
    def local_model_paths(self) -> list[str]:
        """Per simulated site, in partition order, its shared local model file ("" = none)."""
        return [part.strip() for part in self.local_models.split(",")] if self.local_models else []

    def build_model(self) -> nn.Module:
        """A freshly initialised network of the run's architecture, width and classes (1-channel ROIs)."""
        return build_model(self.model, len(self.classes), in_channels=1, width=self.model_width,
                           norm_layer=self.norm_layer)

    def batchnorm_statistics(self) -> frozenset[str]:
        """Names of the model's BatchNorm running statistics, without building a model per message."""
        return _batchnorm_statistics(self.model, len(self.classes), self.model_width, self.norm_layer)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederatedConfig:
        return cls.model_validate(dict(run_config))

    def to_run_config(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


@lru_cache
def _batchnorm_statistics(model: str, num_classes: int, width: float, norm_layer: NormLayer) -> frozenset[str]:
    return batchnorm_names(build_model(model, num_classes, in_channels=1, width=width, norm_layer=norm_layer)).statistics
