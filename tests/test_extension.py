"""Extending the platform without editing it: a new architecture, penalty term and metric, end to end.

Everything new is defined in this file. :func:`register_toys` registers it, and configurations list it as a
plugin (``tests.test_extension:register_toys``), so the Tune trial and every Ray Train worker process
register the same entries before they validate the configuration. The fixture removes them afterwards, so
the other tests see the registries as shipped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from analysis import compare_models
from analysis.collect import write_tables
from analysis.output import OutDir
from analysis.study import load_study
from mri_models.arms import arm_of
from mri_models.losses import PenaltyTerm, register_penalty, unregister_penalty
from mri_models.metrics import (
    Metric,
    VolumeMetricAccumulator,
    register_metric,
    slice_metrics,
    unregister_metric,
)
from mri_models.models import AttentionOutput, build_model, model_names, register_model, unregister
from ray_jobs.cli import parse_overrides
from ray_jobs.config import ConfigError, make_train_config
from ray_jobs.sweep_config import SweepSpec, ValidatedSweep
from ray_jobs.worker import metric_keys

PLUGIN = "tests.test_extension:register_toys"


class ToyGatedOutput(NamedTuple):
    output: Tensor
    attention_maps: tuple[Tensor, ...]
    skip_norms_before: tuple[Tensor, ...]
    skip_norms_after: tuple[Tensor, ...]


class ToyGatedNet(nn.Module):
    """A residual one-level network whose features pass a sigmoid gate; no U-Net base class."""

    def __init__(
        self,
        in_chans: int = 1,
        out_chans: int = 1,
        chans: int = 32,
        num_pool_layers: int = 4,
        drop_prob: float = 0.0,
        gate_kernel: Literal[1, 3] = 1,
    ) -> None:
        super().__init__()
        del num_pool_layers  # one level: accepted for the uniform signature
        self.encode = nn.Conv2d(in_chans, chans, kernel_size=3, padding=1)
        # Its own hyper-parameter: a configuration key as soon as the plugin registers the network.
        self.gate = nn.Conv2d(chans, 1, kernel_size=gate_kernel, padding=gate_kernel // 2)
        self.dropout = nn.Dropout2d(drop_prob)
        self.decode = nn.Conv2d(chans, out_chans, kernel_size=3, padding=1)

    def forward(self, image: Tensor, return_attention: bool = False) -> Tensor | ToyGatedOutput:
        features = torch.relu(self.encode(image))
        alpha = torch.sigmoid(self.gate(features))
        gated = self.dropout(alpha * features)
        output = image + self.decode(gated)
        if not return_attention:
            return output
        before = torch.linalg.vector_norm(features.detach().flatten(1), dim=1)
        after = torch.linalg.vector_norm(gated.detach().flatten(1), dim=1)
        return ToyGatedOutput(output, (alpha,), (before,), (after,))


def attention_entropy(result: AttentionOutput) -> Tensor:
    """Mean binary entropy of the attention coefficients: low when the gates decide."""
    terms = []
    for alpha in result.attention_maps:
        p = alpha.clamp(1e-6, 1 - 1e-6)
        terms.append((-(p * p.log() + (1 - p) * (1 - p).log())).mean())
    return torch.stack(terms).mean()


def _abs_error(target: np.ndarray, output: np.ndarray, max_value: float) -> dict[str, float]:
    del max_value
    return {"abs_error": float(np.mean(np.abs(target.astype(np.float64) - output.astype(np.float64))))}


def _mean_abs_error(stats: dict[str, np.ndarray], max_value: float) -> float:
    del max_value
    return float(np.mean(stats["abs_error"]))


def register_toys() -> None:
    register_model("toy_gated_net", label="Toy gated net", provides=AttentionOutput)(ToyGatedNet)
    register_penalty(
        PenaltyTerm("attention_entropy", "entropy_weight", attention_entropy, "entropy of α", symbol="λ")
    )
    register_metric(Metric("mae", _abs_error, _mean_abs_error, "MAE", ".4g", higher_is_better=False))


@pytest.fixture
def toys():
    register_toys()
    yield
    unregister("toy_gated_net")
    unregister_penalty("attention_entropy")
    unregister_metric("mae")


def test_registered_entries_reach_every_derived_place(toys):
    assert "toy_gated_net" in model_names()
    out = build_model("toy_gated_net", chans=4)(torch.randn(2, 1, 16, 16), return_attention=True)
    assert len(out.attention_maps) == 1
    cfg = make_train_config({"model": "toy_gated_net", "entropy_weight": 1e-3, "plugins": [PLUGIN]})
    assert cfg.active_penalties == {"attention_entropy": 1e-3}
    assert cfg.model_dump()["entropy_weight"] == 1e-3  # a top-level key, as users write it
    assert cfg.uses_attention and cfg.arm.name == "toy_gated_net (entropy_weight=0.001)"
    keys = metric_keys(2)
    assert "mae" in keys and "attention_entropy" in keys
    stats = slice_metrics(np.ones((8, 8)), np.full((8, 8), 2.0), 2.0)
    accumulator = VolumeMetricAccumulator()
    accumulator.add("v.h5", 0, stats, 1.0)
    assert accumulator.compute()["mae"] == pytest.approx(1.0)
    # The unpenalised arm of the new network is the network itself.
    assert arm_of("toy_gated_net", {"entropy_weight": 0.0, "gamma": 0.0}).name == "toy_gated_net"


def test_an_architectures_own_hyper_parameter_is_a_configuration_key(toys):
    # Declared by the constructor's signature only: --set, the model's hyper-parameters, the arm, the dump.
    values = {"model": "toy_gated_net", "plugins": [PLUGIN], **parse_overrides(["gate_kernel=3"])}
    cfg = make_train_config(values)
    assert cfg.model_options == {"gate_kernel": 3} and cfg.model_hparams()["gate_kernel"] == 3
    assert build_model(cfg.model, **cfg.model_hparams()).gate.kernel_size == (3, 3)
    assert cfg.arm.name == "toy_gated_net (gate_kernel=3)" and cfg.model_dump()["gate_kernel"] == 3
    assert make_train_config(cfg.model_dump()) == cfg  # the recorded configuration reads back
    # The defaults fill in, so a recorded configuration names every option; a default is not shown.
    plain = make_train_config({"model": "toy_gated_net", "plugins": [PLUGIN]})
    assert plain.model_options == {"gate_kernel": 1} and plain.arm.name == "toy_gated_net"
    # Validated against the annotation and the model, naming the key, the value and what was expected.
    with pytest.raises(ConfigError, match=re.escape("gate_kernel: Input should be 1 or 3 (got 5)")):
        make_train_config({**values, "gate_kernel": 5})
    with pytest.raises(
        ConfigError, match=re.escape("gate_kernel: a hyper-parameter of toy_gated_net, not of model 'unet'")
    ):
        make_train_config({"model": "unet", "plugins": [PLUGIN], "gate_kernel": 3})
    # A fixed option applies to the models that declare it; a searched one must apply to every model.
    fixed = {"plugins": [PLUGIN], "gate_kernel": 3, "psi_norm": "none"}
    models = {"model": ["unet", "attention_unet", "toy_gated_net"]}
    spec = SweepSpec(experiment="x", profile="smoke", train=fixed, search=models, seeds=[0])
    arms = [cfg.arm.name for cfg in spec.trial_configs()]
    assert arms == ["unet", "attention_unet (psi_norm=none)", "toy_gated_net (gate_kernel=3)"]
    searched = SweepSpec(experiment="x", profile="smoke", train={"plugins": [PLUGIN]}, seeds=[0],
                         search={"model": ["unet", "toy_gated_net"], "gate_kernel": [1, 3]})  # fmt: skip
    with pytest.raises(ConfigError, match="gate_kernel: a hyper-parameter of toy_gated_net"):
        searched.trial_configs()


def test_new_entries_are_validated_like_the_built_in_ones(toys):
    with pytest.raises(
        ConfigError, match=re.escape("entropy_weight=0.1 weights entropy of α, which needs AttentionOutput")
    ):
        make_train_config({"model": "unet", "entropy_weight": 0.1})
    with pytest.raises(ConfigError, match="entropy_weight: Input should be greater than or equal to 0"):
        make_train_config({"model": "toy_gated_net", "entropy_weight": -1})
    # The paper's penalty stays reserved to its own arm, whatever the architecture.
    with pytest.raises(ConfigError, match=re.escape("gamma=0.1 only applies to sparse_attention_unet")):
        make_train_config({"model": "toy_gated_net", "gamma": 0.1})
    with pytest.raises(ConfigError, match=re.escape("cannot load plugin 'tests.nowhere'")):
        make_train_config({"model": "unet", "plugins": ["tests.nowhere"]})


def test_unregistered_names_are_refused_once_the_fixture_is_gone():
    with pytest.raises(ConfigError, match="model: Input should be 'unet', 'attention_unet' or 'sparse"):
        make_train_config({"model": "toy_gated_net"})
    with pytest.raises(ConfigError, match="entropy_weight: Extra inputs are not permitted"):
        make_train_config({"model": "unet", "entropy_weight": 0.1})


@pytest.mark.slow
def test_a_sweep_trains_and_tabulates_the_new_entries(toys, ray_local, tiny_root, tmp_path):
    from ray_jobs.tune import run_sweep

    spec = SweepSpec(
        experiment="extension",
        profile="smoke",
        train={
            "plugins": [PLUGIN],
            "entropy_weight": 1e-2,
            "epochs": 2,
            "gate_kernel": 3,
            "psi_norm": "none",
        },
        search={"model": ["attention_unet", "toy_gated_net"]},
        seeds=[0],
        scheduler={"type": "fifo"},
    )
    sweep = ValidatedSweep.of(spec)  # validated as the sweep command line validates
    path = run_sweep(sweep, "extension", str(tmp_path), Path(tiny_root), resume=False).search

    experiment = write_tables(path)
    trials = experiment.trials
    assert set(trials["status"]) == {"completed"}, experiment.problems
    assert trials["best_mae"].gt(0).all() and trials["last_attention_entropy"].gt(0).all()
    epochs = pd.read_csv(Path(path) / "results" / "epochs.csv")
    assert {"mae", "attention_entropy", "ssim"} <= set(epochs.columns) and len(epochs) == 2 * 3  # epochs 0-2
    # The toy network is trained with its penalty: the training loss exceeds the reconstruction loss.
    trained = epochs[epochs["epoch"] >= 1]
    assert (trained["train_loss"] > trained["train_reconstruction_loss"]).all()
    assert not epochs["mpand"].isna().any()  # its skip norms feed MPAND like the attention U-Net's
    assert epochs["alpha_mean"].between(0, 1).all()  # and its coefficients the attention statistics
    # Each network recorded and trained with its own option: the configuration, the checkpoint.
    for trial in trials.itertuples():
        run = Path(path) / "train_runs" / trial.trial_id
        recorded = json.loads((run / "train_config.json").read_text())
        checkpoint = sorted(run.glob("checkpoint_*/checkpoint.pt"))[-1]
        saved = torch.load(checkpoint, weights_only=True)["model_spec"]
        key, value = ("gate_kernel", 3) if trial.model == "toy_gated_net" else ("psi_norm", "none")
        assert recorded[key] == saved["hparams"][key] == value and saved["model"] == trial.model

    study = load_study([path])
    assert study.arms() == [
        "attention_unet (entropy_weight=0.01, psi_norm=none)",
        "toy_gated_net (entropy_weight=0.01, gate_kernel=3)",
    ]
    result = compare_models.run(study, OutDir(str(tmp_path / "analysis")))
    assert not result.problems
    table = pd.read_csv(tmp_path / "analysis" / "compare_models.csv")
    toy = table[table["arm"] == "toy_gated_net (entropy_weight=0.01, gate_kernel=3)"].iloc[0]
    assert math.isclose(
        toy["mae_best_mean"], trials.loc[trials["model"] == "toy_gated_net", "best_mae"].iloc[0]
    )
    assert "MAE" in (tmp_path / "analysis" / "compare_models.md").read_text()
