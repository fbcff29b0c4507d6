"""Typed configuration of one training run, validated once at the boundary, and the profiles.

A ``TrainConfig`` is what a Tune trial's config dict and the CLI flags become. Everything that can be
checked without data is checked by pydantic when the config is built; what needs the data (the image size
against the pooling depth, the files themselves) is checked by :func:`ray_jobs.data.prepare_data` before
any Ray work starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mri_models.arms import active_penalties, arm_of, shown_options, shown_weights
from mri_models.data.slice_dataset import default_cache_dir
from mri_models.losses import penalty_by_weight_key
from mri_models.models import get_architecture, model_names, option_owners
from mri_models.plugins import load_plugins

PenaltyWeight = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and what was expected."""


class TrainConfig(BaseModel):
    """One training configuration: model, penalty weights, optimisation, data and resources.

    Defaults are fastMRI's U-Net baseline (RMSprop, lr 1e-3, StepLR 40 / 0.1, 4x with 8% centre). The
    weight of every registered penalty term is a top-level key (``gamma`` for the paper's L1 penalty on
    the attention coefficients), held in :attr:`penalty_weights` and written back flat by ``model_dump``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Modules that register extra architectures, penalties or metrics (mri_models.plugins).
    plugins: tuple[str, ...] = ()
    # Model.
    model: str = "unet"
    penalty_weights: dict[str, PenaltyWeight] = Field(default_factory=dict)
    model_options: dict[str, Any] = Field(default_factory=dict)
    chans: int = Field(32, ge=1)
    num_pool_layers: int = Field(4, ge=1)
    drop_prob: float = Field(0.0, ge=0.0, lt=1.0)
    # Optimisation.
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    lr: float = Field(1e-3, gt=0.0)
    lr_step_size: int = Field(40, ge=1)
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(1, ge=1)
    epochs: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)
    # Data.
    data_root: str | None = None  # a local path or a URI (mri_models.storage)
    sample_rate: float | None = Field(None, gt=0.0, le=1.0)
    volume_sample_rate: float | None = Field(None, gt=0.0, le=1.0)
    mask_type: Literal["random", "equispaced", "equispaced_fraction"] = "random"
    center_fractions: tuple[float, ...] = (0.08,)
    accelerations: tuple[int, ...] = (4,)
    # The held-out test split, read only by the final evaluation (ray_jobs.final_evaluation): "auto" is the
    # root's singlecoil_test when its volumes have targets (the synthetic data's), else half of the
    # validation patients (fastMRI's own test split has no targets); "val_half" always splits validation
    # by patient; another name is that split directory; "none" evaluates nothing on a test split.
    test_split: str = Field("auto", min_length=1)
    test_root: str | None = Field(None, description="the data root of test_split (default: data_root)")
    # The final evaluation's (centre fraction, acceleration) pairs: fastMRI's 4x and 8x protocol.
    test_center_fractions: tuple[float, ...] = (0.08, 0.04)
    test_accelerations: tuple[int, ...] = (4, 8)
    slices_per_read: int = Field(8, ge=1, description="consecutive slices of one file read at once (a chunk)")
    # 8 (64 slices per Ray task): Ray Data's per-task and block costs shrink against the work
    # (benchmarks/README.md, Data pipeline: chunks_per_task). It decides block boundaries, which
    # the trainer's local shuffle buffer sees: a run's batches depend on it as they do on its seed.
    chunks_per_task: int = Field(
        8, ge=1, description="chunks one Ray Data task reads: fewer, larger tasks, the same rows in order"
    )
    # How k-space becomes the network input: "exact" repeats fastMRI's UnetDataTransform operation for
    # operation (bit-equal, mri_models/data/transforms.py); "fast" does the readout inverse FFT once on the
    # rows the crop keeps (equal within float32 rounding, mri_models/data/hybrid_transforms.py). Where it
    # runs: in the Ray Data read tasks, or batched on the trainer's device (the GPU on GPU nodes).
    transform: Literal["exact", "fast"] = "fast"
    transform_on: Literal["read_tasks", "trainer"] = "read_tasks"
    data_cache_gb: float = Field(
        0.0, ge=0.0, description="per-node local copies of remote volumes up to this size (0: stream only)"
    )
    data_cache_dir: str | None = Field(None, description="where those copies live (None: the temp dir)")
    # Resources.
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    data_cpus_per_task: float = Field(0.25, gt=0.0, description="CPU reserved by each Ray Data read task")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    gpus_per_worker: float = Field(
        1.0, gt=0.0, description="GPUs per worker when on GPUs: a fraction packs several trials on one GPU"
    )
    max_failures: int = Field(2, ge=0)
    preemption_check_steps: int = Field(
        10, ge=0, description="ask Ray Train every N steps whether a node is being preempted (0: never)"
    )
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (and cuDNN's flags)")
    # Training step (metrics are always computed in float32).
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype of the step")
    channels_last: bool = Field(False, description="model and inputs in channels_last memory format")
    compile: bool = Field(False, description="torch.compile the model (eager, with a warning, if unusable)")
    val_cache_mb: float = Field(1024, ge=0, description="keep a rank's validation rows in memory up to this")
    # Time to target (AlgoPerf's fastMRI workload: validation SSIM 0.7237 on the real knee data).
    target_ssim: float | None = Field(
        None, gt=0.0, le=1.0, description="validation SSIM whose first reaching is timed (None: off)"
    )
    stop_at_target: bool = Field(False, description="end the run at the epoch it reaches target_ssim")
    # Monitoring.
    image_every_epochs: int = Field(
        5, ge=0, description="validation images to TensorBoard every N epochs, first and last too (0: never)"
    )

    @model_validator(mode="before")
    @classmethod
    def _gather_penalty_weights(cls, values: Any) -> Any:
        """Load the plugins, then move every registered penalty weight key into ``penalty_weights``."""
        if not isinstance(values, Mapping):
            return values
        values = dict(values)
        plugins = values.get("plugins") or ()
        if isinstance(plugins, (list, tuple)) and all(isinstance(p, str) for p in plugins):
            load_plugins(plugins)  # anything else is left to the field's own validation message
        given = values.pop("penalty_weights", None) or {}
        if not isinstance(given, Mapping):
            return {**values, "penalty_weights": given}  # pydantic names the bad value
        weights = dict.fromkeys(penalty_by_weight_key(), 0.0)
        weights.update(given)
        for key in penalty_by_weight_key():
            if key in values:
                weights[key] = values.pop(key)
        values["penalty_weights"] = weights
        options = values.pop("model_options", None) or {}
        if not isinstance(options, Mapping):
            return {**values, "model_options": options}
        options = dict(options)
        for key in option_owners():
            if key in values and key not in cls.model_fields:
                options[key] = values.pop(key)
        values["model_options"] = options
        return values

    @model_validator(mode="after")
    def _a_target_to_stop_at(self) -> TrainConfig:
        if self.stop_at_target and self.target_ssim is None:
            raise ValueError("stop_at_target needs a target_ssim")
        return self

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus_or_a_share(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"{value} GPUs: a share of one GPU (at most 1) or a whole number of GPUs")
        return value

    @field_validator("data_root", "test_root", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        # A pathlib.Path from Python callers; URIs (s3://...) must stay text, which Path would mangle.
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("model")
    @classmethod
    def _registered_model(cls, name: str) -> str:
        names = model_names()
        if name not in names:
            expected = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return name

    @field_validator("model_options")
    @classmethod
    def _declared_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Each option checked against the model's declaration (name and type); its defaults filled in."""
        model = info.data.get("model")
        if model is None:
            return options  # the model's own error is reported
        declared = get_architecture(model).options
        checked = {name: option.default for name, option in declared.items()}
        for key, value in options.items():
            if key not in declared:
                owners = [name for name in model_names() if key in get_architecture(name).options]
                raise PydanticCustomError(
                    "architecture_option",
                    "a hyper-parameter of {owners}, not of model '{model}'",
                    {"key": key, "value": value, "owners": " and ".join(owners), "model": model},
                )
            try:
                checked[key] = TypeAdapter(declared[key].annotation).validate_python(value)
            except ValidationError as err:
                reason = err.errors()[0]["msg"]
                raise PydanticCustomError(
                    "architecture_option", "{reason}", {"key": key, "value": value, "reason": reason}
                ) from None
        return checked

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        active_penalties(self.model, self.penalty_weights)  # raises naming the weight and the model
        if self.sample_rate is not None and self.volume_sample_rate is not None:
            raise ValueError("set sample_rate (by slice) or volume_sample_rate (by volume), not both")
        if len(self.center_fractions) != len(self.accelerations) or not self.accelerations:
            raise ValueError(
                f"center_fractions {self.center_fractions} and accelerations {self.accelerations} must be "
                "non-empty and of the same length"
            )
        if len(self.test_center_fractions) != len(self.test_accelerations):
            raise ValueError(
                f"test_center_fractions {self.test_center_fractions} and test_accelerations "
                f"{self.test_accelerations} must be of the same length"
            )
        fractions_ok = all(0 < f < 1 for f in self.test_center_fractions)
        if not fractions_ok or min(self.test_accelerations, default=1) < 1:
            raise ValueError("test_center_fractions must lie in (0, 1) and test_accelerations be >= 1")
        return self

    def test_settings(self) -> list[dict[str, Any]]:
        """The final evaluation's mask settings, one per (centre fraction, acceleration) pair."""
        pairs = zip(self.test_center_fractions, self.test_accelerations, strict=True)
        kind = self.mask_type
        return [{"mask_type": kind, "center_fractions": [f], "accelerations": [a]} for f, a in pairs]

    @model_serializer(mode="wrap")
    def _flat_weights(self, handler) -> dict[str, Any]:
        # Users write weights as top-level keys (gamma: 1e-4); dumps keep that shape.
        values = handler(self)
        weights = values.pop("penalty_weights", {})
        options = values.pop("model_options", {})
        return {**values, **weights, **options}

    @property
    def gamma(self) -> float:
        """The weight of the paper's attention-sparsity penalty."""
        return self.penalty_weights.get("gamma", 0.0)

    @property
    def uses_attention(self) -> bool:
        return get_architecture(self.model).has_attention

    @property
    def active_penalties(self) -> dict[str, float]:
        """Penalty term name -> weight, for the terms this run trains with."""
        return active_penalties(self.model, self.penalty_weights)

    @property
    def arm(self):
        """The study arm this configuration trains (:mod:`mri_models.arms`)."""
        return arm_of(self.model, self.penalty_weights, self.model_options)

    def identifying_weights(self) -> dict[str, float]:
        """The weights that tell this configuration apart (for run names)."""
        return shown_weights(self.model, self.penalty_weights)

    def identifying_options(self) -> dict[str, Any]:
        """The architecture options that differ from the model's defaults (for run names)."""
        return shown_options(self.model, self.model_options)

    def model_spec(self) -> dict[str, Any]:
        """The network a checkpoint holds: the model name and every constructor argument."""
        return {"model": self.model, "hparams": self.model_hparams()}

    def model_hparams(self) -> dict[str, Any]:
        """Constructor arguments for :func:`mri_models.models.build_model`."""
        shared = {"chans": self.chans, "num_pool_layers": self.num_pool_layers, "drop_prob": self.drop_prob}
        return {**shared, **self.model_options}


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers: ``1e-4`` is a float (YAML 1.1, PyYAML's default,
    needs a dot, ``1.0e-4``, and reads ``1e-4`` as the string "1e-4", which then reaches Tune's grid)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[0-9][0-9_]*[eE][-+]?[0-9]+)$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse configuration YAML (sweep files, ``--set`` values) with YAML 1.2 numbers."""
    return yaml.load(text, Loader=_YamlLoader)


def make_train_config(values: Mapping[str, Any]) -> TrainConfig:
    """Build a TrainConfig, turning pydantic's errors into one readable ConfigError."""
    try:
        return TrainConfig(**values)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            location = [str(part) for part in error["loc"]]
            if location[:1] == ["penalty_weights"] and "penalty_weights" not in values:
                location = location[1:]  # users wrote the weight as a top-level key
            if error["type"] == "architecture_option":  # so did they the option the error names
                location, error["input"] = [error["ctx"]["key"]], error["ctx"]["value"]
            key = ".".join(location) or "config"
            value = f" (got {error['input']!r})" if key != "config" and "input" in error else ""
            problems.append(f"{key}: {error['msg']}{value}")
        raise ConfigError("invalid training configuration: " + "; ".join(problems)) from None
    except ValueError as err:  # a plugin that cannot be loaded
        raise ConfigError(f"invalid training configuration: plugins: {err}") from None


# Synthetic dataset per profile, in the arguments of mri_models.data.synthetic.generate_dataset.
SYNTHETIC_DATA: dict[str, dict[str, Any]] = {
    "smoke": {
        "num_train": 4,
        "num_val": 2,
        "num_test": 2,
        "num_slices": 4,
        "recon_size": (64, 64),
        "kspace_size": (128, 74),
    },
    # Sized so the default gamma sweep (15 trials) finishes within 10 minutes on 2 cores.
    "cpu": {
        "num_train": 8,
        "num_val": 4,
        "num_test": 4,
        "num_slices": 10,
        "recon_size": (128, 128),
        "kspace_size": (256, 148),
    },
    # Real fastMRI sizes; a handful of volumes so the out-of-the-box paper run does not need the real data.
    "paper": {
        "num_train": 20,
        "num_val": 6,
        "num_test": 6,
        "num_slices": 30,
        "recon_size": (320, 320),
        "kspace_size": (640, 368),
    },
}

# TrainConfig values per profile (the paper's settings for "paper").
PROFILES: dict[str, dict[str, Any]] = {
    # Fractional CPUs per worker on small machines: two single-threaded trials train side by side on 2
    # cores (each trial also waits on Ray orchestration, which then overlaps: benchmarks/README.md, Trial
    # overhead), with CPU left for
    # the Ray Data tasks.
    "smoke": {
        "chans": 4,
        "num_pool_layers": 2,
        "epochs": 2,
        "batch_size": 4,
        "lr": 3e-3,
        "cpus_per_worker": 0.5,
        "image_every_epochs": 1,
    },
    # Adam at 3e-3: in this profile's short training RMSprop barely reaches the zero-filled input's SSIM,
    # Adam passes it early and clearly (benchmarks/README.md, Measured without a script).
    "cpu": {
        "chans": 8,
        "num_pool_layers": 3,
        "epochs": 10,
        "batch_size": 4,
        "optimizer": "adam",
        "lr": 3e-3,
        "cpus_per_worker": 0.75,
        "image_every_epochs": 2,
    },
    "paper": {
        "chans": 32,
        "num_pool_layers": 4,
        "epochs": 50,
        "batch_size": 1,
        "lr": 1e-3,
        "use_gpu": True,
        # Data in S3 is read whole once per node, then from local disk: the single-coil knee train and val
        # splits (~108 GB) fit the GPU nodes' 200 GB volume (cluster.yaml). No effect on local data.
        "data_cache_gb": 150,
        # GPU nodes: bf16 autocast with NHWC tensors is what Ampere's tensor cores (the A10G of
        # cluster.yaml) run fastest, with less activation memory (benchmarks/README.md, GPU step
        # options). The transform's mask, column FFT and normalisation run on the GPU, so the node's CPUs
        # only read and do the readout FFT of the sampled columns: a fraction of fastMRI's CPU per slice,
        # and the path that beats fastMRI's DataLoader through Ray Data (benchmarks/README.md, Data
        # pipeline). Not compiled: on CPU Inductor made the attention gates slower (benchmarks/README.md,
        # Training step); measure with benchmarks/gpu_step.py on a GPU node before turning it on.
        "precision": "bf16",
        "channels_last": True,
        "transform_on": "trainer",
    },
}


def profile_defaults(profile: str) -> dict[str, Any]:
    """The TrainConfig values of a profile."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    return dict(PROFILES[profile])


def default_data_dir() -> Path:
    """Where generated synthetic datasets are cached (shared by every run on this machine)."""
    return default_cache_dir() / "synthetic"
