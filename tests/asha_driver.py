"""A Tune driver with a deterministic trainable, run as a subprocess by test_sweeps (so it can be killed).

``python tests/asha_driver.py run|resume EXPERIMENT_DIR``: eight trials, one at a time, whose SSIM at every
epoch is fixed by ``x``; trial x reports ``ssim = (1 - x / 10) * epoch / 4``, so every later trial is
worse than every earlier one and ASHA's decisions depend on the rung records of earlier trials.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray import tune

from mri_models.experiment import ASHA_STATE_FILE
from ray_jobs.asha import PersistentASHAScheduler


def trainable(config: dict) -> None:
    for epoch in range(1, 5):
        time.sleep(0.3)
        tune.report({"epoch": epoch, "ssim": (1 - config["x"] / 10) * epoch / 4})


def main(mode: str, experiment: Path) -> None:
    if mode == "resume":
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True)
    else:
        scheduler = PersistentASHAScheduler(
            state_path=str(experiment / ASHA_STATE_FILE), time_attr="epoch", max_t=4, grace_period=1,
            reduction_factor=2,
        )  # fmt: skip
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 0.1}),
            param_space={"x": tune.grid_search(list(range(8)))},
            tune_config=tune.TuneConfig(
                metric="ssim", mode="max", scheduler=scheduler, max_concurrent_trials=1
            ),
            run_config=tune.RunConfig(name=experiment.name, storage_path=str(experiment.parent), verbose=0),
        )
    tuner.fit()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
