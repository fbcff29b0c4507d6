"""The Ray Data slice pipeline: sharding, per-epoch masks, and rows equal to mri_models' transform."""

from __future__ import annotations

import zlib
from collections import Counter

import numpy as np
import pytest

from mri_models.data import RandomMaskFunc, SliceDataset, UnetDataTransform, unet_sample
from ray_jobs.config import make_train_config
from ray_jobs.data import (
    TRAIN_SPLIT,
    VAL_SPLIT,
    ValidationBatches,
    prepare_data,
    slice_dataset,
    train_read_tasks,
    val_read_tasks,
)


def _slices(tasks):
    return [(task["path"], s) for task in tasks for s in task["slices"]]


def _fake_index(volume_sizes):
    return tuple((f"/data/v{v}.h5", s) for v, n in enumerate(volume_sizes) for s in range(n))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_shards_equal_disjoint_and_reshuffled(world_size):
    index = _fake_index([35, 12, 7, 30, 1, 19])
    per_epoch = []
    for epoch in range(2):
        shards = [
            _slices(train_read_tasks(index, epoch, r, world_size, seed=0, slices_per_read=8))
            for r in range(world_size)
        ]
        sizes = {len(shard) for shard in shards}
        assert len(sizes) == 1, "every DDP rank must take the same number of slices"
        flat = [ref for shard in shards for ref in shard]
        assert len(flat) == len(set(flat)), "a slice on two ranks in one epoch"
        assert len(flat) > len(index) - world_size * 8, "at most a chunk per rank is cut"
        assert all(
            len(task["slices"]) <= 8
            for r in range(world_size)
            for task in train_read_tasks(index, epoch, r, world_size, 0, 8)
        )
        per_epoch.append(shards)
    if world_size > 1:
        assert per_epoch[0] != per_epoch[1], "the assignment must change between epochs"
    # Reproducible from (seed, epoch).
    assert _slices(train_read_tasks(index, 1, 0, world_size, 0, 8)) == per_epoch[1][0]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_validation_shards_cover_every_slice_once_by_whole_volumes(world_size):
    index = _fake_index([35, 12, 7, 30, 1])
    shards = [_slices(val_read_tasks(index, r, world_size, slices_per_read=4)) for r in range(world_size)]
    assert Counter(ref for shard in shards for ref in shard) == Counter(index)
    owners = {path: r for r, shard in enumerate(shards) for path, _ in shard}
    assert all(owners[path] == r for r, shard in enumerate(shards) for path, _ in shard)


def _cfg(root, **overrides):
    return make_train_config(
        {"data_root": root, "chans": 4, "num_pool_layers": 2, "batch_size": 2, **overrides}
    )


def _rows(ds):
    rows = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, slice_num in enumerate(batch["slice_num"]):
            rows[(batch["fname"][i], int(slice_num))] = {key: batch[key][i] for key in batch}
    return rows


@pytest.mark.slow
def test_validation_rows_equal_slice_dataset_transform(ray_local, tiny_root):
    cfg = _cfg(tiny_root, center_fractions=[0.08, 0.04], accelerations=[4, 8])
    data = prepare_data(cfg, tiny_root)
    rows = _rows(
        slice_dataset(val_read_tasks(data.val_slices, 0, 1, cfg.slices_per_read), cfg, training=False)
    )
    reference = SliceDataset(
        tiny_root / VAL_SPLIT,
        transform=UnetDataTransform("singlecoil", RandomMaskFunc([0.08, 0.04], [4, 8]), use_seed=True),
        cache_dir="",
    )
    assert len(rows) == len(reference) == 12
    for sample in reference:
        row = rows[(sample.fname, sample.slice_num)]
        assert np.array_equal(row["image"], sample.image.numpy())
        assert np.array_equal(row["target"], sample.target.numpy())
        assert row["mean"] == sample.mean.item() and row["std"] == sample.std.item()
        assert row["max_value"] == sample.max_value


@pytest.mark.slow
@pytest.mark.parametrize("budget_mb", [1024, 0])
def test_validation_batches_are_produced_once_when_they_fit(ray_local, tiny_root, budget_mb):
    cfg = _cfg(tiny_root, val_cache_mb=budget_mb)
    batches = ValidationBatches(prepare_data(cfg, tiny_root), cfg, rank=0, world_size=1)
    first = list(batches)
    assert (batches.cached is not None) == (budget_mb > 0)
    second = list(batches)  # from memory, or streamed again over budget: the same rows either way

    def by_slice(passes):
        return {(b["fname"][i], int(n)): b["image"][i] for b in passes for i, n in enumerate(b["slice_num"])}

    first_rows, second_rows = by_slice(first), by_slice(second)
    assert len(first_rows) == 12 and first_rows.keys() == second_rows.keys()
    assert all(np.array_equal(first_rows[key], second_rows[key]) for key in first_rows)


@pytest.mark.slow
def test_training_masks_change_every_epoch_and_are_reproducible(ray_local, tiny_root):
    cfg = _cfg(tiny_root)
    data = prepare_data(cfg, tiny_root)

    def epoch_rows(epoch):
        tasks = train_read_tasks(data.train_slices, epoch, 0, 1, cfg.seed, cfg.slices_per_read)
        return _rows(slice_dataset(tasks, cfg, training=True, epoch=epoch))

    first, again, second = epoch_rows(0), epoch_rows(0), epoch_rows(1)
    assert first.keys() == second.keys() and len(first) == 16
    for key in first:
        assert np.array_equal(first[key]["image"], again[key]["image"]), "masks must be reproducible"
    changed = sum(not np.array_equal(first[k]["image"], second[k]["image"]) for k in first)
    assert changed == len(first), "every training slice needs a new mask each epoch"
    # The documented seed: (run seed, epoch, crc32(file name), slice), so a resumed run sees the same masks.
    raw = SliceDataset(tiny_root / TRAIN_SPLIT, cache_dir="")
    for kspace, _, target, attrs, fname, slice_num in (raw[0], raw[5]):
        expected = unet_sample(
            kspace,
            target,
            attrs,
            fname,
            slice_num,
            RandomMaskFunc([0.08], [4]),
            (0, 1, zlib.crc32(fname.encode()), slice_num),
        )
        assert np.array_equal(second[(fname, slice_num)]["image"], expected.image.numpy())


def test_prepare_data_rejects_too_many_pools(tiny_root):
    from ray_jobs.config import ConfigError

    with pytest.raises(ConfigError, match=r"num_pool_layers=5 is too deep for 32x32 images.*at most 4"):
        prepare_data(_cfg(tiny_root, num_pool_layers=5), tiny_root)
    assert prepare_data(_cfg(tiny_root, num_pool_layers=4), tiny_root).image_size == (32, 32)


def test_prepare_data_subsamples_reproducibly(tiny_root):
    a = prepare_data(_cfg(tiny_root, volume_sample_rate=0.5), tiny_root)
    b = prepare_data(_cfg(tiny_root, volume_sample_rate=0.5), tiny_root)
    assert a.train_slices == b.train_slices
    assert len({path for path, _ in a.train_slices}) == 2
    assert all(path.startswith(str(tiny_root / TRAIN_SPLIT)) for path, _ in a.train_slices)
