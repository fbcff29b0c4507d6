"""Canned experiment directories in Ray Tune's layout, modelled on a real smoke gamma sweep.

Each trial directory ``run_trial_<id>_<index>_<params>_<date>/`` holds ``params.json``, ``result.json``
(one JSON object per epoch with the trainer's metric keys and Tune's bookkeeping keys), ``progress.csv`` and,
for failed trials, ``error.txt``. ``train_runs/<trial_id>/checkpoint_<date>/`` holds ``checkpoint.pt``
(``torch.save`` of a real tiny model's state with the trainer's keys) and ``history.json``: the best-by-SSIM
and the latest checkpoint, as the trainer keeps them, and ``train_config.json``, the trial's resolved
configuration as ``ray_jobs.tune.run_trial`` records it. ``sweep.json`` and the ASHA state file are written
as ``ray_jobs.tune`` writes them. The metric values are chosen here so the tests can check the analysis by
hand.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mri_models.experiment import ASHA_STATE_FILE
from ray_jobs.config import make_train_config
from ray_jobs.sweep_config import SweepSpec
from tests.conftest import make_fastmri_volume

TUNE_KEYS_AFTER = ("timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date")
DIVERGED_ERROR = (
    "Failure # 1 (occurred at 2026-11-24_02-40-00)\n"
    "ray.exceptions.RayTaskError(TrainingFailedError): ...\n"
    "ray_jobs.train.TrainingDivergedError: training diverged at epoch 2 step 3: loss is nan on rank 0 "
    "(lr=0.003, gamma=0.0001); lower the learning rate or gamma\n"
)
ERRORED_ERROR = (
    "Failure # 1 (occurred at 2026-11-24_02-41-00)\n"
    "ray.exceptions.RayTaskError(TrainingFailedError): ...\n"
    "RuntimeError: worker died unexpectedly (node lost)\n"
)


# The zero-filled baseline as ray_jobs.baseline records it, for the default mask settings of every trial.
ZERO_FILLED = {
    "metrics": {"nmse": 0.3, "psnr": 24.0, "ssim": 0.55, "num_volumes": 2},
    "mask": {"mask_type": "random", "center_fractions": [0.08], "accelerations": [4]},
    "val_slices": 6,
}


@dataclass
class TrialPlan:
    """One canned trial: its parameters, validation SSIM per reported epoch and how it ended."""

    params: dict[str, Any]
    ssim: list[float]
    error: str | None = None
    stopped: bool = False
    drop_metrics: tuple[str, ...] = ()  # metric keys missing from every result line
    mpand: list[float] | None = None  # MPAND per epoch (default: falling 5 per epoch from -35)
    alpha: tuple[float, float] | None = None  # (mean alpha, fraction below 0.1) at every epoch
    checkpoints: bool = True
    trial_id: str = ""
    dir_name: str = ""


@dataclass
class CannedExperiment:
    path: Path
    trials: list[TrialPlan] = field(default_factory=list)


def epoch_metrics(model: str, epoch: int, ssim: float, levels: int = 2) -> dict[str, Any]:
    """Every metric the trainer reports, derived from the SSIM so tests can predict them."""
    attention = model != "unet"
    row = {
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "train_reconstruction_loss": 0.9 / epoch,
        "val_loss": 1.0 - ssim,
        "nmse": round(0.5 - 0.5 * ssim, 6),
        "psnr": round(20.0 + 10.0 * ssim, 6),
        "ssim": ssim,
        "mpand": -30.0 - 5.0 * epoch if attention else math.nan,
    }
    for level in range(1, levels + 1):
        row[f"mpand_level_{level}"] = -30.0 - 5.0 * epoch - level if attention else math.nan
    row.update(
        {
            "attention_l1": 1250.0 - epoch if attention else math.nan,
            "lr": 0.003,
            "epoch_seconds": 0.5,
            "train_slices_per_second": 40.0,
            "train_slices": 16,
            "val_volumes": 2,
        }
    )
    return row


def _state(model: str, seed: int, epoch: int) -> dict[str, Any]:
    from mri_models.models import build_model

    torch.manual_seed(seed)
    network = build_model(model, chans=4, num_pool_layers=2)
    optimizer = torch.optim.RMSprop(network.parameters(), lr=0.003)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40, 0.1)
    return {
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch - 1,
        "torch_rng": torch.get_rng_state(),
    }


def _params_text(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def write_experiment(
    path: Path,
    spec: dict[str, Any],
    max_epochs: int,
    data_root: Path,
    plans: list[TrialPlan],
    prefix: str,
    model_of: dict[str, str] | None = None,
) -> CannedExperiment:
    """Write one experiment directory for the plans (trial ids ``<prefix>_<index:05d>``)."""
    path.mkdir(parents=True)
    search_keys = [*spec["search"], "seed"]
    sweep = {"spec": spec, "search_keys": search_keys, "max_epochs": max_epochs, "data_root": str(data_root)}
    (path / "sweep.json").write_text(json.dumps(sweep, indent=2))
    (path / "baseline.json").write_text(json.dumps({"baselines": [ZERO_FILLED]}))
    for index, plan in enumerate(plans):
        plan.trial_id = f"{prefix}_{index:05d}"
        plan.dir_name = (
            f"run_trial_{plan.trial_id}_{index}_{_params_text(plan.params)}_2026-11-24_02-{index:02d}-00"
        )
        trial_dir = path / plan.dir_name
        trial_dir.mkdir()
        (trial_dir / "params.json").write_text(json.dumps(plan.params, indent=2))
        (trial_dir / "params.pkl").write_bytes(b"\x80\x04N.")
        model = plan.params.get("model") or spec["train"].get("model", "unet")
        run_dir = path / "train_runs" / plan.trial_id
        run_dir.mkdir(parents=True)
        config = make_train_config(SweepSpec(**spec).trial_values(plan.params)).model_dump(mode="json")
        (run_dir / "train_config.json").write_text(json.dumps(config, indent=2))
        lines, history = [], []
        for epoch, ssim in enumerate(plan.ssim, start=1):
            metrics = epoch_metrics(model, epoch, ssim)
            if plan.mpand is not None:
                metrics["mpand"] = plan.mpand[epoch - 1]
            if plan.alpha is not None:
                metrics["alpha_mean"], metrics["alpha_below_0_1"] = plan.alpha
            history.append(metrics)
            checkpoint = run_dir / f"checkpoint_2026-11-24_02-{index:02d}-{epoch:02d}.000000"
            line = {k: v for k, v in metrics.items() if k not in plan.drop_metrics}
            line["checkpoint_path"] = f"/tmp/elsewhere/{checkpoint.relative_to(path)}"
            line.update(
                {"timestamp": 1795487857 + epoch, "checkpoint_dir_name": None, "done": epoch == max_epochs,
                 "training_iteration": epoch, "trial_id": plan.trial_id, "date": "2026-11-24_02-37-37",
                 "time_this_iter_s": 2.0, "time_total_s": 2.0 * epoch, "pid": 1234, "hostname": "vm",
                 "node_ip": "192.0.2.2", "config": plan.params, "time_since_restore": 2.0 * epoch,
                 "iterations_since_restore": epoch}
            )  # fmt: skip
            lines.append(line)
            if plan.checkpoints:
                checkpoint.mkdir(parents=True)
                torch.save(_state(model, plan.params["seed"], epoch), checkpoint / "checkpoint.pt")
                (checkpoint / "history.json").write_text(json.dumps(history))
        # The trainer keeps the best checkpoint by SSIM and the latest: drop the others.
        if plan.checkpoints and len(plan.ssim) > 2:
            best = max(range(len(plan.ssim)), key=lambda i: plan.ssim[i])
            keep = {best, len(plan.ssim) - 1}
            for i, directory in enumerate(sorted(run_dir.glob("checkpoint_*"))):
                if i not in keep:
                    shutil.rmtree(directory)
        (trial_dir / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
        with open(trial_dir / "progress.csv", "w", newline="") as f:
            if lines:
                writer = csv.DictWriter(
                    f, fieldnames=[k for k in lines[0] if k != "config"], extrasaction="ignore"
                )
                writer.writeheader()
                writer.writerows(lines)
        (trial_dir / "events.out.tfevents.1795487816.vm").write_bytes(b"")
        if plan.error:
            (trial_dir / "error.txt").write_text(plan.error)
    stopped = [p.trial_id for p in plans if p.stopped]
    rung = {p.trial_id: p.ssim[0] for p in plans if p.ssim}
    asha = {"brackets": [[{"milestone": 2.0, "recorded": {}}, {"milestone": 1.0, "recorded": rung}]]}
    asha["stopped_trials"] = stopped
    (path / ASHA_STATE_FILE).write_text(json.dumps(asha))
    (path / "experiment_state-2026-11-24_02-36-53.json").write_text("{}")
    return CannedExperiment(path, plans)


def make_data_root(root: Path) -> Path:
    """A tiny fastMRI root: two validation volumes of 32 x 32 images (and one training volume)."""
    make_fastmri_volume(root / "singlecoil_train" / "train0.h5", num_slices=3, seed=1)
    for i in range(2):
        make_fastmri_volume(
            root / "singlecoil_val" / f"val{i}.h5", num_slices=3, kspace_shape=(64, 41), seed=5 + i
        )
    return root


def canned_spec(
    name: str, train: dict[str, Any], search: dict[str, list], seeds: list[int]
) -> dict[str, Any]:
    return {
        "experiment": name,
        "description": f"canned {name}",
        "profile": "smoke",
        "train": train,
        "search": search,
        "seeds": seeds,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2.0},
        "max_concurrent_trials": None,
        "workers_per_trial": None,
    }


def model_comparison(root: Path, data_root: Path) -> CannedExperiment:
    """Three architectures x four seeds, three epochs; one errored, one diverged, one unfinished, one
    stopped by ASHA, and the best U-Net trial without its checkpoints."""

    def plan(model: str, seed: int, ssim: list[float], **kwargs) -> TrialPlan:
        return TrialPlan({"model": model, "seed": seed}, ssim, **kwargs)

    plans = [
        plan("unet", 0, [0.50, 0.58, 0.60]),
        plan("unet", 1, [0.52, 0.60, 0.62]),
        plan("unet", 2, [0.54, 0.62, 0.64], checkpoints=False),
        plan("unet", 3, [0.40], error=ERRORED_ERROR),
        plan("attention_unet", 0, [0.51, 0.61, 0.63]),
        plan("attention_unet", 1, [0.53, 0.63, 0.66]),
        plan("attention_unet", 2, [0.55, 0.67, 0.65]),
        plan("attention_unet", 3, [0.45]),  # interrupted: no final epochs
        plan("sparse_attention_unet", 0, [0.50, 0.57, 0.59]),
        plan("sparse_attention_unet", 1, [0.50, 0.55], stopped=True),
        plan("sparse_attention_unet", 2, [0.52, 0.58, 0.61]),
        plan("sparse_attention_unet", 3, [0.30], error=DIVERGED_ERROR),
    ]
    spec = canned_spec(
        "model_comparison",
        {"gamma": 1e-4, "epochs": 3},
        {"model": ["unet", "attention_unet", "sparse_attention_unet"]},
        [0, 1, 2, 3],
    )
    return write_experiment(root / "model_comparison-canned", spec, 3, data_root, plans, "aa001")


def gamma_sweep(root: Path, data_root: Path) -> CannedExperiment:
    """Sparse Attention U-Net over gamma x three seeds, two epochs, interrupted: two grid points never
    started, one trial without any result, one unfinished, one stopped by ASHA and missing PSNR."""

    def plan(gamma: float, seed: int, ssim: list[float], **kwargs) -> TrialPlan:
        return TrialPlan({"gamma": gamma, "seed": seed}, ssim, **kwargs)

    plans = [
        plan(0.0, 0, [0.50, 0.60]),
        plan(0.0, 1, [0.52, 0.62]),
        plan(0.0, 2, [0.51, 0.61]),
        plan(1e-4, 0, [0.49, 0.58]),
        plan(1e-4, 1, [0.47], stopped=True, drop_metrics=("psnr",)),
        plan(1e-2, 0, [0.45]),
        plan(1e-2, 1, []),
    ]
    spec = canned_spec(
        "gamma_sweep", {"model": "sparse_attention_unet"}, {"gamma": [0.0, 1e-4, 1e-2]}, [0, 1, 2]
    )
    return write_experiment(root / "gamma_sweep-canned", spec, 2, data_root, plans, "bb002")
