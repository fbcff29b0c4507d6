"""Validation images in TensorBoard: the event files ``ray_jobs.images`` writes, and the page showing them.

A small experiment directory is built without Ray, in a sweep's layout: two trial directories, each with a
tensorboardX scalar file (as Tune's TBXLoggerCallback writes) and an ``images/`` run written by
:class:`ray_jobs.images.ValidationImages` on a tiny attention U-Net. The fast test reads the event files
back; the slow one opens TensorBoard's Images dashboard in headless Chromium (``docs/tensorboard_check.py``).
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mri_models.attention_metrics import AttentionStatsAccumulator
from mri_models.models import build_model
from ray_jobs.images import PANELS, ValidationImages, image_epochs

REPO = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = REPO / "docs" / "tensorboard_check.py"

SIZE = 32  # slice height and width
EVERY, EPOCHS = 2, 5  # images at epochs 1, 2, 4, 5
MEAN, STD = 0.25, 2.0  # the normalisation the batches carry, undone before the images are drawn
TRIALS = ("trial_a1b2c_00000_gamma=0,seed=0", "trial_a1b2c_00001_gamma=0.01,seed=0")
IMAGE_TAGS = {"reconstruction", "attention/level_1", "attention/level_2"}  # num_pool_layers=2


def load_check_module() -> ModuleType:
    """``docs/tensorboard_check.py``, imported from its path (``docs`` is no package)."""
    spec = importlib.util.spec_from_file_location("tensorboard_check", CHECK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def phantom(seed: int) -> np.ndarray:
    """A smooth ``(SIZE, SIZE)`` target: an ellipse of tissue with a brighter blob, values in (0, 1.2]."""
    y, x = np.mgrid[-1 : 1 : SIZE * 1j, -1 : 1 : SIZE * 1j]
    body = ((x / 0.8) ** 2 + (y / 0.9) ** 2 < 1).astype(np.float32) * 0.6
    blob = np.exp(-((x - 0.2 * seed) ** 2 + (y + 0.3) ** 2) / 0.05).astype(np.float32) * 0.6
    return body + blob + 0.01


def fake_batches(seed: int) -> list[dict[str, Any]]:
    """Validation batches as the data pipeline yields them: two volumes, normalised image and target.

    The first volume has three slices over two batches, so the chosen slice is its middle one (slice 1).
    """
    rng = np.random.default_rng(seed)
    targets = np.stack([phantom(seed) * (1 + 0.1 * k) for k in range(4)])
    zero_filled = targets + rng.normal(0, 0.05, targets.shape).astype(np.float32)

    def rows(index: slice, fnames: list[str], slices: list[int]) -> dict[str, Any]:
        n = len(fnames)
        return {
            "fname": np.array(fnames),
            "slice_num": np.array(slices),
            "image": ((zero_filled[index] - MEAN) / STD).astype(np.float32),
            "target": ((targets[index] - MEAN) / STD).astype(np.float32),
            "mean": np.full(n, MEAN, dtype=np.float32),
            "std": np.full(n, STD, dtype=np.float32),
        }

    return [
        rows(slice(0, 2), ["vol_a.h5", "vol_a.h5"], [0, 1]),
        rows(slice(2, 4), ["vol_a.h5", "vol_b.h5"], [2, 0]),
    ]


def chosen_slice(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The un-normalised (zero-filled, target) of the slice the images show: vol_a.h5, slice 1."""
    batch = fake_batches(seed)[0]
    return batch["image"][1] * STD + MEAN, batch["target"][1] * STD + MEAN


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """An experiment directory of two trials: Tune-like scalars and rank 0's validation images."""
    from tensorboardX import SummaryWriter

    root = tmp_path_factory.mktemp("tensorboard") / "experiment"
    for seed, name in enumerate(TRIALS):
        trial = root / name
        scalars = SummaryWriter(logdir=str(trial))
        for epoch in range(1, EPOCHS + 1):
            scalars.add_scalar("ray/tune/ssim", 0.5 + 0.05 * epoch, global_step=epoch)
        scalars.close()
        torch.manual_seed(seed)
        network = build_model("attention_unet", chans=4, num_pool_layers=2, drop_prob=0.0)
        images = ValidationImages(str(trial / "images"), EVERY, EPOCHS)
        batches = fake_batches(seed)
        histograms = coefficient_histograms(network, batches)
        for epoch in range(EPOCHS + 1):  # histograms from epoch 0, the untrained network; images from 1
            images.write(network, batches, epoch, torch.device("cpu"), histograms)
    return root


def coefficient_histograms(network, batches) -> tuple[np.ndarray, ...]:
    """The attention coefficients' histograms over the batches, as the validation pass accumulates them."""
    accumulator = AttentionStatsAccumulator()
    with torch.no_grad():
        for batch in batches:
            image = torch.from_numpy(batch["image"]).unsqueeze(1)
            accumulator.add(network(image, return_attention=True).attention_maps)
    return accumulator.compute().histograms


def decode(encoded: bytes) -> np.ndarray:
    """A grey PNG as floats in [0, 1]."""
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("L"), dtype=np.float32) / 255.0


def test_event_files_hold_the_validation_images(experiment: Path) -> None:
    for seed, name in enumerate(TRIALS):
        scalars = EventAccumulator(str(experiment / name))
        scalars.Reload()
        assert [event.step for event in scalars.Scalars("ray/tune/ssim")] == list(range(1, EPOCHS + 1))
        # Tune's run holds no images: those are a run of their own (see ray_jobs.images).
        assert scalars.Tags()["images"] == []

        images = EventAccumulator(
            str(experiment / name / "images"), size_guidance={"images": 0, "tensors": 0}
        )
        images.Reload()
        assert set(images.Tags()["images"]) == IMAGE_TAGS
        assert any(tag.startswith("reconstruction/about") for tag in images.Tags()["tensors"])
        for tag in IMAGE_TAGS:
            events = images.Images(tag)
            assert [event.step for event in events] == image_epochs(EVERY, EPOCHS) == [1, 2, 4, 5]
            width = 4 * SIZE if tag == "reconstruction" else SIZE
            assert {(event.width, event.height) for event in events} == {(width, SIZE)}

        zero_filled, target = chosen_slice(seed)
        scale = target.max()
        for event in images.Images("reconstruction"):
            panel = decode(event.encoded_image_string)
            assert panel.shape == (SIZE, 4 * SIZE)
            # Panels in PANELS order, on the target's grey scale; PNG bytes are truncated to 1/255 steps.
            parts = dict(zip(PANELS, np.split(panel, 4, axis=1), strict=True))
            np.testing.assert_allclose(parts["target"], target / scale, atol=1.5 / 255)
            np.testing.assert_allclose(
                parts["zero-filled"], np.clip(zero_filled / scale, 0, 1), atol=1.5 / 255
            )
            assert parts["target"].max() > 254 / 255  # the target's maximum is white
        for event in images.Images("attention/level_2"):
            level = decode(event.encoded_image_string)
            # The deepest level's coefficients (16 x 16 for 32 x 32 and two pools) enlarged 2 x by repetition;
            # level 1, the finest, is at full resolution.
            np.testing.assert_array_equal(level, np.kron(level[::2, ::2], np.ones((2, 2))))
            assert level.std() > 0
        # Every epoch's coefficient histogram per level, from epoch 0, over every coefficient.
        histograms = EventAccumulator(str(experiment / name / "images"), size_guidance={"histograms": 0})
        histograms.Reload()
        assert set(histograms.Tags()["histograms"]) == {"alpha/level_1", "alpha/level_2"}
        for level, pixels in (("1", SIZE * SIZE), ("2", (SIZE // 2) ** 2)):
            events = histograms.Histograms(f"alpha/level_{level}")
            assert [event.step for event in events] == list(range(EPOCHS + 1))
            coefficients = sum(len(batch["image"]) for batch in fake_batches(0)) * pixels
            assert {event.histogram_value.num for event in events} == {coefficients}
            assert all(0 <= event.histogram_value.min <= event.histogram_value.max <= 1 for event in events)


def test_image_runs_on_disk_are_named_as_tensorboard_names_them(experiment: Path) -> None:
    check = load_check_module()
    assert check.image_runs_on_disk(str(experiment)) == {f"{name}/images": IMAGE_TAGS for name in TRIALS}


def test_check_names_a_tag_no_run_has(experiment: Path) -> None:
    command = [sys.executable, str(CHECK_SCRIPT), "--logdir", str(experiment), "--tags", "attention/level_9"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"FAILED: no run under {experiment} has image tag(s) attention/level_9"
    ]


def leftovers(marks: tuple[str, ...]) -> list[str]:
    """Processes whose command line mentions any of ``marks``, and zombies this process has not reaped."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if any(mark in cmdline for mark in marks) or (int(ppid) == os.getpid() and state == "Z"):
            found.append(f"{entry.name}: {cmdline[:200] or stat[:100]}")
    return found


# What TensorBoard and Chromium would write under ~ if their HOME were not a temporary directory.
HOME_PATHS = (".tensorboard-info", ".config/chromium", ".cache/chromium", ".pki", ".local/share/chromium")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's `chromium` (apt-get install chromium)"
)
def test_tensorboard_page_shows_the_images(experiment: Path, tmp_path: Path) -> None:
    check = load_check_module()
    home = Path.home()
    in_home = {path for path in HOME_PATHS if (home / path).exists()}
    temporary = set(Path(tempfile.gettempdir()).glob("tensorboard_check_*"))
    screenshot = tmp_path / "page.png"

    shown = check.check_images(experiment, screenshot=screenshot)

    for name in TRIALS:
        assert shown[f"{name}/images"] == {"reconstruction", "attention/level_1"}
        assert shown[name] == set()  # Tune's scalar run is listed, without images
    with Image.open(screenshot) as image:
        assert image.size == check.VIEWPORT
    assert leftovers((str(experiment), "tensorboard_check_")) == []
    assert {path for path in HOME_PATHS if (home / path).exists()} == in_home
    assert set(Path(tempfile.gettempdir()).glob("tensorboard_check_*")) == temporary
