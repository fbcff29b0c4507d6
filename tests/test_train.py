"""Ray Train runs on a real local Ray (2 CPUs): DDP, validation across ranks, failures, resume, divergence."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
from fastmri import evaluate as ref_evaluate

from mri_models.data import RandomMaskFunc, SliceDataset, UnetDataTransform
from mri_models.models import build_model
from ray_jobs.checkpoints import history_from_checkpoint
from ray_jobs.config import make_train_config
from ray_jobs.data import VAL_SPLIT, prepare_data
from ray_jobs.trainer import build_trainer
from ray_jobs.worker import metric_keys

pytestmark = pytest.mark.slow


def _cfg(root, **overrides):
    values = {
        "data_root": root,
        "chans": 4,
        "num_pool_layers": 2,
        "batch_size": 2,
        "epochs": 2,
        "lr": 1e-3,
        "cpus_per_worker": 0.5,
        "max_failures": 0,
        **overrides,
    }
    return make_train_config(values)


def _fit(cfg, root, storage, name):
    result = build_trainer(cfg, prepare_data(cfg, root), name, str(storage)).fit()
    return result


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("model", ["unet", "attention_unet", "sparse_attention_unet"])
def test_ddp_run_reports_every_metric_every_epoch(ray_local, tiny_root, tmp_path, model, workers):
    gamma = 1e-4 if model == "sparse_attention_unet" else 0.0
    cfg = _cfg(tiny_root, model=model, gamma=gamma, num_workers=workers)
    result = _fit(cfg, tiny_root, tmp_path, f"{model}-{workers}")
    assert result.error is None
    history = history_from_checkpoint(result.checkpoint)
    assert [row["epoch"] for row in history] == [0, 1, 2]  # epoch 0: the untrained network
    initial, *history = history
    assert list(initial) == metric_keys(2) and initial["train_slices"] == 0
    assert math.isnan(initial["train_loss"]) and math.isnan(initial["compute_fraction"])
    if workers == 1 and model == "attention_unet":  # epoch 0 is an evaluation of the untrained network
        for key, value in _fastmri_reference(cfg, tiny_root, seed=cfg.seed).items():
            assert initial[key] == pytest.approx(value, rel=1e-5), key
    for row in history:
        assert list(row) == metric_keys(2)
        assert row["train_slices"] == 16 and row["val_volumes"] == 3
        assert math.isfinite(row["train_loss"]) and -1 <= row["ssim"] <= 1 and row["nmse"] > 0
        assert 0 < row["compute_fraction"] <= 1
        if model == "unet":
            assert (
                math.isnan(row["mpand"])
                and math.isnan(row["mpand_level_1"])
                and math.isnan(row["attention_l1"])
            )
        else:
            assert -100 < row["mpand"] < 0 and row["mpand_level_1"] < 0 and row["mpand_level_2"] < 0
            assert math.isclose(row["mpand"], (row["mpand_level_1"] + row["mpand_level_2"]) / 2)
            assert row["mpand_absolute"] < 0 and row["attention_l1"] > 0
            assert 0 < row["alpha_q10"] <= row["alpha_q50"] <= row["alpha_q90"] < 1
            assert row["attention_l1_vs_init"] == pytest.approx(row["attention_l1"] / initial["attention_l1"])
    if model == "sparse_attention_unet":  # the penalty is part of the training loss
        assert history[0]["train_loss"] > history[0]["train_reconstruction_loss"]
    else:
        assert history[0]["train_loss"] == history[0]["train_reconstruction_loss"]


def _validate_fixed_weights(config):
    """A worker function that validates fixed weights with the real validation code and reports it."""
    import ray.train.torch

    from ray_jobs.config import TrainConfig
    from ray_jobs.data import ValidationBatches, configure_data_context
    from ray_jobs.worker import validate

    configure_data_context()  # as the training worker does
    cfg = TrainConfig(**config["train"])
    torch.manual_seed(123)
    model = ray.train.torch.prepare_model(build_model(cfg.model, **cfg.model_hparams()))
    context = ray.train.get_context()
    batches = ValidationBatches(config["data"], cfg, context.get_world_rank(), context.get_world_size())
    return validate(model, cfg, batches, ray.train.torch.get_device())


def test_validation_metrics_equal_for_one_and_two_workers_and_fastmri(ray_local, tiny_root, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = _cfg(tiny_root, model="attention_unet")
    data = prepare_data(cfg, tiny_root)
    metrics = {}
    for workers in (1, 2):
        trainer = TorchTrainer(
            _validate_fixed_weights,
            train_loop_config={"train": cfg.model_dump(mode="json"), "data": data},
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name=f"validate-{workers}", storage_path=str(tmp_path)),
        )
        metrics[workers] = trainer.fit().return_value
    for key in (
        "nmse",
        "psnr",
        "ssim",
        "val_loss",
        "mpand",
        "mpand_level_1",
        "mpand_level_2",
        "attention_l1",
    ):
        # Ranks form different batches, and float32 convolutions round differently with batch size (about
        # 1e-7 relative on the outputs), so "equal" means equal to float32 precision, not bit for bit.
        assert metrics[1][key] == pytest.approx(metrics[2][key], rel=1e-6), key

    # Independent reference: fastMRI's own transform and evaluate.py on whole volumes, same weights.
    reference = _fastmri_reference(cfg, tiny_root, seed=123)
    for key, value in reference.items():
        assert metrics[2][key] == pytest.approx(value, rel=1e-5), key


def _fastmri_reference(cfg, root, seed: int) -> dict[str, float]:
    """The validation metrics of the network ``torch.manual_seed(seed)`` builds, with fastMRI's own
    transform and ``evaluate`` on whole volumes (no Ray, none of our data or metric code)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, **cfg.model_hparams()).eval()
    dataset = SliceDataset(
        root / VAL_SPLIT,
        transform=UnetDataTransform("singlecoil", RandomMaskFunc([0.08], [4])),
        cache_dir="",
    )
    volumes: dict[str, dict[int, tuple[np.ndarray, np.ndarray, float]]] = {}
    with torch.no_grad():
        for sample in dataset:
            output = model(sample.image[None, None])[0, 0] * sample.std + sample.mean
            target = sample.target * sample.std + sample.mean
            volumes.setdefault(sample.fname, {})[sample.slice_num] = (
                output.numpy(),
                target.numpy(),
                sample.max_value,
            )
    per_volume = {"nmse": [], "psnr": [], "ssim": []}
    for slices in volumes.values():
        pred = np.stack([slices[i][0] for i in sorted(slices)])
        gt = np.stack([slices[i][1] for i in sorted(slices)])
        per_volume["nmse"].append(ref_evaluate.nmse(gt, pred))
        per_volume["psnr"].append(ref_evaluate.psnr(gt, pred, maxval=slices[0][2]))
        per_volume["ssim"].append(ref_evaluate.ssim(gt, pred, maxval=slices[0][2]))
    return {key: float(np.mean(values)) for key, values in per_volume.items()}


def _train_worker_pids() -> set[int]:
    """Processes of live Ray Train workers, found by the process title Ray gives actors."""
    import psutil

    pids = set()
    for process in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in process.info["cmdline"] or []):
            pids.add(process.pid)
    return pids


TIMING_KEYS = ("epoch_seconds", "compute_fraction", "train_slices_per_second")


def _numbers(history: list[dict]) -> list[dict]:
    """Every reported value but the timings (NaN as a string, so that equal rows compare equal)."""
    return [
        {
            k: "nan" if isinstance(v, float) and math.isnan(v) else v
            for k, v in row.items()
            if k not in TIMING_KEYS
        }
        for row in history
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_same_configuration_and_seed_give_the_same_numbers(ray_local, tiny_root, tmp_path, workers):
    # Dropout and the local shuffle buffer are the random streams a run has besides its masks.
    cfg = _cfg(tiny_root, model="attention_unet", drop_prob=0.2, num_workers=workers)
    first = history_from_checkpoint(_fit(cfg, tiny_root, tmp_path, "first").checkpoint)
    second = history_from_checkpoint(_fit(cfg, tiny_root, tmp_path, "second").checkpoint)
    assert _numbers(first) == _numbers(second)  # exactly, column by column


def test_killed_worker_resumes_from_checkpoint_and_finishes(ray_local, tiny_root, tmp_path):
    cfg = _cfg(tiny_root, model="unet", epochs=6, max_failures=2, drop_prob=0.2)
    data = prepare_data(cfg, tiny_root)
    trainer = build_trainer(cfg, data, "killed", str(tmp_path))
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", trainer.fit()))
    thread.start()
    run_dir = tmp_path / "killed"
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("checkpoint_*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victims = _train_worker_pids()
    assert victims, "no training worker found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=240)
    result = outcome["result"]
    assert result.error is None
    history = history_from_checkpoint(result.checkpoint)
    assert [row["epoch"] for row in history] == [0, 1, 2, 3, 4, 5, 6], "every epoch exactly once"
    straight = history_from_checkpoint(_fit(cfg, tiny_root, tmp_path, "straight").checkpoint)
    assert _numbers(history) == _numbers(straight), "the resumed run took other steps than the straight one"


def test_a_worker_lost_before_its_first_checkpoint_reports_epoch_0_once(ray_local, tiny_root, tmp_path):
    # The node dies after the untrained network's report and before the first checkpoint: the restarted
    # run starts from scratch, reads its epoch-0 report back instead of making it again, and keeps it in
    # its history (the penalties' ratios to their initial value need it).
    cfg = _cfg(tiny_root, model="sparse_attention_unet", gamma=1e-3, epochs=3, max_failures=2)
    trainer = build_trainer(cfg, prepare_data(cfg, tiny_root), "lost", str(tmp_path))
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", trainer.fit()))
    thread.start()
    run_dir = tmp_path / "lost"
    deadline = time.monotonic() + 120
    while not (run_dir / "epoch_0.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    victims = _train_worker_pids()
    checkpointed = list(run_dir.glob("checkpoint_*"))
    epoch_0 = run_dir / "volumes" / "val-epoch-0000.parquet"
    written = epoch_0.stat().st_mtime_ns
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=240)
    assert victims and not checkpointed, "the worker was not caught between epoch 0 and its first checkpoint"
    result = outcome["result"]
    assert result.error is None
    history = history_from_checkpoint(result.checkpoint)
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    assert all(math.isfinite(row["attention_l1_vs_init"]) for row in history)
    # Epoch 0 was validated (and its files written) once, before the loss.
    assert epoch_0.stat().st_mtime_ns == written and history[0]["attention_l1_vs_init"] == 1.0


def test_same_name_resumes_at_next_epoch(ray_local, tiny_root, tmp_path):
    first = history_from_checkpoint(_fit(_cfg(tiny_root, epochs=2), tiny_root, tmp_path, "again").checkpoint)
    second = history_from_checkpoint(_fit(_cfg(tiny_root, epochs=3), tiny_root, tmp_path, "again").checkpoint)
    assert [row["epoch"] for row in second] == [0, 1, 2, 3]
    assert second[:3] == first, "the finished epochs were trained again instead of resumed"


def test_divergence_ends_the_run_once(ray_local, tiny_root, tmp_path):
    # With max_failures=2 a failure would be retried twice, each retry diverging again. The run ends
    # without an error (so nothing to retry) and without a checkpoint of the diverged epoch.
    cfg = _cfg(tiny_root, lr=1e30, optimizer="adam", max_failures=2, num_workers=2)
    result = _fit(cfg, tiny_root, tmp_path, "diverge")
    assert result.error is None and result.checkpoint is None
    assert not list((tmp_path / "diverge").glob("checkpoint_*"))


def test_the_train_cli_reports_divergence_with_exit_1(ray_local, tiny_root, tmp_path, capsys):
    from ray_jobs.train import main

    code = main(
        ["--profile", "smoke", "--data-root", str(tiny_root), "--storage", str(tmp_path), "--name", "nan",
         "--set", "lr=1e30", "--set", "optimizer=adam"]
    )  # fmt: skip
    assert code == 1
    assert "run 'nan' diverged at epoch 1 (loss NaN or Inf" in capsys.readouterr().out
