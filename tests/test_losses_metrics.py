"""Losses (L1 and the sparsity penalty), fastMRI metrics, the volume accumulator and MPAND."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
from fastmri import evaluate
from torch.nn import functional as F

from mri_models.losses import (
    TrainingLoss,
    attention_sparsity_penalty,
    reconstruction_loss,
    training_loss,
)
from mri_models.metrics import (
    VolumeMetricAccumulator,
    nmse,
    psnr,
    slice_metrics,
    ssim,
)
from mri_models.models import AttentionOutput, AttentionUnet, ImageOutput, UnetOutput

REL = 1e-6


# --- losses ----------------------------------------------------------------------------------------------


def test_reconstruction_loss_is_mean_l1() -> None:
    output = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [5.0, 4.5]])
    # |1| + 0 + |-2| + |-0.5| = 3.5 over 4 pixels.
    assert reconstruction_loss(output, target).item() == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="shape"):
        reconstruction_loss(output[None], target)  # would broadcast silently in F.l1_loss


def test_penalty_on_constructed_constant_maps() -> None:
    m = 2
    maps = (torch.full((m, 1, 4, 4), 0.25), torch.full((m, 1, 8, 8), 0.5), torch.full((m, 1, 2, 3), 1.0))
    # Level sums: 2*16*0.25 = 8, 2*64*0.5 = 64, 2*6*1 = 12; total 84 over m * |L| = 2 * 3.
    assert attention_sparsity_penalty(maps).item() == pytest.approx(84 / 6)
    # Absolute values: a negative map contributes its magnitude.
    assert attention_sparsity_penalty((torch.full((m, 1, 4, 4), -0.25),)).item() == pytest.approx(8 / 2)
    # Batch size divides: the same per-example maps give the same penalty for any m.
    assert attention_sparsity_penalty((torch.full((5, 1, 4, 4), 0.25),)).item() == pytest.approx(4.0)


def test_penalty_rejects_empty_and_inconsistent_maps() -> None:
    with pytest.raises(ValueError, match="at least one"):
        attention_sparsity_penalty(())
    with pytest.raises(ValueError, match="batch size"):
        attention_sparsity_penalty((torch.ones(2, 1, 4, 4), torch.ones(3, 1, 8, 8)))


def _attention_batch(seed: int = 0) -> tuple[AttentionUnet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = AttentionUnet(chans=4, num_pool_layers=2).train()
    return model, torch.randn(2, 1, 20, 24), torch.randn(2, 1, 20, 24)


def test_gamma_zero_is_exactly_the_attention_unet_loss() -> None:
    model, image, target = _attention_batch()
    result = model(image, return_attention=True)
    parts = training_loss(result, target, {"attention_l1": 0.0}, AttentionOutput, log_inactive=True)
    assert isinstance(parts, TrainingLoss)
    assert torch.equal(parts.total, F.l1_loss(result.output, target))
    assert torch.equal(parts.reconstruction, parts.total)
    # The penalty is still reported, detached, for logging.
    assert not parts.penalties["attention_l1"].requires_grad
    expected_penalty = attention_sparsity_penalty(result.attention_maps).item()
    assert parts.penalties["attention_l1"].item() == pytest.approx(expected_penalty)

    parts.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    F.l1_loss(model(image), target).backward()
    for name, p in model.named_parameters():
        assert torch.equal(grads[name], p.grad), name


def test_gamma_positive_adds_the_weighted_penalty_and_trains_the_gates() -> None:
    model, image, target = _attention_batch(seed=1)
    result = model(image, return_attention=True)
    gamma = 0.3
    parts = training_loss(result, target, {"attention_l1": gamma}, AttentionOutput)
    penalty = attention_sparsity_penalty(result.attention_maps)
    torch.testing.assert_close(parts.total, F.l1_loss(result.output, target) + gamma * penalty)
    assert torch.equal(parts.reconstruction, F.l1_loss(result.output, target))
    assert parts.penalties["attention_l1"].item() == pytest.approx(penalty.item())
    assert not parts.penalties["attention_l1"].requires_grad

    # The penalty's share of the gradient on the gates is gamma * d(penalty).
    parts.total.backward()
    with_penalty = model.attention_gates[0].w_x[0].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    plain = model(image, return_attention=True)
    F.l1_loss(plain.output, target).backward()
    without_penalty = model.attention_gates[0].w_x[0].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    attention_sparsity_penalty(model(image, return_attention=True).attention_maps).backward()
    penalty_grad = model.attention_gates[0].w_x[0].weight.grad
    torch.testing.assert_close(with_penalty, without_penalty + gamma * penalty_grad)
    assert penalty_grad.abs().sum() > 0


def test_loss_without_attention_maps() -> None:
    output, target = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    result = UnetOutput(output, (), (), ())  # the plain U-Net's output: no attention maps
    parts = training_loss(result, target, {}, ImageOutput, log_inactive=True)
    assert torch.equal(parts.total, F.l1_loss(output, target))
    assert "attention_l1" not in parts.penalties  # nothing to compute: reported as NaN by the trainer
    with pytest.raises(ValueError, match="AttentionOutput"):
        training_loss(result, target, {"attention_l1": 0.1}, ImageOutput)


@pytest.mark.parametrize("gamma", [-0.1, math.nan, math.inf])
def test_invalid_gamma_is_rejected(gamma: float) -> None:
    result = UnetOutput(torch.zeros(2, 1, 4, 4), (torch.full((2, 1, 4, 4), 0.5),), (), ())
    with pytest.raises(ValueError, match="gamma"):
        training_loss(result, torch.zeros(2, 1, 4, 4), {"attention_l1": gamma}, AttentionOutput)


# --- fastMRI metrics -------------------------------------------------------------------------------------


def _volume_pair(rng: np.random.Generator, slices: int, size: tuple[int, int], dtype: type) -> tuple:
    # Small positive magnitudes like real knee targets (max ~1e-4), with a smooth structure so SSIM is
    # far from both 0 and 1.
    yy, xx = np.meshgrid(np.linspace(-1, 1, size[0]), np.linspace(-1, 1, size[1]), indexing="ij")
    base = np.exp(-(xx**2 + yy**2) * 2)[None] * rng.uniform(0.5, 1.5, (slices, 1, 1))
    gt = (base + 0.1 * rng.random((slices, *size))) * 1e-4
    pred = gt + 1e-5 * rng.standard_normal(gt.shape)
    return gt.astype(dtype), np.abs(pred).astype(dtype)


def _rel_close(actual: float, expected: float, rel: float = REL) -> bool:
    return abs(actual - float(expected)) <= rel * abs(float(expected))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("maxval", [None, 2e-4])
def test_volume_metrics_equal_fastmri_evaluate(dtype: type, maxval: float | None) -> None:
    gt, pred = _volume_pair(np.random.default_rng(0), 4, (32, 36), dtype)
    assert _rel_close(nmse(gt, pred), evaluate.nmse(gt, pred))
    assert _rel_close(psnr(gt, pred, maxval), evaluate.psnr(gt, pred, maxval))
    assert _rel_close(ssim(gt, pred, maxval), evaluate.ssim(gt, pred, maxval).item())
    # Torch tensors give the same numbers.
    assert ssim(torch.from_numpy(gt), torch.from_numpy(pred), maxval) == ssim(gt, pred, maxval)
    assert isinstance(nmse(gt, pred), float) and isinstance(ssim(gt, pred), float)


def test_ssim_uses_the_volume_max_not_the_slice_max() -> None:
    gt, pred = _volume_pair(np.random.default_rng(1), 3, (24, 24), np.float64)
    gt[0] *= 10  # one bright slice sets the data range of all others
    per_slice_max = np.mean([ssim(g[None], p[None]) for g, p in zip(gt, pred, strict=True)])
    assert _rel_close(ssim(gt, pred), evaluate.ssim(gt, pred).item())
    assert not _rel_close(ssim(gt, pred), per_slice_max, rel=1e-3)


def test_volume_metrics_reject_bad_shapes() -> None:
    with pytest.raises(ValueError):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError):
        nmse(np.zeros((1, 8, 8)), np.zeros((1, 8, 9)))


def _reference_metrics(volumes: dict) -> dict:
    """fastmri.evaluate per whole volume with data range gt.max(), averaged over volumes."""
    per_volume = [
        (evaluate.nmse(gt, pred), evaluate.psnr(gt, pred), evaluate.ssim(gt, pred).item())
        for gt, pred in volumes.values()
    ]
    return {key: float(np.mean([v[i] for v in per_volume])) for i, key in enumerate(("nmse", "psnr", "ssim"))}


def test_slice_accumulator_equals_fastmri_evaluate_under_shuffle_split_merge_and_duplicates() -> None:
    rng = np.random.default_rng(2)
    volumes = {
        f"file{i}.h5": _volume_pair(rng, slices, (32, 32), np.float32) for i, slices in enumerate((3, 5, 2))
    }
    records = [
        (
            fname,
            s,
            slice_metrics(torch.from_numpy(pred[s]), torch.from_numpy(gt[s]), float(gt.max())),
            float(gt.max()),
        )
        for fname, (gt, pred) in volumes.items()
        for s in range(gt.shape[0])
    ]
    random.Random(0).shuffle(records)
    # Two "ranks", each padded with duplicates of slices the other one also holds (DistributedSampler).
    rank0, rank1 = records[: len(records) // 2], records[len(records) // 2 :]
    rank0 = rank0 + rank1[:2]
    rank1 = rank1 + rank0[:1] + rank1[:1]
    accumulators = [VolumeMetricAccumulator(), VolumeMetricAccumulator()]
    for accumulator, shard in zip(accumulators, (rank0, rank1), strict=True):
        for record in shard:
            accumulator.add(*record)
    merged = VolumeMetricAccumulator()
    for accumulator in accumulators:
        merged.merge(pickle.loads(pickle.dumps(accumulator.state())))  # as gathered between processes
    assert len(merged) == 10

    result, reference = merged.compute(), _reference_metrics(volumes)
    assert result["num_volumes"] == 3
    for key in ("nmse", "psnr", "ssim"):
        assert _rel_close(result[key], reference[key]), key

    # A single accumulator fed in order, and merging in the other order, agree exactly.
    single = VolumeMetricAccumulator()
    for record in sorted(records, key=lambda r: (r[0], r[1])):
        single.add(*record)
    reverse = VolumeMetricAccumulator.from_state(accumulators[1].state())
    reverse.merge(accumulators[0])
    assert single.compute() == pytest.approx(result, rel=1e-12)
    assert reverse.compute() == pytest.approx(result, rel=1e-12)


def test_volume_metrics_are_averaged_per_volume_not_per_slice() -> None:
    rng = np.random.default_rng(3)
    # A 1-slice volume with a large error and a 4-slice volume with a small one: per-slice averaging
    # would weigh the second volume four times as much.
    bad = _volume_pair(rng, 1, (16, 16), np.float64)
    good_gt = _volume_pair(rng, 4, (16, 16), np.float64)[0]
    volumes = {"bad.h5": (bad[0], bad[1] * 1.5), "good.h5": (good_gt, good_gt * 1.01)}
    accumulator = VolumeMetricAccumulator()
    for fname, (gt, pred) in volumes.items():
        for s in range(gt.shape[0]):
            accumulator.add(fname, s, slice_metrics(pred[s], gt[s], gt.max()), gt.max())
    result = accumulator.compute()
    reference = _reference_metrics(volumes)
    for key in ("nmse", "psnr", "ssim"):
        assert _rel_close(result[key], reference[key]), key


def test_slice_metrics_values_and_shapes() -> None:
    target = np.full((1, 8, 8), 2.0, dtype=np.float32)
    output = np.full((8, 8), 1.0, dtype=np.float32)
    metrics = slice_metrics(output, target, max_value=2.0)
    assert set(metrics) == {"mse", "target_sq", "ssim"}  # the statistics of fastMRI's three metrics
    assert metrics["mse"] == pytest.approx(1.0) and metrics["target_sq"] == pytest.approx(4.0)
    assert all(isinstance(v, float) for v in metrics.values())
    with pytest.raises(ValueError, match="one slice"):
        slice_metrics(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), 1.0)


def test_accumulator_edge_cases() -> None:
    accumulator = VolumeMetricAccumulator()
    result = accumulator.compute()
    assert result["num_volumes"] == 0 and math.isnan(result["nmse"])
    accumulator.add("a.h5", 0, {"mse": 0.0, "target_sq": 1.0, "ssim": 1.0}, 1.0)
    assert accumulator.compute()["psnr"] == math.inf  # perfect reconstruction, as log10(0) in fastMRI
    with pytest.raises(ValueError, match="max value"):
        accumulator.add("a.h5", 1, {"mse": 0.1, "target_sq": 1.0, "ssim": 0.9}, 2.0)


