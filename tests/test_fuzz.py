"""Property-based tests of every user input: any value is accepted or rejected with a message naming it.

Configurations (``TrainConfig``), sweep YAML files and ``--set`` flags either validate or raise a
``ConfigError`` that names the key at fault, never another exception; damaged fastMRI files are reported by
the validator, never a crash. Example budgets are fixed so the suite stays fast.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mri_models.data.validate import validate_file
from ray_jobs.cli import parse_overrides
from ray_jobs.config import ConfigError, TrainConfig, make_train_config
from ray_jobs.sweep_config import load_sweep
from tests.conftest import make_fastmri_volume

FIELDS = [*sorted(TrainConfig.model_fields), "gamma"]
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.one_of(
    scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=6), scalars, max_size=3)
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(min_size=1, max_size=12))


def _names_a_key(message: str, config: dict) -> bool:
    return any(str(key) in message for key in config) or "config:" in message


@SETTINGS
@given(st.dictionaries(keys, values, max_size=6))
def test_any_train_config_is_accepted_or_named(config):
    try:
        cfg = make_train_config(config)
    except ConfigError as err:
        assert str(err).startswith("invalid training configuration: ")
        assert _names_a_key(str(err), config), str(err)
        return
    assert cfg.model_dump(mode="json")  # an accepted configuration round-trips
    assert make_train_config(cfg.model_dump(mode="json")) == cfg
    assert all(math.isfinite(w) and w >= 0 for w in cfg.penalty_weights.values())


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=4))
def test_any_set_flag_is_parsed_or_named(pairs):
    try:
        parsed = parse_overrides(pairs)
    except ConfigError as err:
        assert "--set" in str(err)
        return
    assert all("=" in pair for pair in pairs) and len(parsed) <= len(pairs)


sweep_documents = st.fixed_dictionaries(
    {"experiment": st.one_of(st.text(max_size=8), scalars)},
    optional={
        "train": st.one_of(st.dictionaries(st.sampled_from(FIELDS), values, max_size=3), scalars),
        "search": st.one_of(
            st.dictionaries(st.sampled_from(FIELDS), st.lists(scalars, max_size=3), max_size=2), scalars
        ),
        "seeds": st.one_of(st.lists(st.integers(-2, 5), max_size=3), scalars),
        "scheduler": st.one_of(
            st.dictionaries(st.sampled_from(["type", "grace_period", "reduction_factor", "kind"]), scalars),
            scalars,
        ),
        "profiles": st.one_of(
            st.dictionaries(st.sampled_from(["smoke", "cpu", "paper"]), values, max_size=2), scalars
        ),
        "workers_per_trial": scalars,
        "max_concurrent_trials": scalars,
        "unknown": scalars,
    },
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    document=st.one_of(sweep_documents, values), profile=st.sampled_from(["smoke", "cpu", "paper", "laptop"])
)
def test_any_sweep_yaml_is_accepted_or_named(tmp_path, document, profile):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        sweep = load_sweep(path, profile)
    except ConfigError as err:
        assert str(path) in str(err) or "trial" in str(err) or "profile" in str(err), str(err)
        return
    assert sweep.trials  # accepted means every trial validated


# ----------------------------------------------------------------------------------------- damaged files


@pytest.fixture(scope="module")
def valid_volume(tmp_path_factory) -> Path:
    path = make_fastmri_volume(tmp_path_factory.mktemp("valid") / "singlecoil_train" / "file.h5")
    assert validate_file(path, "singlecoil_train") == []
    return path


def _copy(valid: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / "singlecoil_train" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(valid, target)
    return target


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 0.999))
def test_truncated_files_are_reported(valid_volume, tmp_path, fraction):
    path = _copy(valid_volume, tmp_path, "truncated.h5")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    problems = validate_file(path, "singlecoil_train")
    assert problems and all(isinstance(p, str) and p for p in problems)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(1, 255)), min_size=1, max_size=20))
def test_flipped_bytes_never_crash_the_validator(valid_volume, tmp_path, flips):
    path = _copy(valid_volume, tmp_path, "flipped.h5")
    data = bytearray(path.read_bytes())
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    path.write_bytes(bytes(data))
    problems = validate_file(path, "singlecoil_train")  # never raises
    assert all(isinstance(p, str) and p for p in problems)


DAMAGE = {
    "header XML cut short": lambda hf: _replace(
        hf, "ismrmrd_header", np.bytes_(hf["ismrmrd_header"][()][:-40])
    ),
    "header XML not XML": lambda hf: _replace(hf, "ismrmrd_header", np.bytes_(b"<ismrmrdHeader><encoding>")),
    "kspace as float32": lambda hf: _replace(hf, "kspace", np.abs(hf["kspace"][()]).astype(np.float32)),
    "kspace 2-D": lambda hf: _replace(hf, "kspace", hf["kspace"][0]),
    "target of another size": lambda hf: _replace(
        hf, "reconstruction_esc", hf["reconstruction_esc"][:, :16, :16]
    ),
    "target as int": lambda hf: _replace(
        hf, "reconstruction_esc", hf["reconstruction_esc"][()].astype(np.int16)
    ),
    "no kspace": lambda hf: hf.__delitem__("kspace"),
    "max attribute text": lambda hf: hf.attrs.__setitem__("max", "large"),
    "NaN in the target": lambda hf: _set(hf, "reconstruction_esc", np.nan),
}


def _replace(hf: h5py.File, key: str, value) -> None:
    del hf[key]
    hf[key] = value


def _set(hf: h5py.File, key: str, value: float) -> None:
    data = hf[key][()]
    data.flat[0] = value
    _replace(hf, key, data)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_structure_is_named(valid_volume, tmp_path, damage):
    path = _copy(valid_volume, tmp_path, "damaged.h5")
    with h5py.File(path, "r+") as hf:
        DAMAGE[damage](hf)
    problems = validate_file(path, "singlecoil_train")
    assert problems, f"{damage} was not reported"
    named = {"header": "ismrmrd_header", "kspace": "kspace", "target": "reconstruction_esc", "max": "max"}
    expected = next(key for word, key in named.items() if word in damage)
    assert any(expected in problem for problem in problems), problems
