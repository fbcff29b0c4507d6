"""The paper's study in one job: the model comparison, the gamma sweep, the model costs, then the report.

Submit to a running cluster (``make study`` does it for the cpu profile)::

    ray job submit --working-dir . -- python sweeps/paper_study.py [--profile smoke|cpu|paper] [--resume]

The study directory ``<storage>/<name>`` holds ``model_comparison/`` (configs/model_comparison.yaml: the
U-Net and the Attention U-Net x seeds at full budget, FIFO), ``gamma_sweep/`` (configs/gamma_sweep.yaml
for the paper's gate and Oktay et al.'s, at full budget too, whose best gamma > 0 with the paper's gate is
Table 1's Sparse Attention U-Net: configs/paper_study.yaml has what the study changes in each sweep),
``model_costs.json`` and ``report/report.md`` (:mod:`analysis.study_report`: Table 1 beside the paper's,
Figures 6 and 8, the attention coefficients against epoch and gamma, the findings marked reproduced / not
reproduced / inconclusive and whether the penalty sparsifies each gate, the model-cost table).
Everything is validated before the first trial starts. ``--resume`` continues an interrupted study where it
stopped, with the profile and overrides it started with; ``--set key=value`` applies to both sweeps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# The job's working directory is the repository: make its packages importable without installing them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.collect import write_tables
from analysis.findings import EQUIVALENCE_MARGIN
from analysis.study_report import write_report
from mri_models import experiment, storage
from mri_models.experiment import GAMMA_SWEEP, MODEL_COMPARISON, StudyLayout
from ray_jobs import log_to_stdout
from ray_jobs.cli import add_common_arguments, exit_on_user_error, parse_overrides
from ray_jobs.config import ConfigError, load_yaml
from ray_jobs.cost_task import measure_on_cluster
from ray_jobs.data import ensure_synthetic_data
from ray_jobs.sweep_config import ValidatedSweep, load_sweep
from ray_jobs.trainer import connect, default_storage
from ray_jobs.tune import prepare_sweep_data, run_sweep
from sweeps.sweep_command import CONFIG_DIR

SWEEPS = (MODEL_COMPARISON, GAMMA_SWEEP)  # in the order they run


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="study name (default: paper_study-<profile>)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study")
    add_common_arguments(parser, "a TrainConfig or sweep field for both sweeps, e.g. seeds=[0,1,2]")
    return parser.parse_args(argv)


def study_overrides(sweep: str, profile: str) -> dict[str, Any]:
    """What configs/paper_study.yaml changes in one sweep for a profile (``--set`` keys -> values)."""
    path = CONFIG_DIR / "paper_study.yaml"
    raw = load_yaml(path.read_text()) or {}
    section = ((raw.get("profiles") or {}).get(profile) or {}).get(sweep) or {}
    return {**((raw.get("sweeps") or {}).get(sweep) or {}), **section}


def study_margin() -> float:
    """Finding (a)'s equivalence margin from configs/paper_study.yaml (``analysis.equivalence_margin``)."""
    path = CONFIG_DIR / "paper_study.yaml"
    raw = load_yaml(path.read_text()) or {}
    value = (raw.get("analysis") or {}).get("equivalence_margin", EQUIVALENCE_MARGIN)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        expected = "expected an SSIM difference between 0 and 1"
        raise ConfigError(f"{path}: analysis.equivalence_margin: {expected}, got {value!r}")
    return float(value)


def _plan(args: argparse.Namespace) -> tuple[StudyLayout, dict, dict[str, ValidatedSweep], tuple[int, int]]:
    """The study's record, both validated sweeps and the image size; raises the user errors of
    :mod:`ray_jobs.cli`."""
    study = StudyLayout.under(args.storage or default_storage(), args.name or f"paper_study-{args.profile}")
    saved = storage.read_json(study.study_file)
    if saved is not None and not args.resume:
        raise ConfigError(
            f"study {study.name!r} already exists at {study.path}; pass --resume to continue it or choose "
            "another --name"
        )
    if args.resume and saved is None:
        raise ConfigError(f"nothing to resume: no study at {study.path}")
    record = saved or {
        "profile": args.profile,
        "overrides": parse_overrides(args.overrides),
        "data_root": str(args.data_root or ensure_synthetic_data(args.profile)),
        "equivalence_margin": study_margin(),
        "finished": [],
    }
    sweeps = {
        name: load_sweep(
            CONFIG_DIR / f"{name}.yaml",
            record["profile"],
            {**study_overrides(name, record["profile"]), **record["overrides"]},
        )
        for name in SWEEPS
    }
    # The data of every trial of both sweeps, before anything trains.
    prepared = {name: prepare_sweep_data(sweep.trials, record["data_root"]) for name, sweep in sweeps.items()}
    return study, record, sweeps, prepared[MODEL_COMPARISON].image_size


def _measure_costs(
    study: StudyLayout, sweeps: dict[str, ValidatedSweep], image_size: tuple[int, int]
) -> None:
    """The costs of the model comparison's arms and of the Sparse Attention U-Net (the paper's gate at the
    gamma sweep's largest gamma: the penalty's cost does not depend on its weight)."""
    comparison, sweep = sweeps[MODEL_COMPARISON], sweeps[GAMMA_SWEEP]
    seed0 = [cfg for cfg in comparison.trials if cfg.seed == comparison.spec.seeds[0]]
    sparse = [cfg for cfg in sweep.trials if cfg.gamma > 0 and not cfg.identifying_options()]
    costs = measure_on_cluster(seed0 + sorted(sparse, key=lambda cfg: cfg.gamma)[-1:], image_size)
    storage.write_json(study.model_costs_file, {"image_size": list(image_size), "models": costs})


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the study; exit code 2 for a user error before any trial."""
    log_to_stdout()
    args = _parse_args(argv)
    code, planned = exit_on_user_error(lambda: _plan(args))
    if code:
        return code
    study, record, sweeps, image_size = planned
    print(
        f"{'resuming' if args.resume else 'starting'} paper study {study.name!r} (profile {record['profile']}"
        f"{', overrides ' + str(record['overrides']) if record['overrides'] else ''}) in {study.path}",
        flush=True,
    )
    storage.write_json(study.study_file, record)
    data_root = record["data_root"]
    for name in SWEEPS:
        if name in record["finished"]:
            print(f"{name}: finished earlier", flush=True)
            continue
        resume = storage.exists(experiment.ExperimentLayout.under(study.path, name).sweep_file)
        code, path = exit_on_user_error(
            lambda n=name, r=resume: run_sweep(sweeps[n], n, study.path, data_root, r).final
        )
        if code:
            return code
        write_tables(path)
        record["finished"].append(name)
        storage.write_json(study.study_file, record)
    if not storage.exists(study.model_costs_file):
        connect()
        _measure_costs(study, sweeps, image_size)
    report, findings = write_report(study.path)
    print("\n".join(["findings:", *(f"  {line}" for line in findings), f"report: {report}"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
