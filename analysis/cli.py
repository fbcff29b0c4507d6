"""The command line every analysis script shares: ``--experiment PATH`` (repeatable) and ``--out DIR``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from analysis.output import OutDir, StepResult
from analysis.study import Study, load_study
from mri_models.experiment import ExperimentLayout


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment",
        action="append",
        required=True,
        help="experiment directory (local path or s3:// URI); repeat to analyse several together",
    )
    parser.add_argument("--out", help="output directory (default: <first experiment>/analysis)")


def default_out(experiments: Sequence[str]) -> str:
    return ExperimentLayout(experiments[0]).analysis_dir


def print_result(result: StepResult, out: OutDir) -> None:
    for artifact in result.artifacts:
        print(f"wrote {out.join(artifact.path)}")
    for note in result.notes:
        print(f"note: {note}")
    for problem in result.problems:
        print(f"problem: {problem}")


def run_step(
    step: Callable[[Study, OutDir], StepResult], argv: Sequence[str] | None, description: str
) -> int:
    """The command line of one analysis script: load the experiments, run ``step(study, out)``, print."""
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        study = load_study(args.experiment)
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 2
    out = OutDir(args.out or default_out(args.experiment))
    for problem in study.problems:
        print(f"problem: {problem}")
    print_result(step(study, out), out)
    return 0
