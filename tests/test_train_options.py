"""The GPU-ready training options on a real local Ray (CPU): each trains to finite metrics close to fp32
eager with the same seed, and a run with all of them resumes from its own checkpoint.

What "close" means: the options change only float rounding (bf16 keeps 8 mantissa bits, fp16 11; the fast
and trainer-side transforms differ from fastMRI's by ~1e-7 of the image's range; compile reorders float
operations), so after the same two epochs on the same slices and masks the validation SSIM stays within
0.02 of fp32 eager's, where the zero-filled input and the trained networks differ by ~0.1. Loss and
metrics are computed in float32 whatever the step's precision.
"""

from __future__ import annotations

import math

import pytest

from ray_jobs.checkpoints import history_from_checkpoint
from ray_jobs.config import make_train_config
from ray_jobs.data import prepare_data
from ray_jobs.trainer import build_trainer

pytestmark = pytest.mark.slow

SSIM_TOLERANCE = 0.02


def _history(root, storage, name, **options) -> list[dict]:
    cfg = make_train_config({
        "data_root": root, "model": "sparse_attention_unet", "gamma": 1e-4, "chans": 4, "num_pool_layers": 2,
        "batch_size": 2, "epochs": 2, "lr": 1e-3, "cpus_per_worker": 1, "max_failures": 0, **options,
    })  # fmt: skip
    result = build_trainer(cfg, prepare_data(cfg, root), name, str(storage)).fit()
    assert result.error is None, result.error
    return history_from_checkpoint(result.checkpoint)


@pytest.fixture(scope="module")
def fp32_eager(ray_local, tiny_root, tmp_path_factory) -> list[dict]:
    return _history(tiny_root, tmp_path_factory.mktemp("fp32"), "fp32")


@pytest.mark.parametrize(
    "options",
    [
        {"precision": "bf16", "channels_last": True},
        {"precision": "fp16"},
        {"compile": True},
        {"transform": "fast", "transform_on": "trainer"},
    ],
    ids=["bf16-channels_last", "fp16", "compile", "trainer_transform"],
)
def test_option_trains_close_to_fp32_eager(fp32_eager, tiny_root, tmp_path, options):
    history = _history(tiny_root, tmp_path, "optioned", **options)
    assert [row["epoch"] for row in history] == [0, 1, 2]  # epoch 0: the untrained network, validated
    for ours, reference in zip(history[1:], fp32_eager[1:], strict=True):
        assert all(math.isfinite(ours[key]) for key in ("train_loss", "val_loss", "ssim", "psnr", "nmse"))
        assert abs(ours["ssim"] - reference["ssim"]) < SSIM_TOLERANCE, (ours["ssim"], reference["ssim"])
        assert ours["train_loss"] == pytest.approx(reference["train_loss"], rel=0.1)


def test_all_options_resume_from_their_checkpoint(ray_local, tiny_root, tmp_path):
    options = {"precision": "fp16", "channels_last": True, "compile": True, "transform": "fast",
               "transform_on": "trainer"}  # fmt: skip
    first = _history(tiny_root, tmp_path, "resumed", **options, epochs=1)
    second = _history(tiny_root, tmp_path, "resumed", **options, epochs=2)
    assert [row["epoch"] for row in second] == [0, 1, 2]
    assert second[:2] == first, "the finished epoch was trained again instead of resumed"
    assert math.isfinite(second[2]["ssim"])
