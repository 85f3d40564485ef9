"""kuberay/rayjob.yaml, checked offline: a KubeRay RayJob (ray.io/v1) with the fields KubeRay
needs, whose entrypoint parses with jobs/pipeline.py's own argument parser and writes to a
bucket; each pod's scratch is its own (an emptyDir); no credential is written in it."""
import importlib.util
import re
import shlex
from pathlib import Path

import yaml

from kdp.presets import build_config

REPO = Path(__file__).resolve().parents[1]
RAYJOB = REPO / "kuberay" / "rayjob.yaml"


def _job_module():
    spec = importlib.util.spec_from_file_location("kdp_job_pipeline", REPO / "jobs" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pods(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]


def test_the_rayjob_has_what_kuberay_needs():
    job = yaml.safe_load(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no training on the head
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["replicas"] <= group["maxReplicas"] and "rayStartParams" in group
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    lock = (REPO / "requirements.lock").read_text()
    ray_version = re.search(r"^ray==(\S+)$", lock, re.M).group(1)
    assert cluster["rayVersion"] == ray_version
    assert f"FROM rayproject/ray:{ray_version}-py311-gpu" in (REPO / "kuberay" / "Dockerfile").read_text()
    for pod in _pods(job):
        container = pod["containers"][0]
        assert container["image"] and pod["serviceAccountName"] == "kdp"  # credentials: the account's role


def test_the_entrypoint_parses_with_the_jobs_own_parser_and_writes_to_a_bucket():
    job = yaml.safe_load(RAYJOB.read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].endswith("/jobs/pipeline.py")
    args = _job_module().parse(argv[2:])
    assert args.out.startswith("s3://") and args.use_gpu and args.name == "paper"
    cfg = build_config(args.preset, args.data_dir, args.name, args.set)  # the preset and overrides are valid
    assert cfg.name == "paper"


def test_each_pod_has_its_own_scratch_and_no_credentials_are_written():
    job = yaml.safe_load(RAYJOB.read_text())
    for pod in _pods(job):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert "emptyDir" in volumes[mounts[env["KDP_SCRATCH"]["value"]]]  # node-local, never shared
        assert not any("persistentVolumeClaim" in v or "nfs" in v for v in volumes.values())
        assert not any(k.startswith("AWS_") and "value" in e for k, e in env.items() if "KEY" in k or "TOKEN" in k)
    text = RAYJOB.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]", text, re.I)
