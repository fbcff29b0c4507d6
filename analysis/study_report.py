"""The paper study's report: Table 1 beside the paper's, Figures 6 and 8, the findings checked, model costs.

Reads a study directory written by ``sweeps/paper_study.py`` (:class:`mri_models.experiment.StudyLayout`)
and writes ``report/``: ``report.md`` with every table and figure, ``table1.csv``, ``findings.csv``,
``model_costs.csv``, and the model-comparison and gamma-curve files of :mod:`analysis.compare_models`,
:mod:`analysis.mpand_curves` (Figure 6), :mod:`analysis.gamma_curves` (Figure 8) and
:mod:`analysis.reconstructions`.

The paper's findings are checked by :mod:`analysis.findings`: each with its effect, t and crossed-bootstrap
intervals, the test that decides it, its Holm-adjusted p-value, its verdict and the seeds it needs
(:mod:`analysis.plan` prints the plan alone). The equivalence margin of finding (a) is the study's recorded
``equivalence_margin`` (``--margin`` overrides it; default :data:`analysis.findings.EQUIVALENCE_MARGIN`).

Table 1's Sparse Attention U-Net is the gamma sweep's best gamma > 0 with the paper's gate, chosen by mean
validation SSIM over seeds and reported on the test split (the model comparison trains the other two).

Run ``python -m analysis.study_report --study PATH [--out DIR]``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis import attention_curves, compare_models, gamma_curves, mpand_curves, reconstructions
from analysis.collect import status_counts
from analysis.findings import EQUIVALENCE_MARGIN, PAPER_GATE, Finding, best_sparse_gamma, findings, gates
from analysis.inference import MAX_SEEDS
from analysis.output import OutDir, StepResult, markdown_table, mean_std_text
from analysis.plan import load_paper_study, plan_markdown, plan_table, positive_margin
from analysis.points import point_label, test_points
from analysis.report import run_safely
from analysis.study import Study, reported_point
from mri_models import storage
from mri_models.arms import arm_of
from mri_models.experiment import StudyLayout
from mri_models.metrics import PRIMARY_METRIC, metric_table

PAPER = "Chou and Robaina, *Accelerating MRI Reconstruction via Deep Learning*"
# The paper's Table 1 ("Validation Set Results, using the best hyperparameter configuration for each
# model"), fastMRI single-coil knee, 50 epochs, by the model each row names.
PAPER_TABLE_1 = {
    "unet": {"label": "Vanilla U-Net", "nmse": 0.034, "psnr": 31.9, "ssim": 0.73},
    "attention_unet": {"label": "U-Net with attention", "nmse": 0.033, "psnr": 32.0, "ssim": 0.73},
    "sparse_attention_unet": {
        "label": "U-Net with sparse-attention",
        "nmse": 0.045,
        "psnr": 30.2,
        "ssim": 0.71,
    },
}


def with_sparse_arm(model_comparison: Study, gamma_sweep: Study) -> tuple[Study, str]:
    """The model comparison with Table 1's Sparse Attention U-Net: the gamma sweep's best gamma > 0 with the
    paper's gate by mean validation SSIM over seeds (its trials, reported like the others), and a note."""
    trials = gamma_sweep.included_trials()
    if trials.empty or model_comparison.trials.empty:
        return model_comparison, "no gamma sweep trials: Table 1 has no Sparse Attention U-Net from it"
    chosen, by_gamma = best_sparse_gamma(trials)
    if chosen is None:
        return model_comparison, "the gamma sweep has no γ > 0 with the paper's gate"
    selected = gamma_sweep.trials[
        (gamma_sweep.trials["gamma"] == chosen) & (gates(gamma_sweep.trials) == PAPER_GATE)
    ]
    keep = model_comparison.trials["model"] != "sparse_attention_unet"
    combined = pd.concat([model_comparison.trials[keep], selected], ignore_index=True)
    volumes = gamma_sweep.volumes
    if not volumes.empty and "trial_id" in volumes:
        volumes = volumes[volumes["trial_id"].isin(selected["trial_id"])]
    volumes = pd.concat([model_comparison.volumes, volumes], ignore_index=True)
    study = replace(model_comparison, trials=combined, volumes=volumes)
    grid = ", ".join(f"γ={g:g}: {v:.4f}" for g, v in by_gamma.items())
    note = (
        f"Sparse Attention U-Net: γ={chosen:g}, the gamma sweep's best γ > 0 with the paper's gate by mean "
        f"validation {PRIMARY_METRIC.upper()} over seeds ({grid}); its test numbers were read by no choice."
    )
    return study, note


# ----------------------------------------------------------------------------------------- tables


def table_one(study: Study, point: str | None = None) -> pd.DataFrame:
    """Our Table 1 (best epoch, mean ± std over seeds) beside the paper's, with the zero-filled row.

    Rows are the comparison's arms in SSIM order; ``ssim_rank`` and ``paper_ssim_rank`` compare orderings,
    which survive the change of data and budget when absolute values do not.
    """
    summary = compare_models.summary_table(study)
    if summary.empty:
        return summary
    point = point or reported_point(study)
    gain = compare_models.gain_column(point, "ssim")
    rows = []
    for _, row in summary.iterrows():
        baseline = row["statuses"] == "baseline (no training)"
        paper = {} if baseline else PAPER_TABLE_1.get(str(row.get("model")), {})
        label = row["arm"] if baseline else arm_of(row["model"], {"gamma": row.get("gamma") or 0.0}).label
        out = {"arm": row["arm"], "label": label, "model": row.get("model"), "seeds": row.get("seeds")}
        for metric in metric_table():
            out[f"{metric}_mean"] = row[f"{metric}_{point}_mean"]
            out[f"{metric}_std"] = row.get(f"{metric}_{point}_std")
            out[f"paper_{metric}"] = paper.get(metric, math.nan)
        # The validation SSIM each checkpoint was chosen by, beside the test value it is reported with.
        out["val_ssim_mean"], out["val_ssim_std"] = row["ssim_best_mean"], row.get("ssim_best_std")
        if not baseline:
            out["ssim_gain"] = row[f"{gain}_mean"]
            out["ssim_gain_ci95_low"] = row[f"{gain}_ci95_low"]
            out["ssim_gain_ci95_high"] = row[f"{gain}_ci95_high"]
            out["ssim_gain_boot95_low"] = row.get(f"{gain}_boot95_low", math.nan)
            out["ssim_gain_boot95_high"] = row.get(f"{gain}_boot95_high", math.nan)
        rows.append(out)
    table = pd.DataFrame(rows)
    table.attrs["point"] = point
    trained = table["paper_ssim"].notna()
    table.loc[trained, "ssim_rank"] = table.loc[trained, "ssim_mean"].rank(ascending=False, method="min")
    table.loc[trained, "paper_ssim_rank"] = table.loc[trained, "paper_ssim"].rank(
        ascending=False, method="min"
    )
    return table


def table_one_markdown(table: pd.DataFrame) -> str:
    rows = []
    for _, row in table.iterrows():
        out = {"Architecture": row["label"], "Seeds": "–" if pd.isna(row["seeds"]) else int(row["seeds"])}
        for metric, spec in metric_table().items():
            out[f"{spec.label} (ours)"] = mean_std_text(row[f"{metric}_mean"], row[f"{metric}_std"], spec.fmt)
            paper = row[f"paper_{metric}"]
            out[f"{spec.label} (paper)"] = "–" if pd.isna(paper) else f"{paper:g}"
        if str(table.attrs.get("point", "best")).startswith("test_"):
            selected = mean_std_text(row["val_ssim_mean"], row["val_ssim_std"], ".4f")
            out["SSIM (validation, selected)"] = selected
        gain = row.get("ssim_gain")
        out["SSIM gain over zero-filled (95% CI)"] = (
            "–"
            if pd.isna(gain)
            else compare_models.gain_text(
                gain,
                row["ssim_gain_ci95_low"],
                row["ssim_gain_ci95_high"],
                ".4f",
                row.get("ssim_gain_boot95_low", math.nan),
                row.get("ssim_gain_boot95_high", math.nan),
            )
        )
        rank, paper_rank = row.get("ssim_rank"), row.get("paper_ssim_rank")
        out["SSIM rank (ours / paper)"] = "–" if pd.isna(rank) else f"{int(rank)} / {int(paper_rank)}"
        rows.append(out)
    return markdown_table(pd.DataFrame(rows))


def cost_table(costs: list[dict]) -> pd.DataFrame:
    """The measured costs with ratios to the U-Net's (the first row when there is no U-Net)."""
    table = pd.DataFrame(costs)
    if table.empty:
        return table
    reference = table[table["model"] == "unet"].iloc[0] if (table["model"] == "unet").any() else table.iloc[0]
    for column in ("parameters", "size_mb", "peak_step_mb", "forward_ms"):
        table[f"{column}_vs_{reference['arm']}"] = table[column] / reference[column]
    return table


def cost_markdown(table: pd.DataFrame) -> str:
    column = next(c for c in table.columns if c.startswith("forward_ms_vs_"))
    reference = column.removeprefix("forward_ms_vs_")
    rows = []
    for _, row in table.iterrows():
        rows.append(
            {
                "Architecture": row["label"],
                "Parameters": f"{int(row['parameters']):,} (×{row[f'parameters_vs_{reference}']:.3f})",
                "Size (MB)": f"{row['size_mb']:.2f} (×{row[f'size_mb_vs_{reference}']:.3f})",
                "Peak training-step memory (MB)": (
                    f"{row['peak_step_mb']:.1f} (×{row[f'peak_step_mb_vs_{reference}']:.2f})"
                ),
                "Forward time (ms, median [min–max])": (
                    f"{row['forward_ms']:.1f} [{row['forward_ms_min']:.1f}–{row['forward_ms_max']:.1f}] "
                    f"(×{row[f'forward_ms_vs_{reference}']:.2f})"
                ),
            }
        )
    return markdown_table(pd.DataFrame(rows))


# ----------------------------------------------------------------------------------------- report


def _finding_lines(items: list[Finding]) -> list[str]:
    """Each finding as a results-section sentence: verdict, test, adjusted p, seeds needed, statistic."""
    lines = []
    for f in items:
        p = (
            ""
            if math.isnan(f.p_adjusted)
            else f"Holm-adjusted p = {f.p_adjusted:.3g} (raw {f.p_value:.3g}); "
        )
        needed = ""
        if f.plan is not None:
            n = f.plan.needed_observed
            needed = f"seeds needed for the effect observed: {n if n else f'more than {MAX_SEEDS}'}; "
        test = f"{f.test}; " if f.test else ""
        lines.append(f"({f.key}) {f.claim} [{f.source}]: **{f.verdict}** — {test}{p}{needed}{f.statistic}")
    return lines


def _step_section(result: StepResult) -> list[str]:
    lines = []
    for artifact in result.artifacts:
        if artifact.path.endswith(".png"):
            lines += [f"{artifact.caption}\n", f"![{artifact.path}]({artifact.path})\n"]
    lines += [f"> note: {note}\n" for note in result.notes]
    return lines


def render(
    layout: StudyLayout,
    mc: Study,
    gamma: Study,
    checked: list[Finding],
    tables1: list[pd.DataFrame],
    costs: dict | None,
    steps: dict[str, StepResult],
    table_study: Study | None = None,
    sparse_note: str = "",
    margin: float = EQUIVALENCE_MARGIN,
) -> str:
    """The study's ``report.md``: the experiments, the findings and their planning table, Table 1, the
    figures' steps, the model costs and every problem found."""
    lines = [
        *_header_lines(layout, mc, gamma),
        *_findings_section(checked, margin),
        *_table_one_sections(tables1, table_study or mc, sparse_note),
        "The paper's columns are its Table 1 (fastMRI knee, 320 × 320, 50 epochs); ours come from the "
        "`model_comparison` experiment and, for the Sparse Attention U-Net, the `gamma_sweep`. Absolute "
        "values depend on the data and the budget (the `cpu` and `smoke` profiles train small networks "
        "briefly on synthetic knees); compare the orderings and the gains over the zero-filled input. "
        "Paired differences: `compare_models.md`.\n",
        "## Figure 6: MPAND during training\n",
        *_step_section(steps["mpand"]),
        "## Figure 8: SSIM against γ\n",
        *_step_section(steps["gamma"]),
        "## Attention coefficients against epoch and γ (finding d)\n",
        *_step_section(steps["attention"]),
        *([steps["attention"].markdown, ""] if steps["attention"].markdown else []),
        "## Model cost (Figures 15 and 16)\n",
        *_cost_section(costs),
        "## Reconstructions\n",
        *_step_section(steps["reconstructions"]),
    ]
    problems = [*mc.problems, *gamma.problems]
    for result in steps.values():
        problems += result.problems
    lines += ["## Problems\n", *([f"- {p}" for p in problems] if problems else ["None found."])]
    return "\n".join(lines) + "\n"


def _header_lines(layout: StudyLayout, mc: Study, gamma: Study) -> list[str]:
    """The title, what the study reproduces with which profile and data, and its experiments."""
    record = storage.read_json(layout.study_file) or {}
    lines = [f"# Paper study: {layout.name}\n"]
    lines.append(
        f"Reproduces {PAPER}: profile `{record.get('profile', '?')}`, data `{record.get('data_root', '?')}`. "
        "Every number is a mean over seeds with its spread or 95% interval, and set against the zero-filled "
        "input. Experiments:\n"
    )
    for study in (mc, gamma):
        for info in study.experiments:
            lines.append(
                f"- `{info.name}` ({info.path}): {len(study.trials)} trials ({status_counts(study.trials)}), "
                f"{info.sweep.get('max_epochs', '?')} epochs each at most."
            )
    return lines


def _findings_section(checked: list[Finding], margin: float) -> list[str]:
    """The findings' verdicts, how they were decided, and the seeds each finding needs."""
    return [
        "",
        "## Findings\n",
        *[f"- {line}" for line in _finding_lines(checked)],
        "",
        "Verdicts at the 95% level after Holm's adjustment over every hypothesis of the findings (each "
        f"one's reproduced and not-reproduced alternatives); (a) counts SSIM differences within ±{margin:g} "
        "as a match. Intervals: t over seeds (these test volumes) and the crossed bootstrap over seeds and "
        "test volumes (new seeds and new knees). *Inconclusive* means the seeds do not separate the answers; "
        "the planning table says how many would. Decision rules: `docs/statistics.md`.\n",
        "## Planning: the seeds each finding needs\n",
        plan_markdown(plan_table(checked)),
    ]


def _cost_section(costs: dict | None) -> list[str]:
    """The model-cost table and how it was measured (a note when the study recorded none)."""
    if not costs:
        return ["_(no model costs recorded: model_costs.json is missing)_\n"]
    size = "×".join(str(s) for s in costs.get("image_size", []))
    first = costs["models"][0] if costs["models"] else {}
    return [
        cost_markdown(cost_table(costs["models"])),
        f"Measured side by side in one process on `{first.get('device', '?')}` at {size} with batch size "
        f"{first.get('batch_size', '?')}: parameters and state-dict size; the most memory one training "
        "step (forward, loss with penalties, backward, Adam) holds above the weights; inference forward "
        "time over interleaved repeats. Ratios are to the U-Net.\n",
    ]


def _table_one_sections(tables1: list[pd.DataFrame], study: Study, sparse_note: str = "") -> list[str]:
    """Table 1 per reported point (each test setting, or validation when there is no test evaluation),
    then the test split per acceleration and acquisition."""
    lines = []
    for table in tables1:
        point = str(table.attrs.get("point", "best"))
        lines.append(f"## Table 1: {point_label(point)}\n")
        if not point.startswith("test_"):
            lines.append("_No test evaluation (an experiment from before the held-out split): validation "
                         "numbers, chosen on the same data._\n")  # fmt: skip
        lines.append(table_one_markdown(table) if not table.empty else "_(no trial has metrics)_\n")
    if any(str(t.attrs.get("point", "")).startswith("test_") for t in tables1):
        rule = "Each trial's checkpoint is chosen on validation (its best validation SSIM); the test split, "
        lines.insert(1, rule + "which no choice read, reports it.\n")
    if sparse_note:
        lines.insert(1, f"{sparse_note}\n")
    breakdown = compare_models.breakdown_table(study)
    if not breakdown.empty:
        lines += ["## Test split per acceleration and acquisition\n",
                  compare_models.breakdown_markdown(breakdown)]  # fmt: skip
    return lines


def write_report(
    study_path: str, out_uri: str | None = None, margin: float | None = None
) -> tuple[str, list[str]]:
    """Write the study's report; returns its path and the findings, one line each.

    Args:
        study_path: the study directory.
        out_uri: where the report goes (default ``<study>/report``).
        margin: finding (a)'s equivalence margin (default: the study's recorded one).

    Raises:
        FileNotFoundError: when ``study_path`` holds no study.
    """
    layout, mc, gamma, recorded = load_paper_study(study_path)
    margin = margin or recorded
    out = OutDir(out_uri or layout.report_dir)
    steps = {
        "compare": run_safely(compare_models.run, mc, out),
        "mpand": run_safely(mpand_curves.run, mc, out),
        "gamma": run_safely(gamma_curves.run, gamma, out),
        "attention": run_safely(attention_curves.run, gamma, out),
        "reconstructions": run_safely(reconstructions.run, mc, out),
    }
    checked = findings(mc, gamma, margin)
    out.write_csv("findings.csv", pd.DataFrame([f.row() for f in checked]))
    out.write_csv("plan.csv", plan_table(checked))
    table_study, sparse_note = with_sparse_arm(mc, gamma)
    reported = test_points(table_study.trials) if not table_study.trials.empty else []
    tables1 = [table_one(table_study, point) for point in reported or ["best"]]
    out.write_csv("table1.csv", pd.concat([t.assign(point=t.attrs.get("point")) for t in tables1]))
    costs = storage.read_json(layout.model_costs_file)
    if costs:
        out.write_csv("model_costs.csv", cost_table(costs["models"]))
    report = render(layout, mc, gamma, checked, tables1, costs, steps, table_study, sparse_note, margin)
    out.write_text("report.md", report)
    return out.join("report.md"), _finding_lines(checked)


README_BEGIN, README_END = "<!-- study-results:begin -->", "<!-- study-results:end -->"


class MissingMarkersError(ValueError):
    """A file given to ``--readme`` has no study-results block to rewrite."""


def readme_block(study_path: str, command: str, margin: float | None = None) -> str:
    """The study's results for a README: one line naming the study (profile, seeds, date of its
    ``study.json``) and ``command``, the command that generated it, then what ``report.md`` leads with:
    the findings' planning table (verdicts, seeds run, seeds needed) and Table 1 at the first reported point.

    Raises:
        FileNotFoundError: when ``study_path`` holds no study.
    """
    layout, mc, gamma, recorded = load_paper_study(study_path)
    checked = findings(mc, gamma, margin or recorded)
    table_study, _ = with_sparse_arm(mc, gamma)
    points = test_points(table_study.trials) if not table_study.trials.empty else []
    table = table_one(table_study, (points or ["best"])[0])
    record = storage.read_json(layout.study_file) or {}
    written = datetime.fromtimestamp(storage.stat(layout.study_file).mtime_ns / 1e9, tz=timezone.utc)
    seeds = "; ".join(
        f"{name} seeds {', '.join(str(int(s)) for s in sorted(study.trials['seed'].dropna().unique()))}"
        for name, study in (("model comparison", mc), ("gamma sweep", gamma))
        if not study.trials.empty
    )
    lines = [
        f"Study `{layout.name}`: profile `{record.get('profile', '?')}`, {seeds or 'no trials'}, "
        f"`study.json` of {written:%Y-%m-%d}. Generated by `{command}`.\n",
        plan_markdown(plan_table(checked)),
        f"Table 1, {point_label(str(table.attrs.get('point', 'best')))}:\n",
        table_one_markdown(table) if not table.empty else "_(no trial has metrics)_\n",
    ]
    return "\n".join(lines)


def write_readme_results(readme: str, study_path: str, command: str, margin: float | None = None) -> None:
    """Replace what lies between ``README_BEGIN`` and ``README_END`` in ``readme`` with
    :func:`readme_block`, atomically (an interrupted run leaves the old file).

    Raises:
        FileNotFoundError: when ``readme`` or the study does not exist.
        MissingMarkersError: when ``readme`` lacks the markers.
    """
    text = Path(readme).read_text(encoding="utf-8")
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise MissingMarkersError(f"{readme} has no {README_BEGIN} ... {README_END} block to rewrite")
    block = readme_block(study_path, command, margin)
    updated = f"{text[: begin + len(README_BEGIN)]}\n{block}{text[end:]}"
    storage.write_text(str(readme), updated)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="study directory (local path or URI)")
    parser.add_argument("--out", help="output directory (default: <study>/report)")
    parser.add_argument(
        "--margin", type=positive_margin, help="finding (a)'s equivalence margin (default: the study's)"
    )
    parser.add_argument(
        "--readme", metavar="PATH", help="rewrite the study-results block of this Markdown file instead"
    )
    args = parser.parse_args(argv)
    try:
        if args.readme:
            words = sys.argv[1:] if argv is None else list(argv)
            command = shlex.join(["python", "-m", "analysis.study_report", *words])
            write_readme_results(args.readme, args.study, command, args.margin)
            print(f"{args.readme}: the results of {args.study}")
            return 0
        report, lines = write_report(args.study, args.out, args.margin)
    except (FileNotFoundError, MissingMarkersError) as err:
        print(f"error: {err}")
        return 2
    print("\n".join([*lines, f"report: {report}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
