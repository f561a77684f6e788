"""The job spec: one YAML file describes one deletion request end to end (pydantic-validated).

`retrack validate JOB.yaml` checks it; `retrack schema` prints its JSON schema. Every field is
documented here, and the shipped examples under `configs/` are loaded by the tests.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from retrack.config.hashing import recipe_hash
from retrack.config.model_kind import ModelKind
from retrack.config.train import MethodConfig, StrictModel, TrainConfig
from retrack.errors import InputError, describe_validation_error
from retrack.methods import method_class
from retrack.tuning.search import TuneSpec

# Ids become path components and run names: a strict alphabet rules out traversal ("../") by design.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _default(model: type, field: str):
    return model.model_fields[field].default


def check_safe_name(value: str, what: str) -> str:
    if not SAFE_NAME.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} must be 1-128 characters of letters, digits, '.', '_' or '-', not starting with a symbol and without '..'")
    return value


def _is_uri(value: str) -> bool:
    return value.startswith("s3://") or "://" not in value


def _expand(value: str) -> str:
    """`~` and `${VAR}` in local paths and URIs are expanded; s3:// URIs are left as written."""
    return value if value.startswith("s3://") else os.path.expandvars(os.path.expanduser(value))


def _local_or_s3(value: str) -> str:
    if not _is_uri(value):
        raise ValueError(f"unsupported URI scheme in {value!r}: use a local path or s3://")
    if value.startswith("s3://") and ".." in value[5:].split("/"):  # S3 keys are literal: '..' would not mean a parent
        raise ValueError(f"{value!r}: '..' is not allowed in an s3:// URI")
    return _expand(value)


class ModelSpec(StrictModel):
    """The model to unlearn from."""

    kind: ModelKind = Field(ModelKind.PIXEL_DDPM, description="pixel-ddpm: diffusers UNet2DModel + DDPMScheduler; stable-diffusion: a StableDiffusionPipeline directory.")
    uri: str = Field(..., description="Directory in diffusers layout (safetensors weights), a local path or s3://bucket/prefix.")
    registered_name: str | None = Field(None, description="MLflow registered model this model is a version of (defaults to mlflow.registered_model).")
    version: str | None = Field(None, description="The parent's MLflow model version, recorded in lineage.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _local_or_s3(v)


class CorpusSpec(StrictModel):
    """The training corpus the model was trained on."""

    uri: str = Field(..., description="Local path or s3://bucket/prefix holding the corpus.")
    format: Literal["parquet", "imagefolder", "webdataset"] = Field("parquet", description="parquet: shards of (id, image bytes[, caption][, label]); imagefolder: image files (id = path without extension) with captions in metadata.jsonl files, the Hugging Face convention; webdataset: tar shards of samples (id = key; image jpg|jpeg|png|webp; caption txt, or json caption|text).")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _local_or_s3(v)


class ForgetSpec(StrictModel):
    """The items to forget: an inline list of ids, a file of ids, or pictures; exactly one of them."""

    ids: list[str] | None = Field(None, description="Ids of the corpus items to forget.")
    file: str | None = Field(None, description="File with one id per line ('#' comments allowed), local or s3://.")
    images: list[str] | None = Field(None, description=(
        "A request by picture: image files (local or s3://); every corpus item within the duplicate threshold of one "
        "of them, in the index's space, is forgotten. A picture that matches no item fails the job."))
    duplicates: Literal["fail", "warn", "add"] = Field("add", description="What to do with retained near-duplicates of a forget item: fail the job, warn, or add them to the forget set.")
    duplicate_threshold: float | None = Field(None, gt=0, description="Distance (model space) under which a retained item counts as a near-duplicate; default: the index stage's calibrated value.")

    @field_validator("file")
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        return None if v is None else _local_or_s3(v)

    @field_validator("images")
    @classmethod
    def _images(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [_local_or_s3(u) for u in v]

    @model_validator(mode="after")
    def _one(self) -> "ForgetSpec":
        if sum(x is not None for x in (self.ids, self.file, self.images)) != 1:
            raise ValueError("give exactly one of forget.ids, forget.file and forget.images")
        for name in ("ids", "images"):
            if getattr(self, name) == []:
                raise ValueError(f"forget.{name} is empty: nothing to unlearn")
        return self


class ScalingSpec(StrictModel):
    """How many Ray Train workers, and on what."""

    num_workers: int = Field(1, ge=1, description="Data-parallel training workers.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    max_failures: int = Field(2, ge=-1, description="Lost training workers (or worker groups) recovered from by restarting from the last checkpoint (-1: unlimited).")
    allow_tf32: bool = Field(True, description="TF32 matmuls/convolutions on Ampere+ GPUs (ignored on CPU).")
    encode_batch_size: int = Field(32, ge=1, description=(
        "Stable Diffusion: items per batch of the encoding actors that fill the item cache (the VAE in fp32, the text "
        "encoder under bf16 autocast on a GPU); one actor per GPU where the cluster has GPUs, up to one per CPU otherwise."))
    fp16_loss_scale: float = Field(1024.0, gt=0.0, description=(
        "Initial loss scale for fp16 autocast (bf16 needs none); dynamic: an overflowing update is skipped and the scale halved, "
        "2000 clean updates double it."))


# Measured with latents projected to 128 dimensions: recall@10 0.999 flat, 0.991 IVF-PQ at K + 256
# candidates; 0.992 and 0.985 at K + 128 (docs/scaling.md).
PROJECTED_MIN_MARGIN = 256


class IndexSpec(StrictModel):
    """The kNN index over the corpus embeddings."""

    kind: Literal["auto", "flat", "ivf", "ivfpq"] = Field("auto", description="auto: exact (flat) for small corpora, IVF above index.flat_max_items.")
    flat_max_items: int = Field(200_000, ge=1, description="Largest corpus indexed exactly when kind is auto.")
    candidates_margin: int = Field(32, ge=0, description="Extra candidates searched beyond K before forget ids are dropped and the rest re-ranked exactly.")
    latent_pool: int = Field(1, ge=1, description=(
        "Stable Diffusion: index each latent's pool x pool blocks pooled, 1/pool² of the full latent (candidates re-ranked "
        "exactly on the full latents, stored in fp16 beside the index). Near-duplicates stay exact; the K nearest lose "
        "recall (docs/scaling.md: 0.53 to 0.94 at pool 4 on real images). 1: latents indexed whole."))
    pca_dim: int | None = Field(None, ge=1, description=(
        "Project the indexed vectors to this many dimensions with a PCA trained with the index (with kind ivfpq, PQ codes "
        "of them): a compact index whose candidates are re-ranked exactly on the full vectors stored beside it. Its "
        f"distances rank candidates roughly: candidates_margin must be at least {PROJECTED_MIN_MARGIN} with it "
        "(docs/scaling.md: recall@10 0.991 at 256 with 128 dimensions as IVF-PQ). None: vectors indexed whole."))

    @model_validator(mode="after")
    def _projected_margin(self) -> "IndexSpec":
        if self.pca_dim is not None and self.candidates_margin < PROJECTED_MIN_MARGIN:
            raise ValueError(f"index.pca_dim is set, so index.candidates_margin must be at least {PROJECTED_MIN_MARGIN} "
                             f"(not {self.candidates_margin}): projected distances rank candidates only roughly (docs/scaling.md)")
        return self


class SdEvaluationSpec(StrictModel):
    """Stable Diffusion only: how the forgotten and the retained captions are generated from."""

    generations_per_caption: int = Field(16, ge=1, description="Images generated per distinct caption of the forgotten items, per model (same seeds).")
    inference_steps: int = Field(50, ge=1, description="DDIM sampling steps per generation.")
    guidance_scale: float = Field(7.5, ge=1.0, description="Classifier-free guidance scale (1: none).")
    candidates: int = Field(8, ge=1, description="Nearest retained items (from the index) among which each forgotten item's copy threshold is calibrated.")


class GateSpec(StrictModel):
    """The quality gate: besides the verdict "forgotten", what the unlearned model must keep for its
    version to be promoted (the alias moved). A version that misses it is still registered, tagged
    with the ceiling it missed. Null turns a ceiling off. The defaults pass the embedded benchmark's
    recipes and the model retrained without the forget set, and fail NegGrad's and EraseDiff's
    damage (figures: infra/README.md, "Exit codes and the promotion gate")."""

    max_frechet_ratio: float | None = Field(2.0, gt=0, description=(
        "Pixel DDPMs: the unlearned model's Fréchet distance at most this multiple of the original's (same seeds). "
        "On the embedded benchmark one training seed's ratio spreads up to 1.8 at sound settings; NegGrad and EraseDiff reach 7.5 to 160."))
    max_integrity_ratio: float | None = Field(0.5, gt=0, description=(
        "The integrity_ratio metric at most this: the mean distance between same-seed samples of the original and the "
        "unlearned model (on what was not to be forgotten) over the distance between unrelated samples of the original "
        "(0: unchanged, 1: unrelated; pixels or VAE latents). On the embedded benchmark: the model retrained without the "
        "forget set 0.17, the demo's recipe 0.10, NegGrad about 1 (estimated); the tiny Stable Diffusion test job 0.35."))

    def ceilings(self, kind: ModelKind) -> dict[str, float]:
        """The ceilings that apply to a model of `kind` (the Fréchet distance is measured on pixel DDPMs only)."""
        out = {"max_frechet_ratio": self.max_frechet_ratio} if kind is ModelKind.PIXEL_DDPM else {}
        out["max_integrity_ratio"] = self.max_integrity_ratio
        return {k: v for k, v in out.items() if v is not None}


class EvaluationSpec(StrictModel):
    """How the unlearned model is scored."""

    num_samples: int = Field(2000, ge=16, description="Samples per model (original and unlearned, same seeds); Stable Diffusion: generations from retained captions, for integrity.")
    seed: int = Field(0, description="Seed of the first sampling batch.")
    reference_items: int = Field(10_000, ge=2, description=(
        "Retained items the evaluation reads (a seeded sample in runs of consecutive items; a smaller corpus whole): a pixel "
        "model's Fréchet reference and feature network, a Stable Diffusion model's integrity captions. The evaluation's "
        "cost does not grow with the corpus."))
    forget_threshold: float | None = Field(None, gt=0, description="L2 distance under which a sample is a copy of a forgotten item, in [0,1] pixels (pixel DDPMs) or in VAE-latent space (Stable Diffusion); default: half the forgotten item's distance to its nearest retained item.")
    membership_alpha: float = Field(0.05, gt=0, lt=1, description="Per-item membership test level: an item whose denoising loss is below this quantile of held-out items' losses is still remembered.")
    max_frequency_ratio: float = Field(0.1, ge=0, description="Verdict: forgotten only if the forget frequency is at most this fraction of the original's (plus no item still remembered).")
    holdout_uri: str | None = Field(None, description="Non-member items (same format as the corpus) for the membership test.")
    stable_diffusion: SdEvaluationSpec = Field(default_factory=SdEvaluationSpec, description="Generation settings of the Stable Diffusion memorisation and integrity checks.")
    gate: GateSpec = Field(default_factory=GateSpec, description="The quality gate a version must pass (with the verdict \"forgotten\") to be promoted.")

    @field_validator("holdout_uri")
    @classmethod
    def _holdout(cls, v: str | None) -> str | None:
        return None if v is None else _local_or_s3(v)


class StorageSpec(StrictModel):
    """Where the job's intermediate and final outputs live."""

    root: str = Field(..., description="Local directory or s3://bucket/prefix; every output is keyed by request id and config hash below it.")
    endpoint_url: str | None = Field(None, description="S3 endpoint override for S3-compatible servers (credentials come from the environment, never from this file).")
    region: str | None = Field(None, description="S3 region.")

    @field_validator("root")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _local_or_s3(v)


class MlflowSpec(StrictModel):
    """Lineage: where the run and the registered model version go."""

    tracking_uri: str = Field(..., description="MLflow tracking URI: http(s)://server or sqlite:///path.db for the embedded default.")
    experiment: str = Field("retrack", description="Experiment holding one run per deletion request.")
    registered_model: str = Field(..., description="Registered model that receives the unlearned model as a new version.")
    alias: str | None = Field("production", description="Alias moved to the new version last (only after everything else succeeded); null to move none.")
    artifact_location: str | None = Field(None, description="Artifact root for a new experiment (e.g. s3://bucket/mlflow); default: the server's.")

    @field_validator("tracking_uri")
    @classmethod
    def _tracking(cls, v: str) -> str:
        if not v.startswith(("http://", "https://", "sqlite:///", "postgresql://", "mysql://")):
            raise ValueError(f"tracking_uri {v!r} must be http(s)://host[:port] or a database URI such as sqlite:///path.db")
        return os.path.expandvars(v)


class UnlearnSpec(StrictModel):
    """What the unlearn stage needs of a deletion request: which items to remove from which model,
    how, and where the run's storage is. `JobSpec` extends it; `retrack unlearn` builds it."""

    request_id: str = Field(..., description="Unique id of the deletion request; names the run and its storage prefix.")
    model: ModelSpec
    corpus: CorpusSpec
    forget: ForgetSpec
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec

    @field_validator("request_id")
    @classmethod
    def _rid(cls, v: str) -> str:
        return check_safe_name(v, "request_id")

    @model_validator(mode="after")
    def _trainable(self) -> "UnlearnSpec":
        w, accum = self.scaling.num_workers, self.train.grad_accum
        if accum % w:
            raise ValueError(
                f"train.grad_accum ({accum}) must be a multiple of scaling.num_workers ({w}): grad_accum is the number of "
                f"GLOBAL micro-batches per update and micro-batch m runs on worker m % {w}"
            )
        needs = method_class(self.method.name).requirements
        self.train.check_pairing(needs)
        if self.train.forget_batch_size is not None and not needs.forget:
            raise ValueError(f"train.forget_batch_size is set, but method {self.method.name!r} draws no forget batch: leave it unset")
        if self.train.mixed_precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("train.mixed_precision 'fp16' needs scaling.use_gpu: true; CPU workers run bf16 (or no)")
        if self.scaling.fp16_loss_scale != _default(ScalingSpec, "fp16_loss_scale") and self.train.mixed_precision != "fp16":
            raise ValueError(f"scaling.fp16_loss_scale is set, but train.mixed_precision is {self.train.mixed_precision!r}: the loss scale applies to fp16 only")
        return self


class JobSpec(UnlearnSpec):
    """One deletion request: which items to remove from which model, how, and where results go."""

    index: IndexSpec = Field(default_factory=IndexSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    mlflow: MlflowSpec
    tune: TuneSpec | None = Field(None, description="`retrack tune`: the hyperparameter search; `retrack run` ignores it.")

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        """Cross-field rules a stage would otherwise meet late, or settings that would be ignored."""
        kind, ev = self.model.kind, self.evaluation
        if kind is ModelKind.PIXEL_DDPM and ev.stable_diffusion != SdEvaluationSpec():
            raise ValueError("evaluation.stable_diffusion is set, but model.kind is pixel-ddpm: those settings apply to Stable Diffusion only")
        if kind is not ModelKind.PIXEL_DDPM and ev.gate.max_frechet_ratio != _default(GateSpec, "max_frechet_ratio"):
            raise ValueError(f"evaluation.gate.max_frechet_ratio is set, but model.kind is {kind.value}: the Fréchet distance is measured on pixel DDPMs only")
        if self.index.kind != "auto" and self.index.flat_max_items != _default(IndexSpec, "flat_max_items"):
            raise ValueError(f"index.flat_max_items is set, but index.kind is {self.index.kind!r}: it chooses the index only when kind is auto")
        name = self.model.registered_name
        if name is not None and name != self.mlflow.registered_model:
            raise ValueError(f"model.registered_name ({name!r}) and mlflow.registered_model ({self.mlflow.registered_model!r}) differ: the "
                             "unlearned model becomes a new version of the registered model it came from; give the same name or leave model.registered_name unset")
        if self.tune is not None:
            if kind is not ModelKind.PIXEL_DDPM:
                raise ValueError(f"tune: `retrack tune` scores trials with the pixel-DDPM metrics (forget frequency, Fréchet distance), but model.kind "
                                 f"is {kind.value}; tune Stable Diffusion requests by hand with `retrack run` (remove the tune section)")
            self.tune.check_against(self.method, self.train)
        return self

    def config_hash(self) -> str:
        """Hash of everything that changes the result (not where it is stored or logged)."""
        fields = self.model_dump(mode="json", exclude={"storage", "mlflow", "scaling", "method", "train"})
        if fields["tune"] is None:  # specs without a search keep the hash they had before tuning existed
            del fields["tune"]
        if fields["forget"]["images"] is None:  # and requests by id the hash they had before pictures
            del fields["forget"]["images"]
        # The gate decides the promotion, a result: a changed ceiling is a new job. At its defaults
        # it is left out, so specs keep the hash they had before the gate existed.
        if fields["index"]["latent_pool"] == 1:  # latents indexed whole, as before pooling existed
            del fields["index"]["latent_pool"]
        if fields["index"]["pca_dim"] is None:  # and unprojected, as before projection existed
            del fields["index"]["pca_dim"]
        if fields["evaluation"]["reference_items"] == EvaluationSpec.model_fields["reference_items"].default:
            del fields["evaluation"]["reference_items"]  # at its default, specs keep the hash they had before the sample
        gate = self.evaluation.gate.model_dump(mode="json", exclude_defaults=True)
        if gate:
            fields["evaluation"]["gate"] = gate
        else:
            del fields["evaluation"]["gate"]
        return recipe_hash(self.method, self.train, **fields)[:16]

    @property
    def run_name(self) -> str:
        return f"{self.request_id}-{self.config_hash()}"

    def worker_local_paths(self) -> dict[str, str]:
        """The fields naming local paths that Ray workers read or write (the forget file and pictures
        are read by the driver alone)."""
        fields = {"storage.root": self.storage.root, "corpus.uri": self.corpus.uri, "model.uri": self.model.uri,
                  "evaluation.holdout_uri": self.evaluation.holdout_uri}
        return {k: v for k, v in fields.items() if v is not None and not v.startswith("s3://")}


def parse_spec(text: str, where: str) -> JobSpec:
    """Validate a YAML job spec's text (safe loading); errors name `where` and each offending field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{where} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{where}: {describe_validation_error(exc)}") from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a YAML job spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"job spec {path} does not exist") from None
    return parse_spec(text, f"job spec {path}")
