"""Bad configurations and data stop `python -m ray_jobs.train` with a clear message before any Ray work."""

from __future__ import annotations

import subprocess
import sys

import h5py
import pytest

from mri_models.models import build_model
from ray_jobs.train import main


@pytest.fixture
def storage(tmp_path):
    return tmp_path / "results"


def _run(capsys, storage, *args):
    code = main(["--profile", "smoke", "--storage", str(storage), *args])
    return code, capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "model=vit"],
            "model: Input should be 'unet', 'attention_unet' or 'sparse_attention_unet'",
        ),
        (
            ["--model", "sparse_attention_unet", "--gamma", "-0.1"],
            "gamma: Input should be greater than or equal to 0",
        ),
        (["--set", "drop_prob=1.0"], "drop_prob: Input should be less than 1"),
        (["--set", "drop_prob=-0.2"], "drop_prob: Input should be greater than or equal to 0"),
        (["--model", "unet", "--gamma", "0.1"], "gamma=0.1 only applies to sparse_attention_unet"),
        (["--set", "num_pool_layers=5"], "num_pool_layers=5 is too deep for 32x32 images"),
        (["--set", "lerning_rate=1"], "lerning_rate: Extra inputs are not permitted"),
        (["--set", "sample_rate=0"], "sample_rate: Input should be greater than 0"),
        (
            ["--model", "attention_unet", "--set", "psi_norm=batch"],
            "psi_norm: Input should be 'instance', 'instance_affine' or 'none' (got 'batch')",
        ),
        (
            ["--model", "unet", "--set", "psi_norm=none"],
            "psi_norm: a hyper-parameter of attention_unet and sparse_attention_unet, not of model 'unet'",
        ),
    ],
)
def test_bad_config_exits_2_before_ray(tiny_root, storage, capsys, args, message):
    code, out = _run(capsys, storage, "--data-root", str(tiny_root), *args)
    assert code == 2
    assert message in out
    assert not storage.exists(), "nothing may be written before the configuration is valid"


def test_missing_and_empty_data_roots(tmp_path, storage, capsys, fastmri_volume):
    code, out = _run(capsys, storage, "--data-root", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere: data root does not exist" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = _run(capsys, storage, "--data-root", str(empty))
    assert code == 2 and "empty" in out
    only_train = tmp_path / "only_train"
    fastmri_volume(only_train / "singlecoil_train" / "a.h5")
    code, out = _run(capsys, storage, "--data-root", str(only_train))
    assert code == 2 and "singlecoil_val: split directory missing" in out
    assert not storage.exists()


def test_invalid_file_is_named_and_left_untouched(tmp_path, storage, capsys, fastmri_volume):
    root = tmp_path / "root"
    for split in ("singlecoil_train", "singlecoil_val"):
        fastmri_volume(root / split / "good.h5")
    bad = fastmri_volume(root / "singlecoil_train" / "bad.h5")
    with h5py.File(bad, "a") as hf:
        del hf.attrs["max"]
    before = bad.read_bytes()
    code, out = _run(capsys, storage, "--data-root", str(root))
    assert code == 2
    assert "singlecoil_train/bad.h5" in out and "max" in out
    assert "good.h5" not in out
    assert bad.read_bytes() == before


def test_real_process_exit_code(tiny_root, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.train", "--profile", "smoke", "--data-root", str(tiny_root),
         "--set", "drop_prob=2", "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "drop_prob" in done.stdout and "Started a local Ray" not in done.stdout + done.stderr


def test_an_architecture_option_through_set_names_the_run_and_builds_the_gate():
    from ray_jobs.cli import parse_overrides
    from ray_jobs.config import make_train_config, profile_defaults
    from ray_jobs.trainer import default_run_name

    values = {**profile_defaults("smoke"), "model": "sparse_attention_unet", "gamma": 0.01}
    cfg = make_train_config({**values, **parse_overrides(["psi_norm=none"])})
    assert default_run_name(cfg, "smoke") == "sparse_attention_unet-gamma0.01-psi_normnone-smoke-seed0"
    network = build_model(cfg.model, **cfg.model_hparams())
    assert {gate.psi_norm for gate in network.attention_gates} == {"none"}
    assert all(gate.psi[0].bias is not None for gate in network.attention_gates)
    # At its default the option is recorded but not named: existing run names stay as they were.
    default = make_train_config(values)
    assert default.model_dump()["psi_norm"] == "instance"
    assert default_run_name(default, "smoke") == "sparse_attention_unet-gamma0.01-smoke-seed0"
