"""Offline checks of Ray cluster-launcher YAMLs (``memtrain cluster validate``).

``ray up`` has no dry run and needs cloud credentials, so a typo in a cluster YAML usually shows up only after
minutes of provisioning. This module runs Ray's own preparation and JSON-schema validation offline (the same
``prepare_config`` + ``validate_config`` that ``ray up`` calls) and then memtrain's rules:

- the head runs no training: ``resources: {CPU: 0}`` on the head node type (cloud providers), or
  ``ray start --head --num-cpus=0`` (the on-prem provider, which allows no node types);
- cloud clusters have at least one GPU worker type with ``max_workers`` > 0;
- nothing binds or opens to the internet: no ``0.0.0.0`` anywhere in the prepared config (Ray's provider
  defaults start the dashboard with ``--dashboard-host=0.0.0.0`` unless the YAML overrides the start commands);
- the nodes' network is the user's: on AWS every node type names its security groups (``SecurityGroupIds``;
  the group Ray's launcher would create opens SSH to 0.0.0.0/0), on GCP every node type names its subnetwork
  (``networkInterfaces``; the default network lets every VM of the project reach the cluster's ports);
- Ray's token authentication stays on: every ``ray start`` command sets ``RAY_AUTH_MODE=token``.

Example::

    memtrain cluster validate cluster/aws.yaml cluster/gcp.yaml cluster/onprem.yaml

or from Python (offline, from the repository's root)::

    >>> summary = validate_cluster_yaml("cluster/aws.yaml")
    >>> summary["gpu_worker_types"]
    ['gpu_1x_a10g', 'gpu_4x_a10g']
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import yaml

from orchestration.errors import ConfigError

CLOUD_PROVIDERS = ("aws", "gcp", "azure")
# instance/machine types whose GPUs Ray detects by itself (so `resources: {}` is fine for them)
_AWS_GPU_FAMILIES = re.compile(r"^(p\d|g\d|g\dd|g\dad|g\dg|dl1|trn\d|inf\d)", re.IGNORECASE)


def _where_open(node, path: str = "") -> list[str]:
    """Paths of every string in a nested config that mentions 0.0.0.0."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _where_open(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _where_open(v, f"{path}[{i}]")]
    return [path] if isinstance(node, str) and "0.0.0.0" in node else []


def _ray_prepare(raw: dict, path: Path) -> dict:
    """Ray's own preparation (provider defaults merged in) and schema validation, errors made one line."""
    import jsonschema

    from orchestration.ray_private import autoscaler_prepare_and_validate

    try:
        full = autoscaler_prepare_and_validate(raw)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "top level"
        raise ConfigError(f"{path}: Ray's cluster schema refuses it at {where}: {exc.message}; fix that field "
                          "(the schema is ray/autoscaler/ray-schema.json)") from None
    except Exception as exc:  # cli_logger.abort()'s exception (e.g. node types on an on-prem cluster) and others
        raise ConfigError(f"{path}: Ray refuses it: {exc}") from None
    return full


def _is_gpu_type(node_type: dict, provider: str) -> bool:
    if node_type.get("resources", {}).get("GPU", 0) > 0:
        return True
    node_config = node_type.get("node_config", {})
    if provider == "aws":
        return bool(_AWS_GPU_FAMILIES.match(str(node_config.get("InstanceType", ""))))
    if provider == "gcp":
        return bool(node_config.get("guestAccelerators")) or str(node_config.get("machineType", "")).startswith(
            ("a2-", "a3-", "g2-"))
    return False


def _check_network(path: Path, provider: str, node_types: dict) -> None:
    """The nodes must sit in a network the user controls (see the module docstring and cluster/README.md)."""
    field, why = {
        "aws": ("SecurityGroupIds", "the security group Ray's launcher creates otherwise opens SSH to 0.0.0.0/0; make "
                "one that allows SSH only from your network and all traffic within the group"),
        "gcp": ("networkInterfaces", "on the default network every VM of the project reaches the cluster's ports; "
                "make a network whose firewall allows SSH only from your network and the rest only within it"),
    }.get(provider, (None, None))
    if field is None:
        return
    missing = sorted(name for name, t in node_types.items() if field not in t.get("node_config", {}))
    if missing:
        raise ConfigError(f"{path}: node type(s) {', '.join(missing)} name no {field}: {why}, and name it in every "
                          "node type's node_config (cluster/README.md shows the commands)")


def validate_cluster_yaml(path: str | os.PathLike) -> dict:
    """Check one cluster YAML offline; returns a short summary, raises ConfigError naming the problem and fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster file {str(path)!r} does not exist; see cluster/ for aws.yaml, gcp.yaml, "
                          "onprem.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a cluster YAML is a mapping with at least cluster_name and provider")
    full = _ray_prepare(raw, path)
    provider = full["provider"]["type"]

    opened = _where_open(full)
    if opened:
        raise ConfigError(f"{path}: 0.0.0.0 at {', '.join(opened)} would expose the dashboard/job server (remote "
                          "code execution) to every network; bind to 127.0.0.1 (--dashboard-host=127.0.0.1 in "
                          "head_start_ray_commands, which replaces the provider default) and reach it with "
                          "`ray dashboard FILE.yaml`")

    starts = {"head_start_ray_commands": full.get("head_start_ray_commands", []),
              "worker_start_ray_commands": full.get("worker_start_ray_commands", [])}
    for key, commands in starts.items():
        for i, command in enumerate(commands):  # each command on its own: one with the token proves nothing
            if "RAY_AUTH_MODE=disabled" in command or "ray start" in command and "RAY_AUTH_MODE=token" not in command:
                raise ConfigError(f"{path}: {key}[{i}] must start Ray with token authentication: prefix its `ray start` "
                                  "with RAY_AUTH_MODE=token and mount the token (file_mounts '~/.ray/auth_token')")

    head_type = full["head_node_type"]
    node_types = full["available_node_types"]
    _check_network(path, provider, raw.get("available_node_types", {}))
    if provider == "local":  # one internal node type: the head's CPUs are set on its `ray start`
        if not re.search(r"--num-cpus[= ]0\b", " ".join(starts["head_start_ray_commands"])):
            raise ConfigError(f"{path}: the head must run no training: add --num-cpus=0 to its `ray start` in "
                              "head_start_ray_commands")
        gpu_types: list[str] = []
    else:
        head_cpus = node_types[head_type].get("resources", {}).get("CPU")
        if head_cpus != 0:
            raise ConfigError(f"{path}: the head node type {head_type!r} must run no training: set "
                              f"`resources: {{CPU: 0}}` on it (it has {head_cpus!r})")
        gpu_types = [name for name, t in node_types.items()
                     if name != head_type and _is_gpu_type(t, provider) and t.get("max_workers", 0) > 0]
        if provider in CLOUD_PROVIDERS and not gpu_types:
            raise ConfigError(f"{path}: no GPU worker type with max_workers > 0 among {sorted(node_types)}; add one "
                              "(a GPU instance type, or resources: {GPU: n}) so training has somewhere to run")
    return {"path": str(path), "cluster_name": full["cluster_name"], "provider": provider, "head_node_type": head_type,
            "gpu_worker_types": gpu_types, "max_workers": full.get("max_workers")}


def _cmd_validate(args) -> None:
    failures = 0
    for path in args.files:
        try:
            s = validate_cluster_yaml(path)
        except ConfigError as exc:
            failures += 1
            print(f"FAIL {exc}", file=sys.stderr)
            continue
        gpus = ", ".join(s["gpu_worker_types"]) or "detected on each worker"
        print(f"ok   {path}: {s['provider']} cluster {s['cluster_name']!r}, CPU-0 head {s['head_node_type']!r}, "
              f"GPU workers: {gpus}, max_workers {s['max_workers']}")
    if failures:
        raise ConfigError(f"{failures} of {len(args.files)} cluster file(s) failed validation (the FAIL lines above)")


VALIDATE_HELP = """\
Check cluster-launcher YAMLs (the files `ray up` takes) offline, without cloud credentials, so a typo shows up now
rather than after minutes of provisioning. Each file goes through Ray's own preparation and schema check (what
`ray up` does first) and then memtrain's rules:

  - the head node runs no training (resources: {CPU: 0}, or --num-cpus=0 on an on-prem head);
  - a cloud cluster has a GPU worker type with max_workers > 0;
  - nothing listens on 0.0.0.0 (the dashboard binds 127.0.0.1; reach it with `ray dashboard FILE.yaml`);
  - every node type names its network: SecurityGroupIds on AWS, networkInterfaces on GCP;
  - every `ray start` sets RAY_AUTH_MODE=token.

Prints one "ok" line per good file on stdout and one "FAIL" line per bad one, with the fix, on stderr; exits 1
when any file fails. Example:

    memtrain cluster validate cluster/aws.yaml cluster/gcp.yaml cluster/onprem.yaml"""


def register(subparsers) -> None:
    """Add ``memtrain cluster validate FILE...`` to the CLI's sub-commands."""
    p = subparsers.add_parser("cluster", help="cluster-launcher YAMLs (validate offline against Ray's schema)",
                              description="Ray cluster-launcher YAMLs (cluster/ holds aws.yaml, gcp.yaml, onprem.yaml; "
                                          "cluster/README.md shows how to start one).")
    sub = p.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    v = sub.add_parser("validate", help="check cluster YAMLs offline: Ray's schema plus memtrain's rules",
                       description=VALIDATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("files", nargs="+", metavar="FILE.yaml", help="cluster-launcher YAML")
    v.set_defaults(func=_cmd_validate)
