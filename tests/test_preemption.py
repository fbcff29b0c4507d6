"""A preempted run checkpoints within the epoch and goes on from there exactly as if nothing happened.

In a real two-worker Ray Train run (DDP over gloo, dropout on, so every rank's random stream matters), one
epoch is trained three ways: straight through; interrupted at a step boundary where the workers' preemption
handler checkpoints (every rank's progress gathered to rank 0) and the "teardown" ends them; and resumed
from that checkpoint in fresh networks. The resumed epoch must end with bit-equal weights, optimiser state
and training metrics.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray.train
import torch
from ray.train import PreemptionInfo
from ray.train.torch import TorchTrainer

from mri_models.step_options import make_grad_scaler
from ray_jobs.checkpoints import load_checkpoint, save_checkpoint
from ray_jobs.config import make_train_config
from ray_jobs.data import prepare_data
from ray_jobs.preemption import EpochProgress, PreemptionHandler
from ray_jobs.spot_guard import imds_interruption
from ray_jobs.worker import _all_gather, _distributed_model, _make_optimizer, _world, train_epoch

CHECK_EVERY = 2


class _TornDown(Exception):
    """Stands for Ray Train ending the workers after the checkpoint (the node went)."""


def _fresh(cfg, device):
    torch.manual_seed(cfg.seed)
    model = _distributed_model(cfg, device)
    optimizer, scheduler = _make_optimizer(model, cfg)
    return model, optimizer, scheduler, make_grad_scaler(cfg.precision, device)


def _state(model, optimizer) -> dict:
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    return {"model": weights, "optimizer": optimizer.state_dict()}


def _epoch_three_ways(config: dict) -> None:
    cfg, data, out = config["cfg"], config["data"], Path(config["out"])
    rank, world_size = _world()
    device = ray.train.torch.get_device()
    full = _fresh(cfg, device)
    straight = train_epoch(full[0], full[1], full[3], cfg, data, 0, device)

    part = _fresh(cfg, device)
    answers = iter([None, PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"node": [1]})])

    def checkpoint(progress: EpochProgress, info) -> None:
        states = _all_gather(progress.state(), world_size)
        if rank == 0:
            (out / "checkpoint").mkdir()
            model, optimizer, scheduler, scaler = part
            directory = str(out / "checkpoint")
            save_checkpoint(directory, model, optimizer, scheduler, -1, [], scaler, in_epoch=states)
        torch.distributed.barrier()

    def torn_down(info) -> None:
        raise _TornDown

    handler = PreemptionHandler(CHECK_EVERY, checkpoint, torn_down, info=lambda: next(answers, None))
    with pytest.raises(_TornDown):
        train_epoch(part[0], part[1], part[3], cfg, data, 0, device, preemption=handler)

    resumed = _fresh(cfg, device)
    checkpoint_dir = ray.train.Checkpoint.from_directory(str(out / "checkpoint"))
    next_epoch, _, in_epoch = load_checkpoint(checkpoint_dir, *resumed)
    progress = EpochProgress.from_state(in_epoch[rank])
    steps_at_checkpoint = progress.steps  # the resumed epoch goes on counting in it
    again = train_epoch(resumed[0], resumed[1], resumed[3], cfg, data, next_epoch, device, progress)

    expected, got = _state(full[0], full[1]), _state(resumed[0], resumed[1])
    same_weights = all(torch.equal(expected["model"][k], got["model"][k]) for k in expected["model"])
    moments = zip(expected["optimizer"]["state"].values(), got["optimizer"]["state"].values(), strict=True)
    same_moments = all(
        torch.equal(a, b)
        for state_a, state_b in moments
        for a, b in zip(state_a.values(), state_b.values(), strict=True)
        if isinstance(a, torch.Tensor)
    )
    record = {
        "rank": rank, "steps_at_checkpoint": steps_at_checkpoint, "same_weights": same_weights,
        "same_moments": same_moments, "straight": straight, "resumed": again,
    }  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_an_epoch_checkpointed_at_a_preemption_and_resumed_equals_the_uninterrupted_epoch(
    ray_local, tiny_root, tmp_path
):
    cfg = make_train_config({
        "data_root": str(tiny_root), "model": "unet", "chans": 4, "num_pool_layers": 2, "drop_prob": 0.3,
        "batch_size": 1, "num_workers": 2, "cpus_per_worker": 0.5, "deterministic": True,
        "preemption_check_steps": CHECK_EVERY,
    })  # fmt: skip
    data = prepare_data(cfg, tiny_root)
    trainer = TorchTrainer(
        _epoch_three_ways,
        train_loop_config={"cfg": cfg, "data": data, "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="preempted", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["steps_at_checkpoint"] == 2 * CHECK_EVERY  # the second question got the preemption
        assert record["same_weights"] and record["same_moments"], record
        straight, resumed = record["straight"], record["resumed"]
        for key in ("train_loss", "train_reconstruction_loss", "train_slices"):
            assert resumed[key] == straight[key], (key, straight, resumed)


class _Imds(BaseHTTPRequestHandler):
    """EC2's instance metadata (IMDSv2) as a spot instance sees it: a token, then the interruption notice
    (404 until one is announced)."""

    notice: str | None = None

    def log_message(self, *args) -> None:
        pass

    def do_PUT(self) -> None:  # http.server's name
        body = b"token-1" if self.path == "/latest/api/token" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        authorised = self.headers.get("X-aws-ec2-metadata-token") == "token-1"
        body = (self.notice or "").encode()
        found = authorised and self.path == "/latest/meta-data/spot/instance-action" and body
        self.send_response(200 if found else (401 if not authorised else 404))
        self.send_header("Content-Length", str(len(body) if found else 0))
        self.end_headers()
        if found:
            self.wfile.write(body)


def test_the_spot_guard_reads_the_interruption_notice_from_instance_metadata():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert imds_interruption(url) is None  # nothing announced yet
        when = datetime.now(timezone.utc) + timedelta(seconds=90)
        _Imds.notice = json.dumps({"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
        seconds = imds_interruption(url)
        assert seconds is not None and 80 < seconds <= 90
        assert imds_interruption("http://127.0.0.1:9") is None  # no metadata service: no notice
    finally:
        _Imds.notice = None
        server.shutdown()
        server.server_close()
