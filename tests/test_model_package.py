"""Model packages without a cluster: round trip, fastMRI's U-Net loading ours, damaged packages refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastmri.models import Unet as FastmriUnet

from mri_models.models import build_model
from mri_models.package import MANIFEST_FILE, WEIGHTS_FILE, PackageError, load_package, write_network
from ray_jobs import predict
from ray_jobs.config import make_train_config, profile_defaults

HPARAMS = {"chans": 4, "num_pool_layers": 2, "drop_prob": 0.0}


def _package(tmp_path: Path, model: str = "unet", **hparams) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    hparams = {**HPARAMS, **hparams}
    network = build_model(model, **hparams)
    cfg = make_train_config({**profile_defaults("smoke"), "model": model, **hparams})
    out = tmp_path / "package"
    write_network(str(out), network, model=model, hparams=cfg.model_hparams(), arm=cfg.arm.name,
                  train_config=cfg.model_dump(mode="json"), selection={}, validation={}, data={})  # fmt: skip
    return out, network.eval()


def test_a_package_loads_the_network_it_was_written_from(tmp_path):
    out, network = _package(tmp_path, "attention_unet", psi_norm="none")
    loaded = load_package(str(out))
    assert loaded.manifest.hparams["psi_norm"] == "none" and loaded.manifest.project_version
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.network(image), network(image))


def test_the_unet_package_loads_into_fastmri_unet_with_strict_keys(tmp_path):
    out, network = _package(tmp_path)
    state = torch.load(out / WEIGHTS_FILE, weights_only=True)
    reference = FastmriUnet(in_chans=1, out_chans=1, **HPARAMS)
    reference.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    image = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(reference.eval()(image), network(image))


def _corrupt_weights(out: Path) -> None:
    data = bytearray((out / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / WEIGHTS_FILE).write_bytes(bytes(data))


def _edit_manifest(out: Path, **changes) -> None:
    values = json.loads((out / MANIFEST_FILE).read_text())
    (out / MANIFEST_FILE).write_text(json.dumps({**values, **changes}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_corrupt_weights, "model.pt: damaged or altered"),
        (lambda out: (out / MANIFEST_FILE).unlink(), "not a model package (no package.json"),
        (lambda out: (out / WEIGHTS_FILE).unlink(), "model.pt: missing"),
        (lambda out: (out / MANIFEST_FILE).write_text('{"format": '), "package.json: damaged"),
        (lambda out: _edit_manifest(out, format_version=99), "format version 99"),
        (lambda out: _edit_manifest(out, model="no_such_model"), "cannot build the network"),
        (lambda out: _edit_manifest(out, hparams={**HPARAMS, "chans": 8}), "does not load into unet"),
    ],
)
def test_a_damaged_or_incompatible_package_is_refused_in_one_line(tmp_path, damage, message):
    out, _ = _package(tmp_path)
    damage(out)
    with pytest.raises(PackageError, match=message.replace("(", r"\(")) as err:
        load_package(str(out))
    assert "\n" not in str(err.value)


def test_reconstruct_refuses_a_damaged_package_before_reading_any_data(tmp_path, capsys):
    out, _ = _package(tmp_path)
    _corrupt_weights(out)
    code = predict.main(["--model", str(out), "--data-root", str(tmp_path / "nowhere"), "--out",
                         str(tmp_path / "recon"), "--in-process"])  # fmt: skip
    printed = capsys.readouterr().out.strip()
    assert code == 2 and printed.count("\n") == 0 and "damaged or altered" in printed, printed
    assert not (tmp_path / "recon").exists()
