"""The held-out test split: chosen by patient, never read while training selects, and scored as fastMRI does.

The final evaluation is checked against fastMRI's own package: its ``SliceDataset`` and ``UnetDataTransform``
with its ``RandomMaskFunc`` (fixed per-volume seeds) reconstruct the test volumes with the selected
checkpoint's weights, and ``fastmri.evaluate`` scores them, at 4x and 8x.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from fastmri import evaluate as ref_evaluate
from fastmri.data import subsample as ref_subsample
from fastmri.data import transforms as ref_transforms
from fastmri.data.mri_data import SliceDataset as RefSliceDataset

from mri_models import experiment, storage
from mri_models.data.slice_dataset import list_volumes
from mri_models.models import build_model
from ray_jobs.config import ConfigError, make_train_config
from ray_jobs.data import VAL_SPLIT, prepare_data
from ray_jobs.final_evaluation import evaluate_runs, pending
from ray_jobs.splits import split_by_patient
from ray_jobs.trainer import build_trainer
from tests.conftest import make_fastmri_volume


def _cfg(root: Path, **overrides):
    values = {"data_root": str(root), "chans": 4, "num_pool_layers": 2, "batch_size": 2, "epochs": 2,
              "lr": 1e-3, "cpus_per_worker": 0.5, "max_failures": 0, "image_every_epochs": 0,
              **overrides}  # fmt: skip
    return make_train_config(values)


def _val_root(tmp_path: Path, patients: list[str]) -> Path:
    """A root without a test split whose validation volumes belong to ``patients`` (two volumes each)."""
    make_fastmri_volume(tmp_path / "singlecoil_train" / "train0.h5", num_slices=4, seed=1)
    make_fastmri_volume(tmp_path / "singlecoil_train" / "train1.h5", num_slices=4, seed=2)
    for i, patient in enumerate(p for p in patients for _ in range(2)):
        path = make_fastmri_volume(tmp_path / "singlecoil_val" / f"val{i:02d}.h5", num_slices=2, seed=10 + i)
        with h5py.File(path, "r+") as hf:
            hf.attrs["patient_id"] = patient
    return tmp_path


def test_validation_is_split_by_patient_stably_and_disjointly(tmp_path):
    patients = [f"patient-{i}" for i in range(7)]
    root = _val_root(tmp_path, patients)
    data = prepare_data(_cfg(root), root)  # no singlecoil_test: "auto" splits validation
    assert data.test_source == "half of singlecoil_val by patient"
    val_files, test_files = {p for p, _ in data.val_slices}, {p for p, _ in data.test_slices}
    patient = {str(v.fname): v.metadata["patient_id"] for v in list_volumes(root / VAL_SPLIT)}
    assert val_files | test_files == set(patient) and not val_files & test_files
    assert not {patient[f] for f in val_files} & {patient[f] for f in test_files}  # no patient on both sides
    assert len({patient[f] for f in val_files}) == 4 and len({patient[f] for f in test_files}) == 3
    # The same halves whatever the order of the listing.
    volumes = list_volumes(root / VAL_SPLIT)
    kept, _ = split_by_patient(volumes)
    for _ in range(5):
        random.Random(_).shuffle(volumes)
        again = split_by_patient(volumes)
        assert {str(v.fname) for v in again[0]} == {str(v.fname) for v in kept}
    assert data.roles()["test"] == sorted(test_files)
    # Asked for explicitly, a split without targets is refused before any training.
    with pytest.raises(ConfigError, match=r"no \.h5 files"):
        prepare_data(_cfg(root, test_split="singlecoil_test"), root)
    assert not prepare_data(_cfg(root, test_split="none"), root).test_slices


def test_one_patient_cannot_be_split(tmp_path):
    root = _val_root(tmp_path, ["only-one"])
    with pytest.raises(ConfigError, match="single patient cannot be split"):
        prepare_data(_cfg(root), root)


def _fastmri_volumes(root: Path, network, fraction: float, acceleration: int) -> dict[str, dict[str, float]]:
    """fastMRI's transform and evaluate.py on the test split: per volume, the network's and zero-filled."""
    transform = ref_transforms.UnetDataTransform(
        "singlecoil", mask_func=ref_subsample.RandomMaskFunc([fraction], [acceleration]), use_seed=True
    )
    dataset = RefSliceDataset(root / "singlecoil_test", transform=transform, challenge="singlecoil")
    slices: dict[str, dict[int, tuple]] = {}
    with torch.no_grad():
        for sample in dataset:
            mean, std = sample.mean, sample.std
            output = network(sample.image[None, None])[0, 0] * std + mean
            slices.setdefault(sample.fname, {})[sample.slice_num] = (
                output.numpy(), (sample.image * std + mean).numpy(), (sample.target * std + mean).numpy(),
                sample.max_value,
            )  # fmt: skip
    out = {}
    for fname, by_slice in slices.items():
        ordered = [by_slice[i] for i in sorted(by_slice)]
        # Scored as fastmri.evaluate scores a submission: against the target as the file stores it (the
        # transform's target is clamped to 6 standard deviations of the input).
        with h5py.File(root / "singlecoil_test" / fname) as hf:
            target = hf["reconstruction_esc"][()]
        maxval = ordered[0][3]
        assert maxval == target.max()
        for source, index in (("network", 0), ("zero_filled", 1)):
            pred = np.stack([s[index] for s in ordered])
            out[(source, fname)] = {
                "nmse": ref_evaluate.nmse(target, pred),
                "psnr": ref_evaluate.psnr(target, pred, maxval=maxval),
                "ssim": ref_evaluate.ssim(target, pred, maxval=maxval),
            }
    return out


@pytest.mark.slow
def test_final_evaluation_reads_the_test_split_only_afterwards_and_equals_fastmri(
    ray_local, tiny_root, tmp_path
):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    cfg = _cfg(root)
    data = prepare_data(cfg, root)
    assert data.test_source.startswith("singlecoil_test") and len(data.test_slices) == 6
    # While the run trains and selects, every test file is garbage: a single read of one would fail it.
    originals = {path: path.read_bytes() for path in (root / "singlecoil_test").glob("*.h5")}
    for path in originals:
        path.write_bytes(b"not an HDF5 file")
    result = build_trainer(cfg, data, "run", str(tmp_path / "runs")).fit()
    assert result.error is None
    for path, content in originals.items():
        path.write_bytes(content)
    run = experiment.RunLayout(str(tmp_path / "runs" / "run"))
    item = pending(cfg, run, data)
    history = storage.read_json(storage.join(item.selected.path, experiment.HISTORY_FILE))
    trained = [h for h in history if h["epoch"] >= 1]  # epoch 0, the untrained network, is not a choice
    assert item.selected.epoch == max(trained, key=lambda h: h["ssim"])["epoch"]  # chosen on validation
    evaluate_runs([item], data, use_gpu=False)
    assert pending(cfg, run, data) is None  # evaluated once: a second pass has nothing to do

    record = storage.read_json(run.test_evaluation_file)
    table = pd.read_parquet(run.test_volumes_file)
    assert record["selected_epoch"] == item.selected.epoch and set(table["epoch"]) == {item.selected.epoch}
    network = build_model(cfg.model, **cfg.model_hparams())
    state = torch.load(Path(item.selected.path) / experiment.CHECKPOINT_FILE, weights_only=True)
    network.load_state_dict(state["model"])
    network.eval()
    for setting in record["settings"]:
        rows = table[table["acceleration"] == setting["acceleration"]]
        assert len(rows) == 4 and set(rows["acquisition"]) == {"CORPD_FBK", "CORPDFS_FBK"}
        for source in ("network", "zero_filled"):
            mine = rows[rows["source"] == source]
            for metric in ("nmse", "psnr", "ssim"):  # the per-volume rows make the reported means exactly
                assert setting[source][metric] == float(mine[metric].mean())
        reference = _fastmri_volumes(root, network, setting["center_fraction"], setting["acceleration"])
        for _, row in rows.iterrows():
            expected = reference[(row["source"], row["file"])]
            for metric in ("nmse", "psnr", "ssim"):
                # The fast transform equals fastMRI's within float32 rounding of the network input.
                close = pytest.approx(expected[metric], rel=1e-4, abs=1e-5)
                assert row[metric] == close, (row["file"], metric)
    # Validation wrote one row per volume and epoch, which aggregate to the epoch's reported metrics.
    for epoch in history:
        val = pd.read_parquet(run.val_volumes_file(epoch["epoch"]))
        assert len(val) == 3 and set(val["split"]) == {"val"}
        assert float(val["ssim"].mean()) == pytest.approx(epoch["ssim"], rel=1e-12)
