"""How many seeds each finding of a paper study needs: its power and planning table.

For every finding (:mod:`analysis.findings`), from the study's own variance estimates: the seeds run, the
minimum detectable effect at 80% power with them, the seeds needed to decide an effect of the size observed
(and, where the finding has one, of a stated size), each at the strictest level Holm's adjustment can ask of
a hypothesis of the findings' family, and the exact option that runs them.

Run ``python -m analysis.plan --study PATH [--margin M]``; the study report carries the same table.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import pandas as pd

from analysis.findings import EQUIVALENCE_MARGIN, Finding, findings
from analysis.inference import MAX_SEEDS, POWER
from analysis.output import markdown_table
from analysis.study import Study, load_study
from mri_models import experiment, storage
from mri_models.experiment import StudyLayout

# Which of the study's sweeps each finding's seeds come from (``--set seeds=[...]`` applies to both).
SWEEP_OF = {"a": "model_comparison", "b": "gamma_sweep", "c": "model_comparison", "d": "gamma_sweep"}


def seeds_option(n: int | None) -> str:
    """The ``--set`` that runs seeds 0..n-1 (empty when no affordable number decides)."""
    return f"--set seeds=[{','.join(str(s) for s in range(n))}]" if n else ""


def plan_table(items: Sequence[Finding]) -> pd.DataFrame:
    """One row per finding: seeds run, detectable effect, seeds needed, and the option that runs them."""
    rows = []
    for finding in items:
        plan = finding.plan
        needed = plan.needed_observed if plan else None
        rows.append(
            {
                "finding": finding.key,
                "claim": finding.claim,
                "verdict": finding.verdict,
                "sweep": SWEEP_OF.get(finding.key, ""),
                "test": finding.test,
                "seeds_run": plan.seeds if plan else finding.n,
                "observed": plan.observed if plan else finding.estimate,
                "unit": finding.effect_unit,
                "detectable_80pct": plan.detectable if plan else math.nan,
                "seeds_needed_observed": needed,
                "stated_effect": plan.stated if plan else math.nan,
                "seeds_needed_stated": plan.needed_stated if plan else None,
                "run": seeds_option(needed),
            }
        )
    return pd.DataFrame(rows)


# Beyond this many seeds a table cell shortens the option (plan.csv and `python -m analysis.plan`: whole).
_SEEDS_SHOWN = 10


def _run_cell(row: pd.Series) -> str:
    if not row["run"]:
        return "–"
    needed = int(row["seeds_needed_observed"])
    run = row["run"] if needed <= _SEEDS_SHOWN else f"--set seeds=[0,1,…,{needed - 1}]"
    return f"`{run}` ({row['sweep']})"


def _count(n) -> str:
    return f"> {MAX_SEEDS}" if n is None or pd.isna(n) else str(int(n))


def plan_markdown(table: pd.DataFrame) -> str:
    """The planning table for a report."""
    if table.empty:
        return "_(no findings to plan)_\n"
    rows = []
    for _, row in table.iterrows():
        stated = (
            "–"
            if pd.isna(row["stated_effect"])
            else f"{_count(row['seeds_needed_stated'])} for {row['stated_effect']:+g}"
        )
        rows.append(
            {
                "Finding": f"({row['finding']}) {row['claim']}",
                "Verdict": row["verdict"],
                "Seeds run": int(row["seeds_run"]),
                "Observed": "–" if pd.isna(row["observed"]) else f"{row['observed']:+.4g} {row['unit']}",
                f"Detectable at {POWER:.0%} power": "–"
                if pd.isna(row["detectable_80pct"])
                else f"{row['detectable_80pct']:.4g}",
                "Seeds needed (observed)": _count(row["seeds_needed_observed"]),
                "Seeds needed (stated)": stated,
                "Run": _run_cell(row),
            }
        )
    note = (
        f"\nPower {POWER:.0%} at the strictest level Holm's adjustment can ask of one hypothesis of the "
        "family; the trend findings (Page's test) are planned by simulating the test under the study's own "
        "level means and within-seed noise; the t-based ones from the noncentral t (statsmodels). "
        "`--set seeds=[...]` applies to both sweeps of `sweeps/paper_study.py`; a new `--name` keeps the old "
        f"study. Options of more than {_SEEDS_SHOWN} seeds are shortened here; `plan.csv` and "
        "`python -m analysis.plan` give them whole.\n"
    )
    return markdown_table(pd.DataFrame(rows)) + note


def load_paper_study(path: str) -> tuple[StudyLayout, Study, Study, float]:
    """A study directory's layout, both sweeps (empty where not run yet) and its recorded margin.

    Raises:
        FileNotFoundError: when ``path`` holds no study.
    """
    layout = StudyLayout(path)
    record = storage.read_json(layout.study_file)
    if record is None:
        raise FileNotFoundError(f"no study at {path} (no {experiment.STUDY_FILE})")
    mc, gamma = (_load_or_empty(e.path) for e in (layout.model_comparison, layout.gamma_sweep))
    return layout, mc, gamma, float(record.get("equivalence_margin", EQUIVALENCE_MARGIN))


def _load_or_empty(path: str) -> Study:
    """The experiment as a study, or an empty one whose problem says it is missing (not run yet)."""
    try:
        return load_study([path])
    except FileNotFoundError as err:
        return Study([], pd.DataFrame(), pd.DataFrame(), [], {}, [], [f"{err} (not run yet?)"])


def positive_margin(text: str) -> float:
    """``--margin``: a positive SSIM difference."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (0 < value < 1):
        raise argparse.ArgumentTypeError(f"expected an SSIM difference between 0 and 1, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="study directory (local path or URI)")
    parser.add_argument(
        "--margin", type=positive_margin, help="finding (a)'s equivalence margin (default: the study's)"
    )
    args = parser.parse_args(argv)
    try:
        _, mc, gamma, margin = load_paper_study(args.study)
    except FileNotFoundError as err:
        print(f"error: {err}")
        return 2
    table = plan_table(findings(mc, gamma, args.margin or margin))
    print(plan_markdown(table))
    for _, row in table[table["run"] != ""].iterrows():
        print(f"({row['finding']}) {row['sweep']}: {row['run']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
