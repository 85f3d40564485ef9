"""Offline checks of a Ray cluster launcher file (cluster.yaml) before `ray up`: Ray's own
schema, values left to fill in, the `latest_dlami` image, shell variables that are unset on
the node, the EFS region against provider.region, one availability zone, a mount whose
failure is swallowed, and, where no shared filesystem is mounted (the output is a bucket), an
instance profile on every node type: the nodes' only credentials. Each problem is one line naming the YAML key and the bad value.
Importing this module does not import Ray (its schema check imports it when it runs).

The shell-variable rule: a command runs on the node in a fresh login shell, so `$X` / `${X}`
there sees only (1) what the shell sets (HOME, PATH, USER, ...), (2) what Ray's launcher
exports before that command list (RAY_HEAD_IP for worker setup and start commands, the
instance id and node type for start commands, OMP_NUM_THREADS and PYTHONWARNINGS for all),
and (3) what the command itself assigns before the use (`X=...` or `export X=...`). Anything
else, e.g. a variable exported on your laptop, is empty there. Single-quoted text is not
expanded by that shell, so it is not checked.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from kdp.distributed.ray_private import validate_cluster_config

PLACEHOLDER = "REPLACE"
# Ray 2.60 resolves this (and an empty or missing ImageId) to the Deep Learning AMI (Ubuntu
# 18.04) V71.0 (ray/autoscaler/_private/aws/config.py): too old for torch 2.13's CUDA 13 wheels
MOVING_AMIS = ("latest_dlami", "")

# What every command's shell has: the login shell's own, and what Ray's command runner
# exports before each command (ray/autoscaler/_private/command_runner.py)
SHELL_VARS = frozenset({"HOME", "PATH", "USER", "LOGNAME", "SHELL", "PWD", "OMP_NUM_THREADS", "PYTHONWARNINGS"})
# What the launcher adds per command list (ray/autoscaler/_private/autoscaler.py, commands.py,
# v2/instance_manager/ray_installer.py). RAY_HEAD_IP only reaches workers: setup_commands and
# initialization_commands also run on the head, where it is unset.
LAUNCHER_VARS = {
    "head_start_ray_commands": frozenset({"RAY_CLOUD_INSTANCE_ID", "RAY_NODE_TYPE_NAME", "RAY_enable_autoscaler_v2"}),
    "worker_start_ray_commands": frozenset({"RAY_HEAD_IP", "RAY_CLOUD_INSTANCE_ID", "RAY_NODE_TYPE_NAME",
                                            "RAY_CLOUD_INSTANCE_TYPE_NAME"}),
    "worker_setup_commands": frozenset({"RAY_HEAD_IP"}),
}

_TOKEN = re.compile(r"\w[\w-]*" + PLACEHOLDER + r"[\w-]*|" + PLACEHOLDER + r"[\w-]*")
_USE = re.compile(r"(?<!\\)\$\{?([A-Za-z_][A-Za-z0-9_]*)")
_ASSIGN = re.compile(r"(?:^|[\s;&|(])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")
_SINGLE_QUOTED = re.compile(r"'[^']*'")
_EFS_HOST = re.compile(r"\bfs-[\w-]+\.efs\.([a-z0-9-]+)\.amazonaws\.com")
_MOUNT = re.compile(r"\bmount\s")
_SWALLOW = re.compile(r"\|\|\s*(?:echo|true|:)(?:\s|$)|;\s*(?:true|:)\s*$")


def check_cluster_file(path: str | Path) -> list[str]:
    """The problems of the cluster file at `path`, one line each; empty when it is fit for `ray up`."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        return [f"(file): cannot read it as YAML: {_one_line(e)}"]
    if not isinstance(raw, dict):
        return [f"(file): a cluster file is a mapping, got {type(raw).__name__}"]
    return check_cluster_config(raw)


def check_cluster_config(raw: dict) -> list[str]:
    """The problems of a parsed cluster file (see the module docstring for what is checked)."""
    strings = list(_strings(raw))
    return [*_schema(raw), *_placeholders(strings), *_images(raw), *_variables(strings),
            *_efs_region(raw, strings), *_zones(raw), *_swallowed_mounts(strings), *_bucket_credentials(raw, strings)]


def _schema(raw: dict) -> list[str]:
    """Ray's own offline validation, as `ray up` runs it before touching AWS (ray_private says
    what a Ray without it checks instead)."""
    import jsonschema

    try:
        validate_cluster_config(raw)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        return [f"{where}: Ray's schema: {_one_line(e.message)}"]
    except Exception as e:  # noqa: BLE001 - prepare_config trips on a malformed file in many ways; each is a finding
        return [f"(config): Ray's validation: {_one_line(e)}"]
    return []


def _placeholders(strings: list[tuple[str, str]]) -> list[str]:
    return [f"{key}: placeholder {token!r} left in: put your own value there (docs/cluster-setup.md)"
            for key, text in strings for token in dict.fromkeys(_TOKEN.findall(text))]


def _images(raw: dict) -> list[str]:
    """Every node type's ImageId must be a pinned AMI: Ray's default is years too old."""
    if _provider(raw).get("type") != "aws":
        return []
    out = []
    for name, node in _node_types(raw):
        config = node.get("node_config")
        image = config.get("ImageId", "") if isinstance(config, dict) else ""
        if image in MOVING_AMIS:
            out.append(f"available_node_types.{name}.node_config.ImageId: {image!r} means Ray's default AMI, "
                       "the Deep Learning AMI (Ubuntu 18.04) V71.0, too old for torch 2.13 (CUDA 13); "
                       "pin a current AMI id (docs/cluster-setup.md)")
    return out


def _variables(strings: list[tuple[str, str]]) -> list[str]:
    out = []
    for key, text in strings:
        section = _command_section(key)
        if section is None:
            continue
        allowed = SHELL_VARS | LAUNCHER_VARS.get(section, frozenset())
        code = _SINGLE_QUOTED.sub(lambda m: " " * len(m.group()), text)  # keep offsets for "earlier"
        assigns = [(a.group(1), a.end()) for a in _ASSIGN.finditer(code)]
        unset = [u.group(1) for u in _USE.finditer(code)
                 if u.group(1) not in allowed and not any(n == u.group(1) and end <= u.start() for n, end in assigns)]
        out += [f"{key}: ${{{name}}} is unset on the node when this runs (your laptop's environment does not "
                "reach it); write the value literally, or assign it earlier in the command"
                for name in dict.fromkeys(unset)]
    return out


def _efs_region(raw: dict, strings: list[tuple[str, str]]) -> list[str]:
    """An EFS DNS name only resolves inside its own region's VPCs."""
    region = _provider(raw).get("region")
    return [f"{key}: EFS host in region {got!r}, but provider.region is {region!r}"
            for key, text in strings for got in _EFS_HOST.findall(text) if got != region]


def _zones(raw: dict) -> list[str]:
    """One zone: the EFS mount target is in one, and cross-zone traffic is slower and billed."""
    if _provider(raw).get("type") != "aws":
        return []
    zone = str(_provider(raw).get("availability_zone") or "")
    zones = [z.strip() for z in zone.split(",") if z.strip()]
    if len(zones) == 1:
        return []
    got = f"{zone!r} names {len(zones)} zones" if zones else "not set, so nodes may land in any zone"
    return [f"provider.availability_zone: {got}; give exactly one (the one with your EFS mount target)"]


def _swallowed_mounts(strings: list[tuple[str, str]]) -> list[str]:
    """A mount that may fail quietly leaves each node writing to its own local directory."""
    return [f"{key}: the mount's failure is swallowed ({_SWALLOW.search(text).group().strip()!r}); "
            "let the command fail so the node's setup stops"
            for key, text in strings
            if _command_section(key) and _MOUNT.search(text) and _SWALLOW.search(text)]


def _bucket_credentials(raw: dict, strings: list[tuple[str, str]]) -> list[str]:
    """Without a shared filesystem the output is a bucket, and a node's only credentials for it
    are its instance profile's (none are written in the file)."""
    if any(_command_section(key) and _MOUNT.search(text) for key, text in strings):
        return []
    return [f"available_node_types.{name}.node_config: no IamInstanceProfile, and no shared filesystem is mounted: "
            "the nodes have no credentials for a bucket output (docs/object-storage.md)"
            for name, node in _node_types(raw) if not (node.get("node_config") or {}).get("IamInstanceProfile")]


def _strings(node, key: str = ""):
    """(key path, text) for every string value in the parsed file."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def _command_section(key: str) -> str | None:
    """The command list a key path is in ('setup_commands', ...), None outside commands."""
    last = re.findall(r"(\w+_commands)\[\d+\]", key)
    return last[-1] if last else None


def _provider(raw: dict) -> dict:
    provider = raw.get("provider")
    return provider if isinstance(provider, dict) else {}


def _node_types(raw: dict):
    types = raw.get("available_node_types") or {}
    return [(name, node) for name, node in types.items() if isinstance(node, dict)] if isinstance(types, dict) else []


def _one_line(e) -> str:
    return " ".join(str(e).split())
