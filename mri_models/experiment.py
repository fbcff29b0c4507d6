"""The experiment directory: its file and folder names, on any storage.

Both sides use this module to find their files: ``ray_jobs`` writes runs and sweeps, and ``analysis``
reads them, possibly on a laptop after the cluster is gone. Paths are local paths or URIs
(``s3://bucket/prefix``, ``gs://...``), joined, listed, read and written through :mod:`mri_models.storage`.

A training run (``python -m ray_jobs.train --name NAME``, or one sweep trial) under its storage path::

    <run>/train_config.json          the resolved TrainConfig the run was started with
    <run>/baseline.json              the zero-filled input's validation metrics (single runs)
    <run>/metrics.csv                per-epoch metrics (single runs, written at the end)
    <run>/checkpoint_<date>/         Ray Train checkpoints: checkpoint.pt (weights only) + history.json
    <run>/volumes/                   per-volume rows: val-epoch-<NNNN>.parquet, test.parquet
    <run>/test_evaluation.json       the final evaluation on the test split (selected epoch, means)
    <run>/data_roles.json            which files were train, val and test (single runs)
    <run>/set_aside/                 Ray Train's checkpoint record of the run, where found cut short

A sweep (a Ray Tune experiment)::

    <experiment>/sweep.json                       the sweep spec, search keys, epoch budget, data root
    <experiment>/asha_state.txt                   ASHA's rung records, stops, decisions (ray_jobs.asha)
    <experiment>/baseline.json                    the zero-filled input's validation metrics
    <experiment>/data_roles.json                  which files were train, val and test
    <experiment>/experiment_state-<date>.json     Tune's trial states (status, failures), one per driver start
    <experiment>/tune_state_kept.zip              the last complete set of Tune's state files (tune_state.py)
    <experiment>/<Tune trial dir>/                params.json, result.json, error.txt (Tune's own)
    <experiment>/train_runs/<trial id>/           the trial's training run, laid out as above
    <experiment>/results/                         trials, epochs, volumes, decisions (CSV + Parquet)
    <experiment>/analysis/                        report.md, tables and figures
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from mri_models.storage import exists, join, list_files, read_json, subdirectories

SWEEP_FILE = "sweep.json"
# A confirm stage's trials are a grid over configurations: each trial's Tune params hold its configuration
# under this key (the analysis reads its values as the trial's own).
CANDIDATE_KEY = "candidate"
# Not ".json": Tune copies every *.json/*.pkl of the experiment root into its driver staging directory on
# restore and syncs them back later, which would overwrite the records written since with the old copy.
ASHA_STATE_FILE = "asha_state.txt"
# Every decision ASHA made, in the state file under this key, in the order made: one object per trial and
# rung its results reached, plus one where it reached the epoch budget, with DECISION_KEYS. ``rung`` is the
# milestone (epochs), ``epoch`` that of the result decided on, ``value`` its metric (the state's ``metric``,
# ``mode``), ``cutoff`` what ASHA compared it with (None: the rung had no record to cut by).
ASHA_DECISIONS_KEY = "decisions"
DECISION_KEYS = ("trial_id", "rung", "epoch", "value", "cutoff", "decision")
DECISION_CONTINUE = "continue"
DECISION_STOP = "stop"
DECISION_COMPLETE = "complete"  # the epoch budget: Tune ends the trial, whatever the rungs
DECISIONS_TABLE = "decisions"  # results/decisions.csv (analysis.collect)
TRAIN_RUNS_DIR = "train_runs"
RESULTS_DIR = "results"
ANALYSIS_DIR = "analysis"
INITIAL_REPORT_FILE = "epoch_0.json"
# In every epoch report, when the run's validation SSIM first reached its ``target_ssim``: the epoch, the
# training slices seen until then and the seconds its epochs took until then (training and validation,
# epoch 0's validation included; waits between epochs, for ASHA or a restart, are not). NaN until then, or
# without a target; ``trials.csv`` has the trial's.
TARGET_KEYS = ("target_epoch", "target_slices", "target_seconds")
# One file per preemption a run met: where it checkpointed within the epoch, when, and where it resumed.
PREEMPTIONS_DIR = "preemptions"
RUN_CONFIG_FILE = "train_config.json"
BASELINE_FILE = "baseline.json"
METRICS_CSV = "metrics.csv"
CHECKPOINT_PREFIX = "checkpoint_"
CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"
# Each file of a checkpoint and its size, written with it (ray_jobs.checkpoints): a checkpoint is complete
# when every file it lists is there at its size. Ray uploads a checkpoint's files one by one, in no set
# order, so a node or driver lost mid-upload leaves a directory with some of them (or, on a local or NFS
# disk, a file cut short); such a directory is not a checkpoint (is_complete_checkpoint).
CHECKPOINT_MANIFEST = "manifest.json"
# In the manifest of a checkpoint saved within an epoch (a preempted node's): the steps of that epoch done.
# It is the trainer's, to go on from; its weights are no epoch's, so the analysis leaves it out.
IN_EPOCH_STEPS_KEY = "in_epoch_steps"
# Per-volume results of a run: val-epoch-<NNNN>.parquet per validation epoch, test.parquet of the final
# evaluation, whose summary (selected epoch, rule, means per setting) is TEST_EVALUATION_FILE.
VOLUMES_DIR = "volumes"
TEST_VOLUMES_FILE = "test.parquet"
TEST_EVALUATION_FILE = "test_evaluation.json"
# Which files played which role (train, val, test) in a run or sweep.
DATA_ROLES_FILE = "data_roles.json"
# TensorBoard event files of validation images, a run of its own beside Tune's scalars (ray_jobs.images).
IMAGES_DIR = "images"
# A paper study (sweeps/paper_study.py): two experiments, the model costs, the report.
STUDY_FILE = "study.json"
MODEL_COSTS_FILE = "model_costs.json"
REPORT_DIR = "report"
MODEL_COMPARISON = "model_comparison"
GAMMA_SWEEP = "gamma_sweep"
# Written by Ray Tune into each trial directory.
TRIAL_PARAMS_FILE = "params.json"
TRIAL_RESULT_FILE = "result.json"
TRIAL_ERROR_FILE = "error.txt"  # appended to on every failed attempt, also when a later one succeeds
# Tune's experiment state, one file per driver start (``experiment_state-<date>.json``), newest last.
TUNE_STATE_PREFIX = "experiment_state-"

_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})_")


def read_asha_decisions(state_file: str) -> list[dict]:
    """The decisions recorded in an ASHA state file (:data:`ASHA_DECISIONS_KEY`); none when it is missing."""
    return list((read_json(state_file) or {}).get(ASHA_DECISIONS_KEY, []))


@dataclass(frozen=True)
class RunLayout:
    """The files of one training run."""

    path: str

    @property
    def config_file(self) -> str:
        return join(self.path, RUN_CONFIG_FILE)

    @property
    def metrics_csv(self) -> str:
        return join(self.path, METRICS_CSV)

    @property
    def baseline_file(self) -> str:
        return join(self.path, BASELINE_FILE)

    @property
    def images_dir(self) -> str:
        return join(self.path, IMAGES_DIR)

    @property
    def volumes_dir(self) -> str:
        return join(self.path, VOLUMES_DIR)

    def val_volumes_file(self, epoch: int) -> str:
        return join(self.volumes_dir, f"val-epoch-{epoch:04d}.parquet")

    @property
    def initial_report_file(self) -> str:
        """The epoch-0 report (the untrained network), once it was reported: a run restarted before its
        first checkpoint reads it instead of reporting epoch 0 again."""
        return join(self.path, INITIAL_REPORT_FILE)

    def preemption_file(self, epoch: int, step: int) -> str:
        """The record of the preemption checkpointed at ``step`` of ``epoch`` (0-based, epochs done)."""
        return join(self.path, PREEMPTIONS_DIR, f"epoch-{epoch:04d}-step-{step:06d}.json")

    def preemptions(self) -> list[dict]:
        """Every preemption record of the run, oldest first."""
        entries = list_files(join(self.path, PREEMPTIONS_DIR), ".json")  # sorted by name: by epoch and step
        return [record for entry in entries if (record := read_json(entry.uri)) is not None]

    @property
    def test_volumes_file(self) -> str:
        return join(self.volumes_dir, TEST_VOLUMES_FILE)

    @property
    def test_evaluation_file(self) -> str:
        return join(self.path, TEST_EVALUATION_FILE)

    @property
    def data_roles_file(self) -> str:
        return join(self.path, DATA_ROLES_FILE)

    def checkpoints(self) -> list[str]:
        """The run's complete checkpoints of whole epochs (the trainer keeps the best by SSIM and the
        latest); one whose upload was cut off, or saved within an epoch, is left out
        (:func:`epoch_checkpoint`)."""
        return [
            entry.uri
            for entry in subdirectories(self.path)
            if entry.name.startswith(CHECKPOINT_PREFIX) and epoch_checkpoint(entry.uri)
        ]


def _manifest(path: str) -> tuple[dict[str, int], dict | None]:
    sizes = {entry.name: entry.size for entry in list_files(path)}
    return sizes, read_json(join(path, CHECKPOINT_MANIFEST)) if CHECKPOINT_MANIFEST in sizes else None


def is_complete_checkpoint(path: str) -> bool:
    """Whether the checkpoint directory at ``path`` holds every file its manifest lists, each at its size.

    A checkpoint written before manifests were (an older experiment) is complete when it holds the
    weights and the history.
    """
    return _complete(*_manifest(path))


def _complete(sizes: dict[str, int], manifest: dict | None) -> bool:
    if manifest is None:
        return CHECKPOINT_FILE in sizes and HISTORY_FILE in sizes
    return all(sizes.get(name) == size for name, size in manifest["files"].items())


def epoch_checkpoint(path: str) -> bool:
    """Whether ``path`` is a complete checkpoint of a whole epoch (not one saved within an epoch)."""
    sizes, manifest = _manifest(path)
    return _complete(sizes, manifest) and IN_EPOCH_STEPS_KEY not in (manifest or {})


@dataclass(frozen=True)
class TrialDir:
    """One Tune trial directory of a sweep."""

    name: str
    path: str

    @property
    def params_file(self) -> str:
        return join(self.path, TRIAL_PARAMS_FILE)

    @property
    def result_file(self) -> str:
        return join(self.path, TRIAL_RESULT_FILE)

    @property
    def error_file(self) -> str:
        return join(self.path, TRIAL_ERROR_FILE)

    @property
    def images_dir(self) -> str:
        """Validation images written by the trial's rank-0 worker (TensorBoard shows ``<trial>/images``)."""
        return join(self.path, IMAGES_DIR)

    def trial_id_from_name(self) -> str:
        """The id in Tune's directory name ``<trainable>_<id>_<index>_<params>_<date>``.

        Needed for trials that reported nothing yet; Tune's ids are ``<5 hex>_<5 digits>``.
        """
        match = _TRIAL_ID.search(self.name)
        return match.group(1) if match else self.name


@dataclass(frozen=True)
class ExperimentLayout:
    """The files of one sweep (Ray Tune experiment) directory."""

    path: str

    @classmethod
    def under(cls, storage: str, name: str) -> ExperimentLayout:
        return cls(join(storage, name))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/")) or self.path

    @property
    def sweep_file(self) -> str:
        return join(self.path, SWEEP_FILE)

    @property
    def asha_state_file(self) -> str:
        return join(self.path, ASHA_STATE_FILE)

    @property
    def baseline_file(self) -> str:
        return join(self.path, BASELINE_FILE)

    @property
    def data_roles_file(self) -> str:
        return join(self.path, DATA_ROLES_FILE)

    @property
    def train_runs(self) -> str:
        """Where each trial's training run lives (named after the trial id)."""
        return join(self.path, TRAIN_RUNS_DIR)

    def train_run(self, trial_id: str) -> RunLayout:
        return RunLayout(join(self.train_runs, trial_id))

    @property
    def results_dir(self) -> str:
        return join(self.path, RESULTS_DIR)

    @property
    def analysis_dir(self) -> str:
        return join(self.path, ANALYSIS_DIR)

    def trial_dir(self, name: str) -> TrialDir:
        return TrialDir(name, join(self.path, name))

    def tune_state_file(self) -> str | None:
        """Tune's newest experiment state file (its names sort by the driver's start date), if any."""
        states = [entry.uri for entry in list_files(self.path) if entry.name.startswith(TUNE_STATE_PREFIX)]
        return states[-1] if states else None

    def stopped_trials(self) -> set[str]:
        """The trials the scheduler stopped early (:mod:`ray_jobs.asha` records them), by trial id.

        Their epochs end at their last report. Their workers wait for ASHA's decision at every rung
        (:class:`ray_jobs.worker.RungWait`), but one whose wait timed out, or a trial of a sweep from before
        they waited, may have trained and checkpointed more epochs, which Tune never received and which are
        not the trial's to choose from.
        """
        return set((read_json(self.asha_state_file) or {}).get("stopped_trials", []))

    def asha_decisions(self) -> list[dict]:
        """Every decision ASHA made (:data:`ASHA_DECISIONS_KEY`), in order; none for FIFO or older sweeps."""
        return read_asha_decisions(self.asha_state_file)

    def trial_dirs(self) -> list[TrialDir]:
        """Tune's trial directories (those holding ``params.json``), sorted by name."""
        return [
            TrialDir(entry.name, entry.uri)
            for entry in subdirectories(self.path)
            if entry.name not in (TRAIN_RUNS_DIR, RESULTS_DIR, ANALYSIS_DIR)
            and exists(join(entry.uri, TRIAL_PARAMS_FILE))
        ]


@dataclass(frozen=True)
class StudyLayout:
    """The files of one paper study: its two experiments side by side, the model costs, the report."""

    path: str

    @classmethod
    def under(cls, storage: str, name: str) -> StudyLayout:
        return cls(join(storage, name))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/")) or self.path

    @property
    def study_file(self) -> str:
        return join(self.path, STUDY_FILE)

    @property
    def model_comparison(self) -> ExperimentLayout:
        """The three architectures x seeds at full budget (the paper's Table 1 and Figure 6)."""
        return ExperimentLayout(join(self.path, MODEL_COMPARISON))

    @property
    def gamma_sweep(self) -> ExperimentLayout:
        """The Sparse Attention U-Net over gamma x seeds (the paper's Figure 8)."""
        return ExperimentLayout(join(self.path, GAMMA_SWEEP))

    @property
    def model_costs_file(self) -> str:
        return join(self.path, MODEL_COSTS_FILE)

    @property
    def report_dir(self) -> str:
        return join(self.path, REPORT_DIR)
