"""The winning model as a product, on a real finished sweep: export, reconstruct on Ray Data, fastMRI's own
evaluation, Ray Tune's own tools, and a trial replayed alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from fastmri import evaluate as fastmri_evaluate
from fastmri.models import Unet as FastmriUnet

from analysis.fastmri_evaluate import evaluate as fastmri_evaluation
from mri_models.data.transforms import volume_mask_seed
from mri_models.package import WEIGHTS_FILE, read_manifest
from mri_models.reconstruct import RECONSTRUCTION_KEY, MaskSetting
from ray_jobs import export, predict
from tests.conftest import DriverProcess

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], env={**env, "TQDM_DISABLE": "1"}, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)  # fmt: skip
    return done


@pytest.fixture(scope="module")
def sweep(ray_head, tmp_path_factory) -> Path:
    """A finished smoke model comparison of the U-Net and the Attention U-Net (one seed, 2 epochs)."""
    storage = tmp_path_factory.mktemp("best_model")
    script = str(REPO / "sweeps" / "model_comparison.py")
    command = [sys.executable, script, "--profile", "smoke", "--storage", str(storage), "--name", "mc",
               "--set", "search.model=[unet,attention_unet]"]  # fmt: skip
    driver = DriverProcess(command, ray_head.env, storage / "driver.log")
    out = driver.output(timeout=600)
    assert driver.returncode == 0, out[-4000:]
    return storage / "mc"


def _data_root(sweep: Path) -> Path:
    return Path(json.loads((sweep / "sweep.json").read_text())["data_root"])


def _predict(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return _run(env, "-m", "ray_jobs.predict", *args)


def _here(capsys, main, *args: str) -> SimpleNamespace:
    """A command line's ``main`` run in this process: its exit code and what it printed."""
    capsys.readouterr()
    code = main(list(args))
    printed = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=printed.out, stderr=printed.err)


def _export(ray_head, sweep: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(ray_head.env, "-m", "ray_jobs.export", "--experiment", str(sweep), "--out", str(out), *args)


def _val_ssim(sweep: Path, trial_id: str) -> float:
    record = json.loads((sweep / "train_runs" / trial_id / "test_evaluation.json").read_text())
    return record["selected_val_ssim"]


def test_export_the_best_and_reconstruct_what_the_final_evaluation_scored(ray_head, sweep, tmp_path):
    trials = sorted(p.name for p in (sweep / "train_runs").iterdir())
    best = max(trials, key=lambda t: _val_ssim(sweep, t))
    done = _export(ray_head, sweep, tmp_path / "best", "--best")
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = read_manifest(str(tmp_path / "best"))
    assert manifest.selection["trial_id"] == best and "validation" in manifest.selection["chosen_by"]
    assert manifest.data["train_files"] == 4 and len(manifest.data["train_fingerprint"]) == 64
    # The selected epoch's validation numbers, beside the zero-filled input's on the same volumes.
    record = json.loads((sweep / "train_runs" / best / "test_evaluation.json").read_text())
    assert manifest.selection["epoch"] == record["selected_epoch"] and manifest.test == record
    assert manifest.validation["ssim"] == record["selected_val_ssim"]
    baseline = json.loads((sweep / "baseline.json").read_text())["baselines"][0]["metrics"]
    assert manifest.validation["zero_filled"] == {k: baseline[k] for k in ("nmse", "psnr", "ssim")}
    # The U-Net's package, chosen by arm, is fastMRI's U-Net with strict keys.
    done = _export(ray_head, sweep, tmp_path / "unet", "--best", "--arm", "unet")
    assert done.returncode == 0, done.stdout + done.stderr
    unet = read_manifest(str(tmp_path / "unet"))
    reference = FastmriUnet(in_chans=1, out_chans=1, **unet.hparams)
    reference.load_state_dict(torch.load(tmp_path / "unet" / WEIGHTS_FILE, weights_only=True), strict=True)

    # Reconstruct the test volumes at 4x through Ray Data, and in this process: the same images.
    test_root = _data_root(sweep) / "singlecoil_test"
    args = ["--model", str(tmp_path / "unet"), "--data-root", str(test_root), "--acceleration", "4"]
    done = _predict(ray_head.env, *args, "--out", str(tmp_path / "ray"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reconstructing 2 of 2 volumes" in done.stdout and "volumes/s" in done.stdout
    done = _predict(ray_head.env, *args, "--out", str(tmp_path / "local"), "--in-process")
    assert done.returncode == 0, done.stdout + done.stderr
    for path in sorted((tmp_path / "ray").glob("*.h5")):
        with h5py.File(path) as a, h5py.File(tmp_path / "local" / path.name) as b:
            assert a[RECONSTRUCTION_KEY].dtype == np.float32
            assert np.array_equal(a[RECONSTRUCTION_KEY][()], b[RECONSTRUCTION_KEY][()])

    # fastMRI's own evaluation of the files equals what the final evaluation reported for those volumes.
    table = pd.read_parquet(sweep / "train_runs" / unet.selection["trial_id"] / "volumes" / "test.parquet")
    rows = table[(table["source"] == "network") & (table["acceleration"] == 4)].set_index("file")
    for path in sorted((tmp_path / "ray").glob("*.h5")):
        with h5py.File(test_root / path.name) as hf, h5py.File(path) as recon:
            target, output = hf["reconstruction_esc"][()], recon[RECONSTRUCTION_KEY][()]
        for name, func in (("nmse", fastmri_evaluate.nmse), ("psnr", fastmri_evaluate.psnr),
                           ("ssim", fastmri_evaluate.ssim)):  # fmt: skip
            theirs = np.asarray(func(target, output)).item()  # fastMRI computes NMSE in float32
            assert theirs == pytest.approx(rows.loc[path.name, name], rel=1e-5), (path.name, name)
    # fastMRI's evaluate() and its summary line, through the command that runs them under NumPy 2.
    means = fastmri_evaluation(test_root, tmp_path / "ray").means()
    cli = _run(ray_head.env, "-m", "analysis.fastmri_evaluate", "--target-path", str(test_root),
               "--predictions-path", str(tmp_path / "ray"), "--challenge", "singlecoil")  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    printed = dict(re.findall(r"(\w+) = ([-\d.e+]+) \+/-", cli.stdout))
    for name in ("NMSE", "PSNR", "SSIM"):
        ours = rows[name.lower()].mean()
        assert means[name] == pytest.approx(ours, rel=1e-5), name
        assert printed[name] == format(ours, ".4g"), (name, cli.stdout)  # to printing precision


def test_as_acquired_files_batches_resume_and_bad_roots(sweep, tmp_path, capsys):
    # In this process (the command lines' main functions): no Ray is needed, and each saves a start-up.
    done = _here(capsys, export.main, "--experiment", str(sweep), "--best", "--out", str(tmp_path / "pkg"))
    assert done.returncode == 0, done.stdout
    test_root = _data_root(sweep) / "singlecoil_test"
    # fastMRI's test layout: the k-space under-sampled with the volume's fixed 4x mask, the mask, no target.
    acquired = tmp_path / "singlecoil_test"
    acquired.mkdir()
    setting = MaskSetting("random", 4, 0.08)
    for path in sorted(test_root.glob("*.h5")):
        with h5py.File(path) as src, h5py.File(acquired / path.name, "w") as dst:
            kspace = src["kspace"][()]
            mask = setting.mask_func()((1, kspace.shape[-1], 1), None, volume_mask_seed(path.name))[0]
            mask = mask.numpy().reshape(-1).astype(bool)
            dst["kspace"] = (kspace * mask).astype(np.complex64)
            dst["mask"] = mask
            dst["ismrmrd_header"] = src["ismrmrd_header"][()]
            for key in ("acquisition", "patient_id"):
                dst.attrs[key] = src.attrs[key]
            dst.attrs["acceleration"] = 4
    model = ["--model", str(tmp_path / "pkg"), "--in-process"]
    masked = _here(capsys, predict.main, *model, "--data-root", str(test_root), "--out",
                  str(tmp_path / "masked"), "--acceleration", "4")  # fmt: skip
    as_acquired = _here(capsys, predict.main, *model, "--data-root", str(acquired), "--out",
                       str(tmp_path / "acquired"), "--as-acquired")  # fmt: skip
    assert masked.returncode == 0 and as_acquired.returncode == 0, masked.stdout + as_acquired.stdout
    assert "no target in these files" in as_acquired.stdout
    batched = _here(capsys, predict.main, *model, "--data-root", str(test_root), "--out",
                   str(tmp_path / "batched"), "--acceleration", "4", "--batch-size", "3")  # fmt: skip
    assert batched.returncode == 0, batched.stdout
    for path in sorted((tmp_path / "masked").glob("*.h5")):
        with h5py.File(path) as a, h5py.File(tmp_path / "acquired" / path.name) as b:
            # The same k-space up to the sign of zeros: the same images.
            np.testing.assert_allclose(b[RECONSTRUCTION_KEY][()], a[RECONSTRUCTION_KEY][()], rtol=1e-6)
        with h5py.File(path) as a, h5py.File(tmp_path / "batched" / path.name) as b:
            peak = float(np.abs(a[RECONSTRUCTION_KEY][()]).max())
            np.testing.assert_allclose(b[RECONSTRUCTION_KEY][()], a[RECONSTRUCTION_KEY][()], atol=1e-4 * peak)

    # Resume: a removed output is made again, the others are left as they are.
    outputs = sorted((tmp_path / "masked").glob("*.h5"))
    kept = {p.name: p.stat().st_mtime_ns for p in outputs[1:]}
    outputs[0].unlink()
    again = _here(capsys, predict.main, *model, "--data-root", str(test_root), "--out",
                 str(tmp_path / "masked"), "--acceleration", "4")  # fmt: skip
    assert again.returncode == 0 and "reconstructing 1 of 2 volumes (1 written already)" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in outputs[1:]} == kept and outputs[0].exists()
    # Another setting into the same directory would overwrite: refused in one line, nothing touched.
    other = _here(capsys, predict.main, *model, "--data-root", str(test_root), "--out",
                 str(tmp_path / "masked"), "--acceleration", "8")  # fmt: skip
    assert other.returncode == 2 and "written by another model or mask setting" in other.stdout
    assert other.stdout.strip().count("\n") == 0
    assert {p.name: p.stat().st_mtime_ns for p in outputs[1:]} == kept

    # A data root of the wrong shape, and a setting that does not fit the files, fail in one line.
    for root, extra, message in (
        (_data_root(sweep), ["--acceleration", "4"], "no .h5 files (it holds singlecoil_test, singlecoil_"),
        (test_root, ["--as-acquired"], "has no 'mask'"),
        (acquired, ["--acceleration", "4"], "carries a 'mask'"),
    ):
        bad = _here(capsys, predict.main, *model, "--data-root", str(root), "--out",
                   str(tmp_path / "bad"), *extra)  # fmt: skip
        assert bad.returncode == 2 and message in bad.stdout, bad.stdout
        assert bad.stdout.strip().count("\n") == 0, bad.stdout
        assert "Traceback" not in bad.stdout + bad.stderr and not (tmp_path / "bad").exists()


def test_reconstructions_to_object_storage(ray_head, sweep, tmp_path, s3_server):
    done = _export(ray_head, sweep, tmp_path / "pkg", "--best")
    assert done.returncode == 0, done.stdout + done.stderr
    bucket = s3_server.create_bucket("recon")
    env = {**ray_head.env, **s3_server.env}
    test_root = _data_root(sweep) / "singlecoil_test"
    done = _predict(env, "--model", str(tmp_path / "pkg"), "--data-root", str(test_root),
                "--out", f"{bucket}/knee", "--acceleration", "4", "--in-process")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    fs = s3_server.filesystem()
    names = sorted(p.name for p in test_root.glob("*.h5"))
    for name in names:
        with fs.open_input_file(f"recon/knee/{name}") as f, h5py.File(f, "r") as hf:
            assert hf[RECONSTRUCTION_KEY].shape[0] == 4


def test_ray_tune_opens_the_sweep_and_finds_the_best_checkpoint(ray_local, sweep, tmp_path):
    from ray import tune

    from ray_jobs.checkpoints import history_from_checkpoint
    from ray_jobs.tune import result_checkpoint, run_trial

    analysis = tune.ExperimentAnalysis(str(sweep), default_metric="ssim", default_mode="max")
    assert len(analysis.trials) == 2
    trial = analysis.get_best_trial(scope="all")
    frame = analysis.trial_dataframes[trial.trial_id]
    row = frame.loc[frame["ssim"].idxmax()].to_dict()  # the best epoch of the best trial
    checkpoint = result_checkpoint(row, str(sweep))
    assert checkpoint is not None and history_from_checkpoint(checkpoint)[-1]["epoch"] == row["epoch"]
    # Tuner.restore, as a Tune user opens a finished experiment; the checkpoint found after a move too.
    moved = tmp_path / "moved"
    os.rename(sweep, moved)
    try:
        grid = tune.Tuner.restore(str(moved), trainable=run_trial).get_results()
        assert len(grid) == 2 and not grid.errors
        top = grid.get_best_result(metric="ssim", mode="max", scope="all")
        assert top.metrics["trial_id"] == trial.trial_id
        rows = top.metrics_dataframe
        found = result_checkpoint(rows.loc[rows["ssim"].idxmax()].to_dict(), str(moved))
        assert found is not None and found.path.startswith(str(moved))
        assert history_from_checkpoint(found)[-1]["epoch"] == row["epoch"]
    finally:
        os.rename(moved, sweep)


def test_a_trial_replayed_alone_equals_the_sweep(ray_head, sweep, tmp_path):
    trial = sorted(p.name for p in (sweep / "train_runs").iterdir())[0]
    replay = ["-m", "ray_jobs.train", "--storage", str(tmp_path), "--replay"]
    done = _run(ray_head.env, *replay, f"{sweep}/{trial}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "reproduced: epochs 0-2" in done.stdout
    again = _run(ray_head.env, *replay, f"{sweep}/{trial}")
    assert again.returncode == 2 and "a replay starts fresh" in again.stdout
    missing = _run(ray_head.env, *replay, f"{sweep}/nosuch")
    assert missing.returncode == 2 and "no such trial" in missing.stdout
