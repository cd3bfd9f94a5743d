"""Cluster-launcher YAMLs: all three pass Ray's own schema and memtrain's rules offline; bad ones are refused."""

from pathlib import Path

import pytest
import yaml

from orchestration.cli.cluster import register, validate_cluster_yaml
from orchestration.errors import ConfigError

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name", ["aws", "gcp", "onprem"])
def test_shipped_yaml_passes_rays_schema_and_our_rules(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())
    validate_config(prepare_config(raw))  # Ray's own check, directly
    summary = validate_cluster_yaml(CLUSTER / f"{name}.yaml")
    if name != "onprem":
        assert summary["gpu_worker_types"] and raw["available_node_types"][summary["head_node_type"]]["resources"]["CPU"] == 0
    text = (CLUSTER / f"{name}.yaml").read_text()
    assert "0.0.0.0" not in text and "RAY_AUTH_MODE=token" in text


def _variant(tmp_path, edit, base="aws"):
    cfg = yaml.safe_load((CLUSTER / f"{base}.yaml").read_text())
    edit(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _set_node_field(cfg):
    cfg["available_node_types"]["gpu_1x_a10g"]["max_wrkers"] = 4


def _open_dashboard(cfg):
    cfg["head_start_ray_commands"][1] = cfg["head_start_ray_commands"][1].replace("127.0.0.1", "0.0.0.0")


@pytest.mark.parametrize("edit, message", [
    (_set_node_field, r"schema refuses it at available_node_types.gpu_1x_a10g: .*'max_wrkers' was unexpected"),
    (lambda c: c.update(idle_timeout="10"), r"schema refuses it at top level: .*'idle_timeout' was unexpected"),
    (_open_dashboard, r"0.0.0.0 at head_start_ray_commands\[1\] .*bind to 127.0.0.1"),
    # without our start commands Ray's provider default binds the dashboard to 0.0.0.0
    (lambda c: c.pop("head_start_ray_commands"), r"0.0.0.0 at head_start_ray_commands"),
    (lambda c: c["available_node_types"]["head_cpu"]["resources"].pop("CPU"), r"must run no training: set `resources: \{CPU: 0\}`"),
    (lambda c: [c["available_node_types"].pop(k) for k in ("gpu_1x_a10g", "gpu_4x_a10g")], r"no GPU worker type"),
    (lambda c: c.update(worker_start_ray_commands=["ray start --address=$RAY_HEAD_IP:6379"]),
     r"worker_start_ray_commands\[0\] must start Ray with token authentication"),
    # one command with the token proves nothing for the other
    (lambda c: c.update(worker_start_ray_commands=["RAY_AUTH_MODE=token ray stop", "ray start --address=h:6379"]),
     r"worker_start_ray_commands\[1\] must start Ray with token authentication"),
    (lambda c: c["available_node_types"]["gpu_4x_a10g"]["node_config"].pop("SecurityGroupIds"),
     r"gpu_4x_a10g name no SecurityGroupIds: the security group Ray's launcher creates otherwise opens SSH to "
     r"0.0.0.0/0"),
])
def test_bad_yaml_is_refused_with_the_fix(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        validate_cluster_yaml(_variant(tmp_path, edit))


def test_gcp_nodes_must_sit_in_a_network_of_their_own(tmp_path):
    with pytest.raises(ConfigError, match=r"head_cpu name no networkInterfaces: on the default network every VM"):
        validate_cluster_yaml(_variant(tmp_path, lambda c: c["available_node_types"]["head_cpu"]["node_config"]
                                       .pop("networkInterfaces"), base="gcp"))


def test_onprem_head_must_have_no_cpus(tmp_path):
    def edit(cfg):
        cfg["head_start_ray_commands"][1] = cfg["head_start_ray_commands"][1].replace("--num-cpus=0 ", "")
    with pytest.raises(ConfigError, match="add --num-cpus=0"):
        validate_cluster_yaml(_variant(tmp_path, edit, base="onprem"))


def test_cli_validates_several_files_and_fails_on_any_bad_one(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    good = [str(CLUSTER / f"{n}.yaml") for n in ("aws", "gcp", "onprem")]
    args = parser.parse_args(["cluster", "validate", *good])
    args.func(args)
    assert capsys.readouterr().out.count("ok ") == 3
    bad = _variant(tmp_path, _open_dashboard)
    args = parser.parse_args(["cluster", "validate", *good, str(bad)])
    with pytest.raises(ConfigError, match="1 of 4 cluster file"):
        args.func(args)
    out = capsys.readouterr()
    assert out.out.count("ok ") == 3 and "FAIL" not in out.out  # the failures go to stderr
    assert out.err.startswith(f"FAIL {bad}: 0.0.0.0 at head_start_ray_commands")
    with pytest.raises(ConfigError, match="does not exist"):
        validate_cluster_yaml(tmp_path / "missing.yaml")
