"""The Ray Data slice pipeline: sharding, per-epoch masks, and rows equal to mri_models' transform."""

from __future__ import annotations

import zlib
from collections import Counter

import numpy as np
import pytest
import torch

from mri_models.data import RandomMaskFunc, SliceDataset, SliceInputs, UnetDataTransform, unet_sample
from ray_jobs.config import make_train_config
from ray_jobs.data import (
    TRAIN_SPLIT,
    VAL_SPLIT,
    ValidationBatches,
    configure_data_context,
    iter_rows_locally,
    network_rows_on_device,
    prepare_data,
    slice_dataset,
    train_read_tasks,
    val_read_tasks,
)


@pytest.fixture(autouse=True)
def _data_context():
    """This process's Ray Data settings, as the training worker sets them before building its datasets."""
    configure_data_context()


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
    cfg = _cfg(tiny_root, center_fractions=[0.08, 0.04], accelerations=[4, 8], transform="exact")
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
    cfg = _cfg(tiny_root, transform="exact")  # compared with unet_sample bit for bit below
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
            SliceInputs(
                kspace,
                target,
                attrs,
                fname,
                slice_num,
                RandomMaskFunc([0.08], [4]),
                (0, 1, zlib.crc32(fname.encode()), slice_num),
            )
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


def _network_rows(batches) -> dict:
    """(fname, slice) -> image, target, mean, std (numpy) of batches of either row kind, through the trainer's
    conversion on the CPU."""
    out = {}
    for batch in batches:
        rows = network_rows_on_device(batch, torch.device("cpu"))
        for i, slice_num in enumerate(batch["slice_num"]):
            out[(batch["fname"][i], int(slice_num))] = {key: rows[key][i].numpy() for key in rows}
    return out


def _batches(rows: list[dict], size: int) -> list[dict]:
    """Rows grouped into batches of ``size`` (columns as lists: ragged hybrids cannot be stacked)."""
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    return [{key: [row[key] for row in chunk] for key in chunk[0]} for chunk in chunks]


def _assert_rows_close(reference: dict, rows: dict) -> None:
    # The fast and trainer-side transforms are float32 computations in another order: 1e-5 of the largest
    # magnitude (tests/test_fast_transform.py says why, and checks them against fastmri itself).
    assert rows.keys() == reference.keys() and rows
    for key, ref in reference.items():
        for name in ("image", "target", "mean", "std"):
            scale = float(np.abs(ref[name]).max())
            np.testing.assert_allclose(rows[key][name], ref[name], rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def test_fast_and_trainer_side_rows_equal_the_exact_rows(tiny_root):
    """Training rows of every transform design agree (the same masks: seeds do not depend on the design);
    tiny_root's volumes differ in width, so the trainer-side batches are ragged."""
    designs = {
        "exact": {},
        "fast": {"transform": "fast"},
        "trainer": {"transform": "fast", "transform_on": "trainer"},
    }
    rows = {}
    for name, options in designs.items():
        cfg = _cfg(tiny_root, **options)
        data = prepare_data(cfg, tiny_root)
        tasks = train_read_tasks(data.train_slices, 3, 0, 1, cfg.seed, cfg.slices_per_read)
        batches = _batches(list(iter_rows_locally(tasks, cfg, training=True, epoch=3)), size=3)
        assert ("hybrid" in batches[0]) == (name == "trainer")
        rows[name] = _network_rows(batches)
    _assert_rows_close(rows["exact"], rows["fast"])
    _assert_rows_close(rows["exact"], rows["trainer"])
    # Validation rows are made by the read tasks whatever transform_on says (they are kept per run).
    cfg = _cfg(tiny_root, transform_on="trainer")
    data = prepare_data(cfg, tiny_root)
    val = list(iter_rows_locally(val_read_tasks(data.val_slices, 0, 1, 8), cfg, training=False))
    assert all("image" in batch and "hybrid" not in batch for batch in val)


@pytest.mark.slow
def test_trainer_side_rows_through_ray_data_equal_the_exact_rows(ray_local, tiny_root):
    """Ragged hybrid rows (volumes of different widths) batched by Ray Data, transformed on the trainer."""
    # Batches of 3 straddle the 4-slice volumes (one read task each), so some mix two widths.
    exact, trainer = _cfg(tiny_root), _cfg(tiny_root, transform="fast", transform_on="trainer", batch_size=3)
    data = prepare_data(exact, tiny_root)
    tasks = train_read_tasks(data.train_slices, 1, 0, 1, exact.seed, exact.slices_per_read)
    reference = _network_rows(_batches(list(iter_rows_locally(tasks, exact, training=True, epoch=1)), size=4))
    dataset = slice_dataset(tasks, trainer, training=True, epoch=1)
    batches = list(dataset.iter_batches(batch_size=3, batch_format="numpy"))
    assert any(len({np.shape(h) for h in batch["hybrid"]}) > 1 for batch in batches), "no ragged batch"
    _assert_rows_close(reference, _network_rows(batches))


@pytest.mark.slow
def test_several_chunks_per_task_give_the_same_rows_in_the_same_order(ray_local, tiny_root):
    cfg = _cfg(tiny_root, slices_per_read=2)  # 8 chunks of 2 slices: tasks of 1, 3 (uneven) and 8 chunks
    data = prepare_data(cfg, tiny_root)
    tasks = train_read_tasks(data.train_slices, 2, 0, 1, cfg.seed, cfg.slices_per_read)

    def ordered_rows(chunks_per_task: int) -> list:
        grouped = cfg.model_copy(update={"chunks_per_task": chunks_per_task})
        dataset = slice_dataset(tasks, grouped, training=True)
        return [
            (batch["fname"][i], int(batch["slice_num"][i]), batch["image"][i].tobytes())
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy")
            for i in range(len(batch["slice_num"]))
        ]

    one = ordered_rows(1)
    assert len(one) == 16
    assert ordered_rows(3) == one and ordered_rows(8) == one
