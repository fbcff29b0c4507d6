"""Search spaces beyond grids: distributions, seeded searchers that survive a killed driver, and the
confirm stage that re-runs the best configurations with every seed."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pandas as pd
import pytest
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from ray_jobs.config import ConfigError
from ray_jobs.search_space import Distribution, probe_points, tune_space
from ray_jobs.sweep_config import load_sweep
from ray_jobs.tune import make_searcher
from sweeps.sweep_command import sweep_main
from tests.conftest import DriverProcess, kill_once_a_trial_finished

REPO = Path(__file__).resolve().parents[1]
REGULARISATION = REPO / "sweeps" / "configs" / "regularisation_sweep.yaml"
BOUNDS = {
    "loguniform": (1e-7, 1e-3),
    "uniform": (0.0, 0.3),
    "quniform": (0.0, 0.3, 0.05),
    "randint": (2, 5),
}


@pytest.mark.parametrize("kind", sorted(BOUNDS))
def test_distributions_sample_within_their_bounds(kind):
    args = BOUNDS[kind]
    dist = Distribution(**{kind: args})
    low, high = args[:2]
    rng = random.Random(0)
    ours = [dist.sample(rng) for _ in range(200)]
    tunes = [dist.to_tune().sample(random_state=seed) for seed in range(200)]  # what a Tune searcher draws
    # Tune quantises as round(value / q) * q, an ulp beyond a bound at times (6 * 0.05 = 0.30000000000000004).
    ulp = math.ulp(high) if kind == "quniform" else 0.0
    for value in ours + tunes:
        assert low <= value <= high + ulp, value
        if kind == "randint":
            assert isinstance(value, int) and value < high  # Tune's convention: high excluded
        if kind == "quniform":
            assert math.isclose(value / args[2], round(value / args[2]), abs_tol=1e-9), value
        if kind == "loguniform":
            assert value > 0
    assert len(set(ours)) > 1 and dist.edges()[0] == low


def test_a_search_is_validated_on_its_bounds_options_and_seeded_samples():
    search = {"model": ["unet", "attention_unet"], "weight_decay": Distribution(loguniform=(1e-7, 1e-3))}
    points = probe_points(search, seed=3)
    assert points == probe_points(search, seed=3)  # seeded
    assert {p["model"] for p in points} == {"unet", "attention_unet"}
    assert {1e-7, 1e-3} <= {p["weight_decay"] for p in points}
    # Each edge alone, the other keys at their first edge: an error then names the key at fault.
    assert {"model": "attention_unet", "weight_decay": 1e-7} in points
    assert set(tune_space(search)) == set(search)


def test_random_search_starts_no_more_trials_at_once_than_fit():
    """Tune applies ``max_concurrent_trials`` to a Searcher (optuna: a ConcurrencyLimiter) but ignores it,
    with a warning, for a BasicVariantGenerator it is given: random search started every trial at once, and
    on 2 CPUs their workers held every CPU while their data tasks waited (benchmarks/sweep_efficiency.py)."""
    spec = load_sweep(REGULARISATION, "smoke", {"search_alg": "random", "num_samples": 6}).spec
    searcher = make_searcher(spec, max_concurrent=2)
    assert isinstance(searcher, BasicVariantGenerator) and searcher.max_concurrent == 2  # what Tune reads


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"search.weight_decay": {"loguniform": [0.0, 1e-3]}},
            "search.weight_decay: loguniform: low must be > 0",
        ),
        (
            {"search.drop_prob": {"uniform": [0.3, 0.1]}},
            "search.drop_prob: uniform: low 0.3 must be below high",
        ),
        ({"search.drop_prob": {"normal": [0, 1]}}, "search.drop_prob: unknown distribution normal"),
        ({"search.drop_prob": {"uniform": [0.0, 1.5]}}, "drop_prob: Input should be less than 1 (got 1.5)"),
        (
            {"search.num_pool_layers": {"uniform": [2, 4]}},
            "search.num_pool_layers: num_pool_layers is an integer",
        ),
        ({"search_alg": "grid"}, "search.weight_decay: a distribution needs search_alg random or optuna"),
        ({"seeds": [0, 1]}, "seeds: search_alg optuna runs each suggestion with one seed"),
        ({"num_samples": None}, "search_alg optuna needs num_samples"),
        ({"confirm.per": ["lr"]}, "confirm.per: ['lr'] are not search keys"),
    ],
)
def test_bad_search_spaces_are_named(overrides, message):
    with pytest.raises(ConfigError) as raised:
        load_sweep(REGULARISATION, "smoke", overrides)
    assert message in str(raised.value) and str(REGULARISATION) in str(raised.value)


def test_a_bad_distribution_fails_before_any_trial(tmp_path, capsys):
    code = sweep_main(
        REGULARISATION,
        [
            "--profile",
            "smoke",
            "--storage",
            str(tmp_path),
            "--set",
            "search.weight_decay={loguniform: [1, 0]}",
        ],
    )
    assert code == 2
    out = capsys.readouterr().out
    assert "search.weight_decay: loguniform: low 1.0 must be below high 0.0" in out and "Traceback" not in out
    assert not any(tmp_path.iterdir()), "a bad search space must not create the experiment"


def _best_per_model(trials: pd.DataFrame, keys: list[str]) -> set[tuple]:
    ranked = trials.sort_values("best_ssim", ascending=False)
    return {tuple(row[k] for k in keys) for _, row in ranked.groupby("model").head(1).iterrows()}


@pytest.mark.slow
def test_optuna_search_killed_and_resumed_keeps_its_history_then_confirms(ray_head, tmp_path):
    def start(log: str, *extra: str) -> DriverProcess:
        command = [sys.executable, str(REPO / "sweeps" / "regularisation_sweep.py"), "--profile", "smoke",
                   "--storage", str(tmp_path), "--name", "reg", *extra]  # fmt: skip
        return DriverProcess(command, ray_head.env, tmp_path / f"{log}.log")

    search, confirm = tmp_path / "reg", tmp_path / "reg-confirm"
    finished_before = kill_once_a_trial_finished(start("first"), search)
    again = start("again")
    assert again.output(timeout=60) and again.returncode == 2 and "pass --resume" in again.log.read_text()
    resumed = start("resumed", "--resume")
    out = resumed.output(timeout=900)
    assert resumed.returncode == 0, out[-4000:]

    spec = load_sweep(REGULARISATION, "smoke").spec
    keys = ["model", "weight_decay", "drop_prob"]
    trials = pd.read_csv(search / "results" / "trials.csv")
    assert len(trials) == spec.num_samples and set(trials["status"]) <= {"completed", "stopped"}
    assert not trials.duplicated(keys).any(), "a resumed search repeated a configuration"
    for name, text in finished_before.items():
        assert (search / name / "result.json").read_text() == text, f"{name} was run again"
    # Optuna's own history, as Tune saved it: every suggestion, before and after the kill, with its params.
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(search))
    history = {
        (t.params["model"], t.params["weight_decay"], t.params["drop_prob"])
        for t in searcher._ot_study.trials
    }
    assert history == {tuple(row) for row in trials[keys].itertuples(index=False)}

    # The confirm stage: the best search configuration of each model, every confirm seed, full budget.
    confirmed = pd.read_csv(confirm / "results" / "trials.csv")
    assert len(confirmed) == 2 * len(spec.confirm.seeds) and set(confirmed["status"]) == {"completed"}
    assert set(confirmed["epochs_run"]) == {spec.max_epochs}
    assert sorted(confirmed["seed"]) == sorted(spec.confirm.seeds * 2)
    assert {tuple(row) for row in confirmed[keys].itertuples(index=False)} == _best_per_model(trials, keys)
    assert "confirm (" in out
    # Every trial of both stages has its final evaluation on the test split, made once: resuming a finished
    # sweep trains and evaluates nothing again.
    evaluations = sorted(
        [
            *search.glob("train_runs/*/test_evaluation.json"),
            *confirm.glob("train_runs/*/test_evaluation.json"),
        ]
    )
    assert len(evaluations) == len(trials) + len(confirmed) and confirmed["test_ssim_4x"].notna().all()
    written = {path: path.stat().st_mtime_ns for path in evaluations}
    finished = start("finished", "--resume")
    assert finished.output(timeout=600) is not None and finished.returncode == 0
    assert {path: path.stat().st_mtime_ns for path in evaluations} == written
