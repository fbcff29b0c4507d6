"""Run every analysis and write ``report.md``: each table and figure with one sentence, then the problems.

The steps: the tidy tables (:mod:`analysis.collect`), the model comparison (Table 1), the MPAND curves
(Figure 6), the gamma curves (Figure 8), the attention coefficients against epoch and gamma, the sweep
overview, the time to target (where a sweep set ``target_ssim``) and the reconstructions. A step that fails is
reported in the problem list and the others still run, so one bad file never costs the whole report.

Run ``python -m analysis.report --experiment PATH [--experiment PATH2] [--out DIR]``, or equivalently
``python -m analysis ...``.
"""

from __future__ import annotations

import argparse
import posixpath
import traceback
from collections.abc import Callable, Sequence

from analysis import (
    attention_curves,
    compare_models,
    gamma_curves,
    mpand_curves,
    reconstructions,
    sweep_overview,
    time_to_target,
)
from analysis.cli import add_common_arguments, default_out, print_result
from analysis.collect import status_counts, write_tables
from analysis.output import Artifact, OutDir, StepResult
from analysis.study import Study, load_study
from mri_models.experiment import DECISIONS_TABLE

REPORT_FILE = "report.md"
STEPS: list[Callable[[Study, OutDir], StepResult]] = [
    compare_models.run,
    mpand_curves.run,
    gamma_curves.run,
    attention_curves.run,
    sweep_overview.run,
    time_to_target.run,
    reconstructions.run,
]


def tables_step(study: Study, out: OutDir) -> StepResult:
    """collect's tidy tables (CSV and Parquet) of every experiment, under ``tables/``."""
    result = StepResult("Tidy tables")
    several = len(study.experiments) > 1
    for info in study.experiments:
        relative = posixpath.join("tables", info.name) if several else "tables"
        write_tables(info.path, out.join(relative))
        label = f" of {info.name}" if several else ""
        result.artifacts.append(
            Artifact(
                posixpath.join(relative, "trials.csv"),
                f"One row per trial{label}: configuration, status, epochs run, last and best-epoch metrics.",
            )
        )
        result.artifacts.append(
            Artifact(
                posixpath.join(relative, "epochs.csv"),
                f"One row per trial and epoch{label}: every reported metric.",
            )
        )
        result.artifacts.append(
            Artifact(
                posixpath.join(relative, "volumes.csv"),
                f"One row per volume{label} of every validation epoch and of the final test evaluation "
                "(network and zero-filled, per acceleration; patient and acquisition).",
            )
        )
        result.artifacts.append(
            Artifact(
                posixpath.join(relative, f"{DECISIONS_TABLE}.csv"),
                f"Every ASHA decision{label}: trial, its searched values, rung, value, the rung's cut-off, "
                "continue, stop or complete (empty for FIFO sweeps).",
            )
        )
        for name in ("trials", "epochs", "volumes", DECISIONS_TABLE):
            parquet = posixpath.join(relative, f"{name}.parquet")
            if out.exists(parquet):
                result.artifacts.append(Artifact(parquet, f"The same {name} table as Parquet."))
    return result


def run_safely(step: Callable[[Study, OutDir], StepResult], study: Study, out: OutDir) -> StepResult:
    try:
        return step(study, out)
    except Exception as err:  # reported, never fatal: the other analyses still run
        name = getattr(step, "__module__", str(step)).rsplit(".", 1)[-1]
        detail = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return StepResult(name, problems=[f"{name} failed: {type(err).__name__}: {err} ({detail})"])


def _image(path: str) -> bool:
    return path.endswith(".png")


def render(study: Study, results: list[StepResult]) -> str:
    """The report's Markdown: the experiments, each step's files (figures inline), then every problem."""
    lines = ["# Sweep analysis\n"]
    for info in study.experiments:
        spec = info.sweep.get("spec") or {}
        trials = study.trials
        trials = trials[trials["experiment"] == info.name] if not trials.empty else trials
        lines.append(
            f"- **{info.name}** (`{info.path}`): {spec.get('description') or spec.get('experiment', '')} — "
            f"profile `{spec.get('profile', '?')}`, {len(trials)} trials ({status_counts(trials)}), "
            f"budget {info.sweep.get('max_epochs', '?')} epochs."
        )
    lines.append("")
    verdicts = compare_models.verdicts(study)
    if verdicts:
        lines.append(
            "Against the zero-filled input (mean gain over seeds with its t and bootstrap intervals; "
            "one-sided t-tests over seeds, Holm-adjusted over the arms):\n"
        )
        lines += [f"- {verdict}" for verdict in verdicts]
        lines.append("")
    problems: list[str] = list(study.problems)
    for result in results:
        problems += result.problems
        if not result.artifacts and not result.notes:
            continue
        lines.append(f"## {result.title}\n")
        for artifact in result.artifacts:
            if _image(artifact.path):
                lines += [f"{artifact.caption}\n", f"![{artifact.path}]({artifact.path})\n"]
            else:
                lines.append(f"- [{artifact.path}]({artifact.path}): {artifact.caption}")
        if any(not _image(a.path) for a in result.artifacts):
            lines.append("")
        if result.markdown:
            lines.append(result.markdown)
        for note in result.notes:
            lines.append(f"> note: {note}\n")
    lines.append("## Problems\n")
    lines += [f"- {p}" for p in problems] if problems else ["None found."]
    return "\n".join(lines) + "\n"


def run_all(experiments: Sequence[str], out_uri: str | None = None) -> tuple[OutDir, list[StepResult], Study]:
    """Every analysis of the experiments into ``out_uri`` (default ``<first experiment>/analysis``)."""
    study = load_study(experiments)
    out = OutDir(out_uri or default_out(experiments))
    results = [run_safely(step, study, out) for step in [tables_step, *STEPS]]
    out.write_text(REPORT_FILE, render(study, results))
    return out, results, study


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        out, results, study = run_all(args.experiment, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 2
    for problem in study.problems:
        print(f"problem: {problem}")
    for result in results:
        print_result(result, out)
    print(f"report: {out.join(REPORT_FILE)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
