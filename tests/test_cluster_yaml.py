"""Offline checks of cluster.yaml: Ray's own config pipeline accepts it, and it has the properties we rely on.

`ray up` does three things with the file: `prepare_config` (merge with ray/autoscaler/aws/defaults.yaml,
merge setup commands, check the docker section, fill per-type min/max workers), `validate_config`
(ray-schema.json plus cross-field checks), then the provider's `bootstrap_config` (for AWS,
`bootstrap_aws`: IAM, key pair, subnets, security groups), which is the only step that calls AWS. These
tests run the first two, exactly as Ray runs them, with the network blocked, and never the third.
"""

from __future__ import annotations

import argparse
import ast
import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ray_jobs.cli import add_common_arguments

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
AWS_CONFIG_SOURCE = Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a connection (boto3, HTTP, ...) fails the test: validation must be offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster.yaml validation tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def raw() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture
def prepared(raw) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _head(config: dict) -> dict:
    return config["available_node_types"][config["head_node_type"]]


def _worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def _gpu_workers(config: dict) -> dict[str, dict]:
    return {k: v for k, v in _worker_types(config).items() if v["resources"].get("GPU", 0) >= 1}


def _ray_start_commands(config: dict) -> list[str]:
    cmds = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [c for c in cmds if "ray start" in c]


def _sets_env(command: str, name: str) -> str | None:
    """The value `command` gives environment variable `name` (`export NAME=v` or `NAME=v cmd`), if any."""
    match = re.search(rf"(?:^|[\s;]){name}=(\S+)", command)
    return match.group(1).strip("'\"") if match else None


# ------------------------------------------------------------------------------------ Ray's own checks


def test_prepare_and_validate_pass_offline(prepared):
    # prepare_config filled what `ray up` fills; validate_config passed in the fixture.
    assert prepared["cluster_name"] == "mri-sweeps"
    assert prepared["provider"]["type"] == "aws"
    assert "cluster_synced_files" in prepared  # from defaults.yaml: proves the AWS defaults were merged
    assert _head(prepared)["max_workers"] == 0


def test_required_top_level_settings(raw):
    provider = raw["provider"]
    assert provider["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}-[a-z]+-\d", provider["region"])
    assert all(z.startswith(provider["region"]) for z in provider["availability_zone"].split(","))
    assert provider["cache_stopped_nodes"] is False
    assert raw["auth"]["ssh_user"] == "ubuntu"
    assert raw["idle_timeout_minutes"] > 0
    assert raw["upscaling_speed"] > 0


# ------------------------------------------------------------------------------------------ node types


def test_head_has_no_gpu_and_launches_no_workers_of_its_type(prepared):
    head = _head(prepared)
    assert head["resources"].get("GPU", 0) == 0
    # A small CPU pool for trial functions / Ray Data, never enough to matter for training.
    assert 0 <= head["resources"]["CPU"] <= 4
    assert head["max_workers"] == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # CPU instance family


def test_gpu_worker_type_scales_from_zero_with_integer_resources(prepared):
    gpu_workers = _gpu_workers(prepared)
    assert gpu_workers, "no worker type advertises a GPU"
    for name, node_type in gpu_workers.items():
        assert node_type["min_workers"] == 0, name
        assert 1 <= node_type["max_workers"] <= prepared["max_workers"], name
        resources = node_type["resources"]
        assert {"CPU", "GPU"} <= resources.keys(), name
        for key, value in resources.items():
            assert type(value) is int and value >= 0, f"{name}.resources.{key} = {value!r}"
        assert resources["GPU"] >= 1
        # one trial worker takes 1 CPU + 1 GPU; the rest feed it
        assert resources["CPU"] > resources["GPU"]


def test_every_node_type_has_an_instance_profile_for_s3(raw):
    for name, node_type in raw["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), name


# ---------------------------------------------------------------------------------------------- network


def _ports(rule: dict) -> tuple[int, int]:
    return rule.get("FromPort"), rule.get("ToPort")


def test_security_group_opens_only_ssh(raw):
    provider = raw["provider"]
    # Ray manages the group only for node types without SecurityGroupIds; a hand-made group would
    # escape this check.
    for name, node_type in raw["available_node_types"].items():
        assert "SecurityGroupIds" not in node_type["node_config"], name
        assert "NetworkInterfaces" not in node_type["node_config"], name
    extra_rules = provider.get("security_group", {}).get("IpPermissions", [])
    for rule in extra_rules:
        assert rule.get("IpProtocol") == "tcp" and _ports(rule) == (22, 22), rule


def _literal_return(function_name: str):
    tree = ast.parse(AWS_CONFIG_SOURCE.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function_name:
            returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            assert len(returns) == 1
            return ast.literal_eval(returns[0].value)
    raise AssertionError(f"{function_name} not found in {AWS_CONFIG_SOURCE}")


def test_rays_default_rules_open_only_ssh_to_the_outside():
    # What Ray itself adds to the group besides our IpPermissions (read from the installed source:
    # importing ray.autoscaler._private.aws.config needs boto3). The only other default rule admits
    # members of the cluster's own security groups (UserIdGroupPairs), not addresses.
    ssh_rules = _literal_return("_create_default_ssh_inbound_rules")
    assert [(r["IpProtocol"], _ports(r)) for r in ssh_rules] == [("tcp", (22, 22))]
    source = AWS_CONFIG_SOURCE.read_text()
    merged = re.search(r"def _create_default_inbound_rules\(.*?return list\(merged_rules\)", source, re.S)
    assert merged and "intracluster_rules" in merged.group(0) and "ssh_rules" in merged.group(0)
    intracluster = re.search(r"def _create_default_intracluster_inbound_rules.*?\n\n\n", source, re.S)
    assert intracluster and "UserIdGroupPairs" in intracluster.group(0)
    assert "IpRanges" not in intracluster.group(0)


def test_dashboard_port_is_not_opened_to_the_outside(raw, prepared):
    # The dashboard binds 0.0.0.0 so that worker nodes can reach the address the head registers in
    # the GCS; only the security group keeps it private, so no rule may name its port.
    (head_start,) = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    port = re.search(r"--dashboard-port[= ](\d+)", head_start)
    dashboard_port = int(port.group(1)) if port else 8265
    for rule in raw["provider"].get("security_group", {}).get("IpPermissions", []):
        low, high = _ports(rule)
        assert low is not None and not low <= dashboard_port <= high, rule


# ---------------------------------------------------------------------------------- image and software


def test_docker_image_is_ray_2_60_gpu(prepared):
    docker = prepared["docker"]
    image = docker.get("worker_image", docker["image"])
    repo, tag = image.split(":")
    assert repo == "rayproject/ray"
    assert re.fullmatch(r"2\.60\.\d+-py311-gpu", tag), tag
    # The laptop's Ray must match the cluster's.
    assert ray.__version__.split(".")[:2] == tag.split("-")[0].split(".")[:2]
    assert docker["container_name"]


def test_setup_installs_the_project_with_cuda_torch(prepared):
    mounts = prepared["file_mounts"]
    assert "~/sparse-attention-sweeps" in mounts
    local = (REPO / mounts["~/sparse-attention-sweeps"]).resolve()
    pyproject = (local / "pyproject.toml").read_text()  # (tomllib is 3.11+, the project supports 3.10)
    assert re.search(r'^name = "sparse-attention-sweeps"$', pyproject, re.M)
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        cmds = prepared[key]
        assert any(re.search(r"pip install .*-e ~/sparse-attention-sweeps\b", c) for c in cmds), key
        joined = "\n".join(cmds)
        assert "whl/cpu" not in joined and "+cpu" not in joined, "CPU torch on GPU nodes"


def test_worker_nodes_run_the_spot_guard_after_ray_start(prepared):
    commands = prepared["worker_start_ray_commands"]
    starts = [i for i, c in enumerate(commands) if "ray start" in c]
    guards = [i for i, c in enumerate(commands) if "python -m ray_jobs.spot_guard --imds" in c]
    assert len(starts) == 1 and len(guards) == 1 and guards[0] > starts[0], commands
    assert "RAY_AUTH_MODE=token" in commands[guards[0]]  # its `ray drain-node` sends the token
    head = "\n".join(prepared["head_start_ray_commands"])
    assert "ray_jobs.spot_guard" not in head  # the head is on-demand


def test_data_is_streamed_from_s3_with_no_copy_step(prepared):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in prepared[key] if "ray start" in c]
        data_root = _sets_env(start, "MRI_DATA_ROOT")
        assert data_root is not None and data_root.startswith("s3://"), (key, data_root)
    setup = "\n".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    for step in ("aws s3 sync", "aws s3 cp", "ensure_synthetic_data", "rsync"):
        assert step not in setup, f"a data copy step in the setup commands: {step}"
    # The scripts take MRI_DATA_ROOT as their --data-root default.
    parser = argparse.ArgumentParser()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MRI_DATA_ROOT", "s3://bucket/knee")
        add_common_arguments(parser, "")
    assert parser.parse_args([]).data_root == "s3://bucket/knee"


# -------------------------------------------------------------------------------- auth and storage


def test_token_auth_on_in_every_ray_start(prepared):
    starts = _ray_start_commands(prepared)
    assert any("--head" in c for c in starts) and any("--address" in c for c in starts)
    for command in starts:
        assert "\n" not in command
        assert _sets_env(command, "RAY_AUTH_MODE") == "token", command
        assert command.index("RAY_AUTH_MODE=token") < command.index("ray start")
    # The token itself reaches every node through file_mounts (the head re-syncs them to workers).
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    everything = yaml.safe_dump(prepared)
    assert "RAY_AUTH_MODE=disabled" not in everything


def test_storage_is_s3(prepared):
    (head_start,) = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    storage = _sets_env(head_start, "MRI_SWEEPS_STORAGE")
    assert storage is not None and storage.startswith("s3://"), storage
    assert len(storage) > len("s3://") and "/" in storage[len("s3://") :]


# --------------------------------------------------------------------- the validation is not a no-op


def _gpu(config: dict) -> dict:
    return config["available_node_types"]["gpu_worker"]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: _gpu(c)["resources"].update(GPU=0.5), id="float-resource"),
        pytest.param(lambda c: _gpu(c)["resources"].update(CPU=-1), id="negative-resource"),
        pytest.param(lambda c: _gpu(c).pop("node_config"), id="no-node-config"),
        pytest.param(lambda c: _gpu(c).pop("resources"), id="no-resources"),
        pytest.param(lambda c: c.pop("cluster_name"), id="no-cluster-name"),
        pytest.param(lambda c: c.update(dashboard_port=8265), id="unknown-key"),
        pytest.param(lambda c: c["provider"]["security_group"].update(CidrIp="0.0.0.0/0"), id="sg-extra"),
    ],
)
def test_schema_rejects_a_broken_copy(prepared, mutate):
    broken = copy.deepcopy(prepared)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_cross_field_checks_reject_a_broken_copy(prepared):
    broken = copy.deepcopy(prepared)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(broken)
    broken = copy.deepcopy(prepared)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(broken)


def test_float_resource_in_the_yaml_text_fails_too(raw):
    # The failure a user would actually make: writing 0.5 in the file.
    text = CLUSTER_YAML.read_text().replace('{"CPU": 8, "GPU": 1}', '{"CPU": 8, "GPU": 0.5}')
    assert text != CLUSTER_YAML.read_text()
    with pytest.raises(jsonschema.ValidationError, match=r"0\.5"):
        validate_config(prepare_config(yaml.safe_load(text)))
