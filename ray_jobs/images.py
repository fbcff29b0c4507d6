"""Validation reconstructions, attention maps and coefficient histograms for TensorBoard, while a run trains.

Every ``image_every_epochs`` epochs (and at the first and last), rank 0 runs its network on one fixed
validation slice (the middle slice of its first volume) and writes

- ``reconstruction``: zero-filled input | reconstruction | target | absolute error x ERROR_GAIN, side by
  side, each divided by the target's maximum (so the four share one grey scale);
- ``attention/level_k``: the attention coefficients of every up-sampling level (level 1 is the finest,
  as everywhere: :mod:`mri_models.attention_metrics`), in [0, 1], enlarged to the image size with
  nearest-neighbour repetition.

and, every epoch from epoch 0 (the untrained network), the histogram of each level's coefficients over
the whole validation pass (``alpha/level_k``, TensorBoard's Histograms tab).

Each write is one complete TensorBoard event file, made in a local temporary directory and then copied to
the run's ``images`` directory (a local path or any ``pyarrow.fs`` URI) beside the trial's Tune scalars.
A separate directory, not Tune's own: TensorBoard polls only the newest event file of a directory, so a
second file next to Tune's would freeze the live scalars. :func:`read_images` reads the images back as
the PNGs they hold (a tracked sweep's MLflow artifacts, :mod:`ray_jobs.mlflow_trials`).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mri_models import storage
from mri_models.attention_metrics import finest_first

HISTOGRAM_BUCKETS = 50  # TensorBoard draws a few dozen buckets; the validation histograms have more
ERROR_GAIN = 5.0  # errors are a few percent of the image; x5 makes their structure visible
PANELS = ("zero-filled", "reconstruction", "target", f"error x{ERROR_GAIN:g}")


def image_epochs(every: int, epochs: int) -> list[int]:
    """The (1-based) epochs that write images: the first, every ``every``-th and the last; none for 0."""
    if every <= 0:
        return []
    return sorted({1, epochs, *range(every, epochs + 1, every)})


def reconstruction_panel(zero_filled: np.ndarray, output: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``(H, 4W)`` in [0, 1]: zero-filled | reconstruction | target | error x ERROR_GAIN, on one scale."""
    scale = float(np.max(target)) or 1.0
    error = np.abs(output - target) * ERROR_GAIN
    panels = [zero_filled, output, target, error]
    return np.clip(np.concatenate(panels, axis=1) / scale, 0.0, 1.0).astype(np.float32)


def enlarge(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour enlargement of ``values`` ``(h, w)`` to ``shape`` (an integer multiple or close)."""
    rows = np.minimum((np.arange(shape[0]) * values.shape[0]) // shape[0], values.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * values.shape[1]) // shape[1], values.shape[1] - 1)
    return values[np.ix_(rows, cols)]


@dataclass(frozen=True)
class ImageSlice:
    """The one validation slice the images show, as the network takes it."""

    fname: str
    slice_num: int
    image: np.ndarray  # normalised zero-filled input (H, W)
    target: np.ndarray  # normalised target (H, W)
    mean: float
    std: float


def choose_slice(batches: Iterable[dict[str, Any]]) -> ImageSlice | None:
    """The middle slice of the first volume in ``batches`` (rank 0's validation rows, in volume order)."""
    first, rows = None, []
    for batch in batches:  # rows come volume by volume
        names = list(batch["fname"])
        first = names[0] if first is None else first
        rows += [(batch, i) for i, name in enumerate(names) if name == first]
        if names[-1] != first:
            break
    if not rows:
        return None
    batch, i = rows[len(rows) // 2]
    return ImageSlice(
        str(batch["fname"][i]),
        int(batch["slice_num"][i]),
        np.array(batch["image"][i], dtype=np.float32),
        np.array(batch["target"][i], dtype=np.float32),
        float(batch["mean"][i]),
        float(batch["std"][i]),
    )


@torch.no_grad()
def render(network: torch.nn.Module, chosen: ImageSlice, device: torch.device) -> dict[str, np.ndarray]:
    """Tag -> ``(H, W)`` image in [0, 1] for one slice: the reconstruction panel and attention levels."""
    network.eval()
    image = torch.from_numpy(chosen.image)[None, None].to(device)
    result = network(image, return_attention=True)

    def unnormalise(x: np.ndarray) -> np.ndarray:
        return x * chosen.std + chosen.mean

    output = unnormalise(result.output[0, 0].float().cpu().numpy())
    images = {
        "reconstruction": reconstruction_panel(unnormalise(chosen.image), output, unnormalise(chosen.target))
    }
    for level, attention in enumerate(finest_first(getattr(result, "attention_maps", ()) or ()), start=1):
        values = attention[0, 0].float().cpu().numpy()
        images[f"attention/level_{level}"] = enlarge(values, chosen.image.shape).astype(np.float32)
    return images


def _add_histogram(writer, tag: str, counts: np.ndarray, step: int) -> None:
    """A histogram of values in [0, 1] given as counts over equal bins, re-binned for display."""
    coarse = counts.reshape(HISTOGRAM_BUCKETS, -1).sum(axis=1)
    centres = (np.arange(len(counts)) + 0.5) / len(counts)
    writer.add_histogram_raw(
        tag,
        min=float(centres[counts > 0].min()),
        max=float(centres[counts > 0].max()),
        num=float(counts.sum()),
        sum=float((counts * centres).sum()),
        sum_squares=float((counts * centres**2).sum()),
        bucket_limits=((np.arange(HISTOGRAM_BUCKETS) + 1) / HISTOGRAM_BUCKETS).tolist(),
        bucket_counts=coarse.tolist(),
        global_step=step,
    )


def write_event_file(
    directory: str,
    images: dict[str, np.ndarray],
    step: int,
    caption: str | None,
    histograms: dict[str, np.ndarray] | None = None,
) -> str:
    """Write ``images`` (tag -> (H, W) in [0, 1]) and ``histograms`` (tag -> counts over equal bins of
    [0, 1]) at ``step`` as one event file under ``directory``.

    Returns:
        The event file's name.
    """
    from tensorboardX import SummaryWriter  # only processes that write images pay for the import

    with tempfile.TemporaryDirectory() as local:
        # The step in the name keeps the files in step order, the order TensorBoard reads them in.
        writer = SummaryWriter(logdir=local, filename_suffix=f".epoch{step:05d}")
        for tag, values in images.items():
            writer.add_image(tag, values, global_step=step, dataformats="HW")
        if caption:
            writer.add_text("reconstruction/about", caption, global_step=step)
        for tag, counts in (histograms or {}).items():
            if counts.sum() > 0:
                _add_histogram(writer, tag, counts, step)
        writer.close()
        names = sorted(os.listdir(local))
        for name in names:
            with open(os.path.join(local, name), "rb") as file:
                storage.write_bytes(storage.join(directory, name), file.read())
    return names[0]


class ValidationImages:
    """Rank 0's image writer of one run.

    Args:
        directory: where the event files go (local path or URI); None writes nothing.
        every: write every ``every`` epochs (0: never).
        epochs: the run's epoch budget (the last epoch always writes).
    """

    def __init__(self, directory: str | None, every: int, epochs: int) -> None:
        self.directory = directory
        self.epochs = set(image_epochs(every, epochs)) if directory else set()
        self.chosen: ImageSlice | None = None

    def due(self, epoch: int) -> bool:
        return epoch in self.epochs

    def write(
        self,
        network: torch.nn.Module,
        batches: Iterable[dict[str, Any]],
        epoch: int,
        device,
        histograms: tuple[np.ndarray, ...] = (),
    ) -> None:
        """Write the coefficient histograms of ``epoch`` (per level, finest first), and render and write
        its images when due (epochs from 1)."""
        if self.directory is None:
            return
        tags = {f"alpha/level_{level}": counts for level, counts in enumerate(histograms, start=1)}
        if self.chosen is None and self.due(epoch):
            self.chosen = choose_slice(batches)
        if not self.due(epoch) or self.chosen is None:
            if tags:
                write_event_file(self.directory, {}, epoch, None, tags)
            return
        caption = (
            f"{self.chosen.fname}, slice {self.chosen.slice_num}, epoch {epoch}: "
            f"{' | '.join(PANELS)} (one grey scale: the target's maximum); attention/level_k: the "
            "attention coefficients of up-sampling level k (1 = the finest), 0 black to 1 white."
        )
        write_event_file(self.directory, render(network, self.chosen, device), epoch, caption, tags)


@dataclass(frozen=True)
class EventImage:
    """One image of an event file: its tag, its step (the epoch) and the PNG bytes TensorBoard shows."""

    tag: str
    step: int
    png: bytes


def event_images(data: bytes) -> list[EventImage]:
    """The images in the bytes of one event file (tensorboardX stores them PNG-encoded), in file order.

    An event file is a sequence of TFRecords: an 8-byte little-endian length, a 4-byte CRC of it, the
    serialised ``Event`` and a 4-byte CRC of that. A record cut short ends the list.
    """
    from tensorboardX.proto.event_pb2 import Event

    images, offset = [], 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        start, end = offset + 12, offset + 12 + length
        if end + 4 > len(data):
            break
        event = Event.FromString(data[start:end])
        for value in event.summary.value:
            if value.HasField("image"):
                images.append(EventImage(value.tag, int(event.step), value.image.encoded_image_string))
        offset = end + 4
    return images


def read_images(directory: str) -> list[EventImage]:
    """Every image of the event files in ``directory`` (a run's ``images``, local or a URI), by step."""
    images = []
    for entry in storage.list_files(directory):
        if "tfevents" in entry.name:
            images += event_images(storage.read_bytes(entry.uri) or b"")
    return sorted(images, key=lambda image: (image.step, image.tag))
