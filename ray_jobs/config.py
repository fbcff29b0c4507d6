"""Typed configuration of one training run, validated once at the boundary, and the profiles.

A ``TrainConfig`` is what a Tune trial's config dict and the CLI flags become. Everything that can be
checked without data is checked by pydantic when the config is built; what needs the data (the image size
against the pooling depth, the files themselves) is checked by :func:`ray_jobs.data.prepare_data` before
any Ray work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mri_models.models import MODEL_NAMES, uses_attention

ModelName = Literal["unet", "attention_unet", "sparse_attention_unet"]
assert set(ModelName.__args__) == set(MODEL_NAMES)  # the registry is the source of truth
ProfileName = Literal["smoke", "cpu", "paper"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and what was expected."""


class TrainConfig(BaseModel):
    """One training configuration: model, optimisation, data and resources.

    Defaults are fastMRI's U-Net baseline (RMSprop, lr 1e-3, StepLR 40 / 0.1, 4x with 8% centre).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Model.
    model: ModelName = "unet"
    gamma: float = Field(0.0, ge=0.0, description="weight of the attention-sparsity penalty")
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
    data_root: Path | None = None
    sample_rate: float | None = Field(None, gt=0.0, le=1.0)
    volume_sample_rate: float | None = Field(None, gt=0.0, le=1.0)
    mask_type: Literal["random", "equispaced", "equispaced_fraction"] = "random"
    center_fractions: tuple[float, ...] = (0.08,)
    accelerations: tuple[int, ...] = (4,)
    slices_per_read: int = Field(8, ge=1, description="slices one Ray Data task reads from one file")
    # Resources.
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    data_cpus_per_task: float = Field(0.25, gt=0.0, description="CPU reserved by each Ray Data read task")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    max_failures: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.gamma > 0 and self.model != "sparse_attention_unet":
            raise ValueError(
                f"gamma={self.gamma} only applies to sparse_attention_unet (model is {self.model!r}; "
                "attention_unet is the gamma=0 case)"
            )
        if self.sample_rate is not None and self.volume_sample_rate is not None:
            raise ValueError("set sample_rate (by slice) or volume_sample_rate (by volume), not both")
        if len(self.center_fractions) != len(self.accelerations) or not self.accelerations:
            raise ValueError(
                f"center_fractions {self.center_fractions} and accelerations {self.accelerations} must be "
                "non-empty and of the same length"
            )
        return self

    @property
    def uses_attention(self) -> bool:
        return uses_attention(self.model)

    def model_hparams(self) -> dict[str, Any]:
        """Constructor arguments for :func:`mri_models.models.build_model`."""
        return {"chans": self.chans, "num_pool_layers": self.num_pool_layers, "drop_prob": self.drop_prob}


def make_train_config(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig, turning pydantic's errors into one readable ConfigError."""
    try:
        return TrainConfig(**values)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            key = ".".join(str(part) for part in error["loc"]) or "config"
            value = f" (got {error['input']!r})" if key != "config" and "input" in error else ""
            problems.append(f"{key}: {error['msg']}{value}")
        raise ConfigError("invalid training configuration: " + "; ".join(problems)) from None


# Synthetic dataset per profile, in the arguments of mri_models.data.synthetic.generate_dataset.
SYNTHETIC_DATA: dict[str, dict[str, Any]] = {
    "smoke": {
        "num_train": 4,
        "num_val": 2,
        "num_slices": 4,
        "recon_size": (64, 64),
        "kspace_size": (128, 74),
    },
    # Sized so the default gamma sweep (15 trials) finishes within 10 minutes on 2 cores.
    "cpu": {
        "num_train": 8,
        "num_val": 4,
        "num_slices": 10,
        "recon_size": (128, 128),
        "kspace_size": (256, 148),
    },
    # Real fastMRI sizes; a handful of volumes so the out-of-the-box paper run does not need the real data.
    "paper": {
        "num_train": 20,
        "num_val": 6,
        "num_slices": 30,
        "recon_size": (320, 320),
        "kspace_size": (640, 368),
    },
}

# TrainConfig values per profile (the paper's settings for "paper").
PROFILES: dict[str, dict[str, Any]] = {
    # Fractional CPUs per worker on small machines: two single-threaded trials train side by side on 2
    # cores (each trial also waits ~15 s on Ray orchestration, which then overlaps), with CPU left for
    # the Ray Data tasks.
    "smoke": {
        "chans": 4,
        "num_pool_layers": 2,
        "epochs": 2,
        "batch_size": 4,
        "lr": 3e-3,
        "cpus_per_worker": 0.5,
    },
    "cpu": {
        "chans": 8,
        "num_pool_layers": 3,
        "epochs": 6,
        "batch_size": 4,
        "lr": 3e-3,
        "cpus_per_worker": 0.75,
    },
    "paper": {"chans": 32, "num_pool_layers": 4, "epochs": 50, "batch_size": 1, "lr": 1e-3, "use_gpu": True},
}


def profile_defaults(profile: str) -> dict[str, Any]:
    """The TrainConfig values of a profile."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    return dict(PROFILES[profile])


def default_data_dir() -> Path:
    """Where generated synthetic datasets are cached (shared by every run on this machine)."""
    from mri_models.data.slice_dataset import default_cache_dir

    return default_cache_dir() / "synthetic"
