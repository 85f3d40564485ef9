"""cluster.yaml (every artifact in a bucket) and cluster-efs.yaml (a shared EFS volume) validate
offline against the launcher schema shipped in the ray wheel, and jobs/check_cluster.py refuses
what would break on AWS: placeholders, `latest_dlami`, shell variables unset on the node, a
swallowed mount, two zones, an EFS host in another region, a bucket cluster without credentials."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdp.distributed.cluster_file import check_cluster_config, check_cluster_file

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster-efs.yaml"  # most checks are the EFS variant's; the bucket one's are at the end
BUCKET_YAML = REPO / "cluster.yaml"
EFS, AMI = "fs-REPLACE-WITH-YOUR-EFS-ID", "ami-REPLACE-WITH-DLAMI-BASE-GPU-UBUNTU2204-ID"
PROFILE = "arn:aws:iam::REPLACE-WITH-ACCOUNT-ID:instance-profile/kdp-s3"
REAL = {EFS: "fs-0123456789abcdef0", AMI: "ami-0123456789abcdef0",  # realistic ids, as a user writes them
        PROFILE: "arn:aws:iam::123456789012:instance-profile/kdp-s3"}
SHIPPED_PROBLEMS = [f"{key}: placeholder {value!r} left in: put your own value there (docs/cluster-setup.md)"
                    for key, value in [("available_node_types.head.node_config.ImageId", AMI),
                                       ("available_node_types.gpu_worker.node_config.ImageId", AMI),
                                       ("initialization_commands[1]", EFS)]]


def raw_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def filled_text(path: Path = CLUSTER_YAML) -> str:
    text = path.read_text()
    for placeholder, value in REAL.items():
        text = text.replace(placeholder, value)
    return text


def filled() -> dict:
    return yaml.safe_load(filled_text())


def mount_command(raw: dict) -> tuple[int, str]:
    return next((i, c) for i, c in enumerate(raw["initialization_commands"]) if "mount -t nfs4" in c)


def test_cluster_yaml_is_valid_for_the_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(raw_config())
    validate_config(cfg)  # raises on unknown keys or a bad head_node_type
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert [(v["node_config"]["InstanceType"], v["min_workers"], v["max_workers"]) for v in workers.values()] \
        == [("g5.xlarge", 0, 4)], "one GPU worker type: 0..4 g5.xlarge"


def test_cluster_yaml_installs_kdp_and_keeps_the_dashboard_local():
    raw = raw_config()
    setup = " ".join(raw["setup_commands"])
    assert "requirements.lock" in setup and "kdp[ray]" in setup
    assert "env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null" in setup  # the README's install route
    assert "kdp[cluster]" in " ".join(raw["head_setup_commands"])  # boto3 for the head's autoscaler
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):  # read, never run here
        assert len(raw[key]) == 1 and "ray start" in raw[key][0] and "--disable-usage-stats" in raw[key][0]
        assert not any("ray stop" in c for c in raw[key])  # nothing stops a Ray it did not start
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])
    text = CLUSTER_YAML.read_text().lower()
    assert not any(s in text for s in ("aws_access_key", "aws_secret", "secret_access", "password", "token:"))


def test_a_broken_cluster_yaml_is_rejected():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = raw_config()
    raw["head_node_type"] = "no-such-node-type"
    # ray's own check after the schema (ray/autoscaler/_private/util.py: validate_config)
    with pytest.raises(ValueError, match="`head_node_type` must be one of `available_node_types`"):
        validate_config(prepare_config(raw))
    assert check_cluster_config(raw)[0] == \
        "(config): Ray's validation: `head_node_type` must be one of `available_node_types`."


@pytest.mark.parametrize("key,value,message", [
    ("no_such_key", 1, r"Additional properties are not allowed \('no_such_key' was unexpected\)"),
    ("max_workers", "many", "'many' is not of type 'integer'"),
])
def test_a_cluster_yaml_that_breaks_the_schema_is_rejected(key, value, message):
    jsonschema = pytest.importorskip("jsonschema")  # a dependency of ray[default]
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = raw_config()
    raw[key] = value
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_config(prepare_config(raw))
    assert re.search(message, check_cluster_config(raw)[0])


def test_the_shipped_file_is_refused_only_for_its_placeholders():
    assert check_cluster_file(CLUSTER_YAML) == SHIPPED_PROBLEMS


def test_with_real_ids_in_place_the_file_has_no_problems(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(filled_text())
    assert check_cluster_file(path) == []


def _in_mount_command(edit):
    def mutate(raw):
        i, cmd = mount_command(raw)
        raw["initialization_commands"][i] = edit(cmd)
    return mutate


@pytest.mark.parametrize("mutate,problem", [
    (lambda raw: raw["available_node_types"]["gpu_worker"]["node_config"].update(ImageId="latest_dlami"),
     "available_node_types.gpu_worker.node_config.ImageId: 'latest_dlami' means Ray's default AMI"),
    (_in_mount_command(lambda cmd: cmd.replace(REAL[EFS], "${KDP_EFS_ID}")),  # the laptop's variable
     "initialization_commands[1]: ${KDP_EFS_ID} is unset on the node"),
    (_in_mount_command(lambda cmd: cmd + ' || echo "no shared filesystem mounted at /shared"'),
     "initialization_commands[1]: the mount's failure is swallowed ('|| echo')"),
    (lambda raw: raw["provider"].update(availability_zone="us-west-2a,us-west-2b"),
     "provider.availability_zone: 'us-west-2a,us-west-2b' names 2 zones"),
    (lambda raw: raw["provider"].update(region="us-east-1", availability_zone="us-east-1a"),
     "initialization_commands[1]: EFS host in region 'us-west-2', but provider.region is 'us-east-1'"),
    (lambda raw: raw["setup_commands"].append("ping -c1 $RAY_HEAD_IP"),  # setup_commands run on the head too
     "setup_commands[4]: ${RAY_HEAD_IP} is unset on the node"),
], ids=["latest_dlami", "laptop_env_var", "mount_or_echo", "two_zones", "other_region", "head_ip_on_head"])
def test_the_checker_refuses_what_breaks_on_aws(mutate, problem):
    raw = filled()
    mutate(raw)
    problems = check_cluster_config(raw)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_variables_the_node_has_pass():
    raw = filled()
    raw["setup_commands"].append("D=/shared/x; export E=1 && mkdir -p $D ${HOME}/y && echo '$NOT_EXPANDED'")
    raw["worker_start_ray_commands"].append("echo $RAY_HEAD_IP $RAY_NODE_TYPE_NAME")
    assert check_cluster_config(raw) == []
    raw["setup_commands"].append("echo $LATER; LATER=1")  # assigned after its use: still unset there
    assert check_cluster_config(raw) == ["setup_commands[5]: ${LATER} is unset on the node when this runs (your "
                                         "laptop's environment does not reach it); write the value literally, "
                                         "or assign it earlier in the command"]


def test_the_shared_filesystem_is_mounted_or_the_node_fails():
    raw = raw_config()
    _, cmd = mount_command(raw)
    assert not re.search(r"\|\|\s*(echo|true|:)", cmd), "a failed mount must fail the node's setup"
    assert "$" not in cmd and f"{EFS}.efs.{raw['provider']['region']}.amazonaws.com:/ /shared" in cmd
    assert "&& mountpoint -q /shared && sudo chown 1000:1000 /shared" in cmd  # proven, then writable by uid 1000
    assert raw["setup_commands"][0] == "mountpoint -q /shared && test -w /shared"  # inside the container
    assert "-v /shared:/shared" in raw["docker"]["run_options"]


def test_nodes_restart_with_what_they_installed_in_one_zone():
    raw = raw_config()
    assert raw["provider"]["cache_stopped_nodes"] is True
    assert raw["provider"]["availability_zone"] == "us-west-2a"
    assert "-v /home/ubuntu/kdp-venv:/home/ray/kdp-venv" in raw["docker"]["run_options"]  # outlives `docker run --rm`


def test_the_image_is_the_locks_ray_on_python_311():
    lock = (REPO / "requirements.lock").read_text()
    ray_version = re.search(r"^ray==(\S+)$", lock, re.M).group(1)
    assert "Python 3.11" in lock.splitlines()[0]
    assert raw_config()["docker"]["image"] == f"rayproject/ray:{ray_version}-py311-gpu"


def test_the_cluster_extra_has_what_the_launcher_needs():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("boto3") for r in extras["cluster"])
    assert "ray[default]>=2.59,<2.61" in extras["cluster"]


def _check_cluster(*args):
    return subprocess.run([sys.executable, str(REPO / "jobs" / "check_cluster.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_check_cluster_exit_codes(tmp_path):
    shipped = _check_cluster("cluster-efs.yaml")
    assert shipped.returncode == 1, shipped.stderr
    assert shipped.stdout.splitlines() == [f"cluster-efs.yaml: {p}" for p in SHIPPED_PROBLEMS]
    path = tmp_path / "cluster.yaml"
    path.write_text(filled_text())
    ok = _check_cluster(str(path))
    assert (ok.returncode, ok.stdout) == (0, f"{path}: ok\n"), ok.stderr
    helped = _check_cluster("--help")
    assert helped.returncode == 0 and "latest_dlami" in helped.stdout


def test_the_checker_imports_ray_only_when_it_runs():
    code = "import sys, kdp.distributed.cluster_file; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


# ---- cluster.yaml: no shared filesystem, every artifact in a bucket ---------------------------

def test_the_bucket_cluster_is_valid_mounts_nothing_and_is_refused_only_for_its_placeholders(tmp_path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(BUCKET_YAML.read_text())
    validate_config(prepare_config(raw))
    text = " ".join(c for key in ("initialization_commands", "setup_commands") for c in raw[key])
    assert "mount" not in text and "/shared" not in " ".join(raw["docker"]["run_options"]) and EFS not in text
    assert check_cluster_file(BUCKET_YAML) == [
        f"{key}: placeholder {value!r} left in: put your own value there (docs/cluster-setup.md)"
        for key, value in [("available_node_types.head.node_config.ImageId", AMI),
                           ("available_node_types.head.node_config.IamInstanceProfile.Arn", "REPLACE-WITH-ACCOUNT-ID"),
                           ("available_node_types.gpu_worker.node_config.ImageId", AMI),
                           ("available_node_types.gpu_worker.node_config.IamInstanceProfile.Arn",
                            "REPLACE-WITH-ACCOUNT-ID")]]
    path = tmp_path / "cluster.yaml"
    path.write_text(filled_text(BUCKET_YAML))
    assert check_cluster_file(path) == []
    ok = _check_cluster(str(path))
    assert (ok.returncode, ok.stdout) == (0, f"{path}: ok\n"), ok.stderr
    # everything else is the EFS variant's, line for line: one image, one install, one start
    efs = filled()
    for key in ("docker", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "provider"):
        got = yaml.safe_load(filled_text(BUCKET_YAML))[key]
        if key == "docker":
            got, efs[key] = got["image"], efs[key]["image"]
        assert got == efs[key], key


def test_a_bucket_cluster_without_an_instance_profile_is_refused():
    raw = yaml.safe_load(filled_text(BUCKET_YAML))
    del raw["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]
    assert check_cluster_config(raw) == [
        "available_node_types.gpu_worker.node_config: no IamInstanceProfile, and no shared filesystem is mounted: "
        "the nodes have no credentials for a bucket output (docs/object-storage.md)"]
