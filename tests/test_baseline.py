"""The zero-filled baseline against ``fastmri.evaluate`` on fastMRI's zero-filled volumes, and its cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastmri import evaluate as ref_evaluate
from fastmri.data import mri_data as ref_data
from fastmri.data import subsample as ref_subsample
from fastmri.data import transforms as ref_transforms

from mri_models.data import synthetic
from ray_jobs.baseline import zero_filled_baseline
from ray_jobs.config import make_train_config
from ray_jobs.data import VAL_SPLIT, prepare_data


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MRI_MODELS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fastmri_zero_filled(val_dir, center_fractions, accelerations) -> dict[str, float]:
    """fastMRI's SliceDataset + UnetDataTransform (fixed validation masks), un-normalised as its MriModule
    un-normalises the network's output, the input standing in for the output; evaluate.py per volume."""
    mask = ref_subsample.RandomMaskFunc(center_fractions, accelerations)
    dataset = ref_data.SliceDataset(
        val_dir, "singlecoil", transform=ref_transforms.UnetDataTransform("singlecoil", mask, use_seed=True)
    )
    volumes: dict[str, dict[int, tuple]] = {}
    for sample in dataset:
        zero_filled = (sample.image * sample.std + sample.mean).numpy()
        target = (sample.target * sample.std + sample.mean).numpy()
        volumes.setdefault(sample.fname, {})[sample.slice_num] = (zero_filled, target, sample.max_value)
    per_volume: dict[str, list[float]] = {"nmse": [], "psnr": [], "ssim": []}
    for slices in volumes.values():
        pred = np.stack([slices[i][0] for i in sorted(slices)])
        gt = np.stack([slices[i][1] for i in sorted(slices)])
        maxval = slices[0][2]
        per_volume["nmse"].append(ref_evaluate.nmse(gt, pred))
        per_volume["psnr"].append(ref_evaluate.psnr(gt, pred, maxval=maxval))
        per_volume["ssim"].append(ref_evaluate.ssim(gt, pred, maxval=maxval))
    return {key: float(np.mean(values)) for key, values in per_volume.items()} | {"num_volumes": len(volumes)}


@pytest.mark.parametrize(("fractions", "accelerations"), [((0.08,), (4,)), ((0.04,), (8,))])
def test_baseline_equals_fastmri_evaluate_on_zero_filled_volumes(
    tmp_path, cache_dir, fractions, accelerations
):
    root = tmp_path / "data"
    synthetic.generate_dataset(
        root, num_train=1, num_val=3, num_slices=4, recon_size=(64, 64), kspace_size=(128, 74), seed=3,
        num_test=2,
    )
    cfg = make_train_config(
        {"chans": 4, "num_pool_layers": 2, "center_fractions": fractions, "accelerations": accelerations}
    )
    ours = zero_filled_baseline(prepare_data(cfg, root), cfg)
    reference = _fastmri_zero_filled(root / VAL_SPLIT, list(fractions), list(accelerations))
    assert ours["metrics"]["num_volumes"] == reference["num_volumes"] == 3
    for key in ("nmse", "psnr", "ssim"):
        assert ours["metrics"][key] == pytest.approx(reference[key], rel=1e-6), key
        # The recorded per-volume rows make the recorded means exactly (the analysis's zero-filled rows).
        assert ours["metrics"][key] == float(np.mean([volume[key] for volume in ours["volumes"]]))
    assert ours["mask"]["accelerations"] == list(accelerations)


def test_baseline_is_cached_per_data_and_mask(fastmri_root, cache_dir):
    cfg = make_train_config({"chans": 4, "num_pool_layers": 2})
    data = prepare_data(cfg, fastmri_root)
    first = zero_filled_baseline(data, cfg)
    [cached] = list((cache_dir / "baselines").glob("*.json"))
    marked = json.loads(cached.read_text())
    marked["metrics"]["ssim"] = -1.0
    cached.write_text(json.dumps(marked))
    assert zero_filled_baseline(data, cfg)["metrics"]["ssim"] == -1.0  # read from the cache, not recomputed
    other = make_train_config(
        {"chans": 4, "num_pool_layers": 2, "accelerations": [8], "center_fractions": [0.04]}
    )
    assert zero_filled_baseline(data, other)["metrics"]["ssim"] != first["metrics"]["ssim"]
    assert len(list((cache_dir / "baselines").glob("*.json"))) == 2
