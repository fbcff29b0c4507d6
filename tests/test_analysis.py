"""The analysis scripts on canned experiment directories in Tune's layout (no Ray, a few seconds)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from analysis import compare_models, gamma_curves, reconstructions, sweep_overview
from analysis.inference import paired_test
from analysis.output import OutDir, StepResult
from analysis.report import run_safely
from analysis.study import load_study
from mri_models.experiment import ASHA_STATE_FILE
from tests.analysis_fixtures import ZERO_FILLED, gamma_sweep, make_data_root, model_comparison

REPO = Path(__file__).resolve().parents[1]
ARM_OF_MODEL = {
    "unet": "unet",
    "attention_unet": "attention_unet",
    "sparse_attention_unet": "sparse_attention_unet (γ=0.0001)",
}


@pytest.fixture(scope="module")
def canned(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experiments")
    data_root = make_data_root(root / "data")
    comparison = model_comparison(root, data_root)
    sweep = gamma_sweep(root, root / "no-such-data")
    return {"comparison": comparison.path, "sweep": sweep.path, "root": root}


@pytest.fixture(scope="module")
def cli_out(canned) -> tuple[subprocess.CompletedProcess, Path]:
    """``python -m analysis`` on both canned experiments together, run once for the module."""
    out = canned["root"] / "analysis-out"
    process = subprocess.run(
        [sys.executable, "-m", "analysis", "--experiment", str(canned["comparison"]), "--experiment",
         str(canned["sweep"]), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "MPLBACKEND": "Agg"},
    )  # fmt: skip
    return process, out


# ----------------------------------------------------------------------------------------- by hand


def _trials_by_hand(experiment: Path) -> list[dict]:
    """Every trial's status and best/last metrics straight from its files, in plain Python."""
    sweep = json.loads((experiment / "sweep.json").read_text())
    stopped = set(json.loads((experiment / ASHA_STATE_FILE).read_text())["stopped_trials"])
    trials = []
    for trial_dir in sorted(experiment.glob("run_trial_*")):
        lines = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        params = json.loads((trial_dir / "params.json").read_text())
        error = trial_dir / "error.txt"
        if error.exists():
            status = "diverged" if "diverged" in error.read_text() else "errored"
        elif lines and lines[-1]["epoch"] >= sweep["max_epochs"]:
            status = "completed"
        elif lines and lines[0]["trial_id"] in stopped:
            status = "stopped"
        else:
            status = "unfinished"
        best = max(lines, key=lambda line: line["ssim"]) if lines else None
        trials.append({**params, "status": status, "best": best, "last": lines[-1] if lines else None})
    return trials


def test_table_equals_recomputation_from_result_json(canned):
    study = load_study([str(canned["comparison"])])
    table = compare_models.summary_table(study).set_index("arm")
    trials = _trials_by_hand(canned["comparison"])
    for model, arm in ARM_OF_MODEL.items():
        mine = [t for t in trials if t["model"] == model and t["status"] not in ("errored", "diverged")]
        failed = [t for t in trials if t["model"] == model and t["status"] in ("errored", "diverged")]
        assert table.loc[arm, "failed"] == len(failed)
        for point in ("best", "last"):
            for metric in ("ssim", "psnr", "nmse"):
                values = [t[point][metric] for t in mine]
                assert table.loc[arm, f"{metric}_{point}_n"] == len(values)
                assert table.loc[arm, f"{metric}_{point}_mean"] == pytest.approx(statistics.mean(values))
                assert table.loc[arm, f"{metric}_{point}_std"] == pytest.approx(statistics.stdev(values))
    # Sorted by SSIM at the reported point: ASHA stopped a trial, so the common budget (equal training).
    assert study.budget is not None
    assert list(table["ssim_budget_mean"]) == sorted(table["ssim_budget_mean"], reverse=True)


def test_mean_and_std_over_seeds_by_hand(canned):
    table = compare_models.summary_table(load_study([str(canned["comparison"])])).set_index("arm")
    # U-Net best SSIM over seeds 0-2 (seed 3 errored): 0.60, 0.62, 0.64.
    assert table.loc["unet", "ssim_best_mean"] == pytest.approx(0.62)
    assert table.loc["unet", "ssim_best_std"] == pytest.approx(0.02)
    assert table.loc["unet", "seeds"] == 3
    # Attention U-Net at the last epoch: 0.63, 0.66, 0.65 and the unfinished seed's 0.45.
    # mean 2.39 / 4 = 0.5975; squared deviations 0.0325², 0.0625², 0.0525², 0.1475² sum to 0.029475.
    assert table.loc["attention_unet", "ssim_last_mean"] == pytest.approx(0.5975)
    assert table.loc["attention_unet", "ssim_last_std"] == pytest.approx(math.sqrt(0.029475 / 3))
    assert table.loc["attention_unet", "statuses"] == "3 completed, 1 unfinished"
    assert table.loc["sparse_attention_unet (γ=0.0001)", "statuses"] == "2 completed, 1 diverged, 1 stopped"


def test_paired_test_known_answer():
    result = paired_test([1, 2, 3, 4, 5])
    sd = math.sqrt(2.5)  # sum of squared deviations 10, over n - 1 = 4
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4)
    assert result["n"] == 5 and result["mean"] == pytest.approx(3.0)
    assert result["std"] == pytest.approx(sd)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((3 - half, 3 + half))
    t = 3.0 / (sd / math.sqrt(5))
    assert result["t"] == pytest.approx(t)
    assert result["p_ttest"] == pytest.approx(2 * stats.t.sf(t, 4))
    assert math.isnan(result["p_wilcoxon"])  # five pairs: too few for a Wilcoxon test at 5%
    # Six positive differences: the exact two-sided Wilcoxon p-value is 2 / 2^6.
    assert paired_test([1, 2, 3, 4, 5, 6])["p_wilcoxon"] == pytest.approx(2 / 64)
    assert math.isnan(paired_test([0.5])["ci_low"])


def test_paired_differences_over_matched_seeds(canned):
    table = compare_models.paired_differences(load_study([str(canned["comparison"])]))
    row = table[
        (table["arm"] == "attention_unet") & (table["reference"] == "unet")
        & (table["metric"] == "ssim") & (table["point"] == "best")
    ].iloc[0]  # fmt: skip
    # Seeds 0-2 match (U-Net seed 3 errored): 0.63 - 0.60, 0.66 - 0.62, 0.67 - 0.64.
    assert row["pairs"] == 3
    assert row["mean_difference"] == pytest.approx((0.03 + 0.04 + 0.03) / 3)


def test_problems_are_reported_not_raised(canned):
    study = load_study([str(canned["comparison"]), str(canned["sweep"])])
    text = "\n".join(study.problems)
    assert "aa001_00003 errored" in text and "RuntimeError: worker died" in text
    assert "aa001_00011 diverged" in text
    assert "no value of psnr" in text  # the missing metric
    assert "only 7 of 9 grid trials were started" in text  # the interrupted sweep
    assert "unfinished" in text
    statuses = dict(zip(study.trials["trial_id"], study.trials["status"], strict=True))
    assert statuses["bb002_00006"] == "unfinished"  # started, reported nothing
    assert statuses["bb002_00004"] == "stopped"

    result = reconstructions.run(load_study([str(canned["sweep"])]), OutDir(str(canned["root"] / "recon")))
    assert not result.artifacts
    assert any("no-such-data" in p for p in result.problems)


def test_gamma_curves_use_a_common_budget(canned):
    study = load_study([str(canned["sweep"])])
    points, budget = gamma_curves.trial_points(study)
    assert budget == 1  # the stopped trial reached only epoch 1
    at_budget = points[(points["point"] == "budget") & (points["gamma"] == 0.0)]
    assert sorted(at_budget["ssim"]) == pytest.approx([0.50, 0.51, 0.52])
    table = gamma_curves.curves_table(points, study.config_keys)
    row = table[(table["point"] == "best") & (table["gamma"] == 1e-4)].iloc[0]
    assert row["stopped"] == 1 and row["ssim_mean"] == pytest.approx((0.58 + 0.47) / 2)


def test_a_failing_step_is_reported(canned):
    def broken(study, out):
        raise ValueError("boom")

    result = run_safely(broken, load_study([str(canned["sweep"])]), OutDir(str(canned["root"] / "x")))
    assert isinstance(result, StepResult) and "boom" in result.problems[0]


def test_cli_writes_report_referencing_every_file(cli_out):
    process, out = cli_out
    assert process.returncode == 0, process.stdout + process.stderr
    report = (out / "report.md").read_text()
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "report.md"]
    assert len(files) >= 15
    for name in files:
        assert f"({name})" in report, f"report.md does not link {name}"
    assert "## Problems" in report and "diverged" in report and "no value of psnr" in report
    assert "no readable checkpoint for trial aa001_00002" in report  # the U-Net without checkpoints


def test_every_figure_is_a_valid_png(cli_out):
    _, out = cli_out
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"mpand_curves.png", "gamma_curves.png", "sweep_parallel.png", "learning_curves.png"} <= names
    assert sum(n.startswith("reconstructions_") for n in names) == 2
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png.name
        image = mpimg.imread(png)
        assert image.ndim == 3 and min(image.shape[:2]) > 100, png.name


def test_reconstructions_use_each_arms_best_checkpoint(cli_out):
    _, out = cli_out
    table = pd.read_csv(out / "reconstructions.csv")
    chosen = table.dropna(subset=["trial_id"]).drop_duplicates("arm").set_index("arm")
    # Attention U-Net: seed 2 has the best SSIM (0.67 at epoch 2); its epoch-2 checkpoint, not the latest.
    assert chosen.loc["attention_unet", "trial_id"] == "aa001_00006"
    assert chosen.loc["attention_unet", "checkpoint"].endswith("checkpoint_2026-11-24_02-06-02.000000")
    assert chosen.loc["attention_unet", "checkpoint_epoch"] == 2
    # U-Net: the best trial (seed 2) kept no checkpoint, so the next best (seed 1) is shown.
    assert chosen.loc["unet", "trial_id"] == "aa001_00001"
    assert table["ssim"].between(-1, 1).all()


def test_a_script_runs_alone_as_a_file(canned, tmp_path):
    process = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "compare_models.py"), "--experiment", str(canned["sweep"]),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stdout + process.stderr
    assert "problem: " in process.stdout  # the interrupted sweep is reported on the console too
    table = pd.read_csv(tmp_path / "compare_models.csv")
    # A gamma sweep: gamma = 0 is the Attention U-Net arm, each other gamma an arm of its own.
    # The zero-filled input is a row of its own, the reference every arm is read against.
    assert set(table["arm"]) == {
        "attention_unet", "sparse_attention_unet (γ=0.0001)", "sparse_attention_unet (γ=0.01)",
        "zero-filled input",
    }  # fmt: skip
    assert re.search(r"\| attention_unet +\|", (tmp_path / "compare_models.md").read_text())


def test_experiments_without_recorded_trial_configs_still_analyse(canned, tmp_path):
    """Experiments written before each trial recorded its train_config.json: configs come from the sweep."""
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(canned["comparison"], legacy)
    for config in legacy.glob("train_runs/*/train_config.json"):
        config.unlink()
    study = load_study([str(legacy)])
    # The fixed gamma applies to sparse_attention_unet only, as the sweep applied it.
    assert study.arms() == ["unet", "attention_unet", "sparse_attention_unet (γ=0.0001)"]
    assert any("without train_config.json" in p for p in study.problems)
    result = compare_models.run(study, OutDir(str(tmp_path / "out")))
    arms = set(pd.read_csv(tmp_path / "out" / "compare_models.csv")["arm"])
    assert arms == {*study.arms(), "zero-filled input"}
    assert not result.problems


def test_every_table_and_curve_carries_the_zero_filled_baseline(canned, cli_out, tmp_path):
    zero = ZERO_FILLED["metrics"]
    study = load_study([str(canned["comparison"])])
    table = compare_models.summary_table(study).set_index("arm")
    for metric in ("ssim", "psnr", "nmse"):
        assert table.loc["zero-filled input", f"{metric}_best_mean"] == zero[metric]
    # U-Net best SSIM over seeds 0.60, 0.62, 0.64: gains over 0.55 of 0.05, 0.07, 0.09 (sd 0.02).
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)
    assert table.loc["unet", "gain_ssim_mean"] == pytest.approx(0.07)
    assert table.loc["unet", "gain_ssim_ci95_low"] == pytest.approx(0.07 - half)
    assert table.loc["unet", "gain_ssim_ci95_high"] == pytest.approx(0.07 + half)
    # Lower NMSE is better: its gain is the baseline minus the network's (best epoch NMSE 0.5 - 0.5 SSIM).
    assert table.loc["unet", "gain_nmse_mean"] == pytest.approx(0.3 - (0.5 - 0.5 * 0.62))
    # The verdicts compare at equal training: ASHA stopped a sparse trial after epoch 2, so every arm is read
    # at epoch 2. U-Net SSIM there 0.58, 0.60, 0.62: gains 0.03, 0.05, 0.07 (mean 0.05, sd 0.02); attention
    # 0.61, 0.63, 0.67; sparse 0.57, 0.55, 0.58. One-sided t-tests of gain > 0, Holm over the three arms.
    assert study.budget == 2
    gains = {"unet": [0.03, 0.05, 0.07], "attention_unet": [0.06, 0.08, 0.12],
             "sparse_attention_unet (γ=0.0001)": [0.02, 0.0, 0.03]}  # fmt: skip
    raw = [stats.ttest_1samp(g, 0.0, alternative="greater").pvalue for g in gains.values()]
    adjusted = dict(zip(gains, multipletests(raw, method="holm")[1], strict=True))
    verdicts = {v.split(" ")[0]: v for v in compare_models.verdicts(study)}
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)
    unet = verdicts["unet"]
    assert unet.startswith("unet is inconclusive against the zero-filled input") == (adjusted["unet"] >= 0.05)
    assert f"SSIM gain +0.0500 [t: {0.05 - half:+.4f}, {0.05 + half:+.4f};" in unet
    assert f"Holm-adjusted p = {adjusted['unet']:.3g}" in unet and "common budget" in unet
    assert "3 of them above" in unet and "seeds would decide" in unet

    sweep = load_study([str(canned["sweep"])])
    assert any(
        v.startswith("sparse_attention_unet (γ=0.01) does **not** beat")
        for v in compare_models.verdicts(sweep)
    )
    gamma_curves.run(sweep, OutDir(str(tmp_path)))
    curves = pd.read_csv(tmp_path / "gamma_curves.csv")
    reference = curves[curves["point"] == "zero-filled input"].iloc[0]
    assert reference["ssim_mean"] == zero["ssim"] and reference["psnr_mean"] == zero["psnr"]
    figure = sweep_overview.plot_learning_curves(sweep)
    lines = [line for line in figure.axes[0].get_lines() if line.get_gid() == "zero-filled"]
    assert len(lines) == 1 and set(lines[0].get_ydata()) == {zero["ssim"]}

    report = (cli_out[1] / "report.md").read_text()
    assert "Against the zero-filled input" in report.split("\n## ")[0]  # before the first section


def test_a_trial_whose_last_report_diverged_is_listed_as_diverged(canned, tmp_path):
    import shutil

    from analysis.collect import collect

    experiment = tmp_path / "diverged"
    shutil.copytree(canned["sweep"], experiment)
    trial_dir = sorted(experiment.glob("run_trial_*"))[0]
    lines = (trial_dir / "result.json").read_text().splitlines()
    last = json.loads(lines[-1])
    nan_report = {**last, "epoch": last["epoch"] + 1, "ssim": math.nan, "diverged": 1.0}
    (trial_dir / "result.json").write_text("\n".join([*lines, json.dumps(nan_report)]) + "\n")
    trials = collect(str(experiment)).trials.set_index("trial_dir")
    assert trials.loc[trial_dir.name, "status"] == "diverged"
    assert (
        trials.loc[trial_dir.name, "error"]
        == f"training diverged at epoch {last['epoch'] + 1} (loss NaN or Inf)"
    )
    assert (trials.drop(index=trial_dir.name)["status"] != "diverged").all()


# ----------------------------------------------------------------------------------------- retried trials

EARLIER_FAILURE = (
    "Failure # 1 (occurred at 2026-11-24_02-30-00)\n"
    "The actor died unexpectedly before finishing this task.\n"
    "\tclass_name: ImplicitFunc\n"
    "The actor is dead because its worker process has died.\n"
)


def _tune_state(experiment: Path, states: dict[str, tuple[str, int]]) -> None:
    """Tune's experiment state as Ray 2.60 writes it: per trial its state and run metadata, JSON strings."""
    trial_data = [
        [json.dumps({"trial_id": trial_id, "status": status}), json.dumps({"num_failures": failures})]
        for trial_id, (status, failures) in states.items()
    ]
    state = json.dumps({"trial_data": trial_data})
    (experiment / "experiment_state-2026-11-24_02-36-53.json").write_text(state)


@pytest.fixture
def retried(canned, tmp_path) -> tuple[Path, Path]:
    """The canned sweep with a stale error.txt (an attempt that failed before all its reports) in its
    first, completed trial."""
    import shutil

    experiment = tmp_path / "retried"
    shutil.copytree(canned["sweep"], experiment)
    trial_dir = sorted(experiment.glob("run_trial_*"))[0]
    (trial_dir / "error.txt").write_text(EARLIER_FAILURE)
    return experiment, trial_dir


@pytest.mark.parametrize("tune_state", [None, ("TERMINATED", 1)], ids=["no-tune-state", "tune-state"])
def test_a_stale_error_file_does_not_make_a_completed_trial_errored(retried, tune_state):
    from analysis.collect import collect, status_counts

    experiment, trial_dir = retried
    trial_id = json.loads((trial_dir / "result.json").read_text().splitlines()[0])["trial_id"]
    if tune_state:
        _tune_state(experiment, {trial_id: tune_state})
    collected = collect(str(experiment))
    trial = collected.trials.set_index("trial_id").loc[trial_id]
    assert (trial["status"], trial["attempts"], trial["error"]) == ("completed", 2, "")
    assert trial["earlier_error"] == "The actor is dead because its worker process has died."
    assert "recovered after a retry" in status_counts(collected.trials)
    assert not any(f"{trial_id} errored" in problem for problem in collected.problems)
    study = load_study([str(experiment)])
    assert study.trials.set_index("trial_id").loc[trial_id, "included"]  # it counts in seed statistics


def test_a_trial_whose_last_attempt_failed_stays_errored(retried):
    from analysis.collect import collect

    experiment, trial_dir = retried
    reports = (trial_dir / "result.json").read_text().splitlines()
    trial_id = json.loads(reports[0])["trial_id"]
    # The retry reported once more, then failed for good (Tune's own record says ERROR).
    second = "Failure # 2 (occurred at 2026-11-24_02-50-00)\nRuntimeError: worker died again\n"
    (trial_dir / "error.txt").write_text(EARLIER_FAILURE + second)
    lines = [json.loads(line) for line in reports]
    (trial_dir / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines[:1]))
    for state in (None, ("ERROR", 2)):  # the dates say it without Tune's state, which says it too
        if state:
            _tune_state(experiment, {trial_id: state})
        trial = collect(str(experiment)).trials.set_index("trial_id").loc[trial_id]
        assert (trial["status"], trial["attempts"]) == ("errored", 2)
        assert trial["error"] == "RuntimeError: worker died again"
        assert trial["earlier_error"] == "The actor is dead because its worker process has died."


def test_an_epoch_reported_by_two_attempts_counts_once_with_the_last_report(retried):
    from analysis.collect import collect

    experiment, trial_dir = retried
    lines = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    repeated = {**lines[-1], "ssim": lines[-1]["ssim"] + 0.01, "iterations_since_restore": 1}
    (trial_dir / "result.json").write_text("".join(json.dumps(x) + "\n" for x in [*lines, repeated]))
    collected = collect(str(experiment))
    epochs = collected.epochs[collected.epochs["trial_id"] == lines[0]["trial_id"]]
    assert list(epochs["epoch"]) == [line["epoch"] for line in lines]
    assert epochs["ssim"].iloc[-1] == pytest.approx(repeated["ssim"])


def test_epochs_only_the_checkpoint_recorded_count(retried):
    # A driver killed before it copied its staged result.json: the final epoch is only in the checkpoint,
    # and a resumed trial starting from that checkpoint reports nothing more.
    from analysis.collect import collect

    experiment, trial_dir = retried
    lines = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    trial_id = lines[0]["trial_id"]
    (trial_dir / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines[:-1]))
    (trial_dir / "error.txt").unlink()
    _tune_state(experiment, {trial_id: ("TERMINATED", 0)})
    collected = collect(str(experiment))
    trial = collected.trials.set_index("trial_id").loc[trial_id]
    assert trial["status"] == "completed" and trial["epochs_run"] == lines[-1]["epoch"]
    epochs = collected.epochs[collected.epochs["trial_id"] == trial_id]
    assert list(epochs["epoch"]) == [line["epoch"] for line in lines]
    assert epochs["ssim"].iloc[-1] == pytest.approx(lines[-1]["ssim"])
    assert f"trial {trial_id}: epoch(s) {lines[-1]['epoch']} taken from its checkpoint" in "".join(
        collected.problems
    )
    # A trial the scheduler stopped: its worker checkpointed one more epoch than Tune received, which is
    # not part of the trial.
    asha_file = experiment / ASHA_STATE_FILE
    asha = json.loads(asha_file.read_text())
    asha_file.write_text(json.dumps({**asha, "stopped_trials": [*asha["stopped_trials"], trial_id]}))
    stopped = collect(str(experiment))
    trial = stopped.trials.set_index("trial_id").loc[trial_id]
    assert (trial["status"], trial["epochs_run"]) == ("stopped", lines[-2]["epoch"])
    assert not any("taken from its checkpoint" in problem for problem in stopped.problems)
    asha_file.write_text(json.dumps(asha))
    # Without the checkpoint the trial did not reach its last epoch.
    for checkpoint in (experiment / "train_runs" / trial_id).glob("checkpoint_*"):
        shutil.rmtree(checkpoint)
    assert collect(str(experiment)).trials.set_index("trial_id").loc[trial_id, "status"] == "unfinished"


def test_tune_failures_are_parsed_oldest_first():
    from analysis.outcome import parse_failures

    later = "Failure # 2 (occurred at 2026-11-24_02-50-00)\nValueError: x\n"
    failures = parse_failures(EARLIER_FAILURE + later)
    assert [f.occurred for f in failures] == ["2026-11-24_02-30-00", "2026-11-24_02-50-00"]
    assert [f.summary() for f in failures] == ["The actor is dead because its worker process has died.",
                                               "ValueError: x"]  # fmt: skip
    assert parse_failures("") == [] and parse_failures("no header\n")[0].summary() == "no header"
