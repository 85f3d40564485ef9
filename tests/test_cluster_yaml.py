"""cluster.yaml validates offline against the launcher schema shipped in the ray wheel."""
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_is_valid_for_the_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    cfg = prepare_config(raw)
    validate_config(cfg)  # raises on unknown keys or a bad head_node_type
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert any(v["node_config"]["InstanceType"].startswith(("g", "p")) for v in workers.values()), "no GPU worker type"


def test_cluster_yaml_installs_kdp_and_keeps_the_dashboard_local():
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    setup = " ".join(raw["setup_commands"])
    assert "requirements.lock" in setup and "kdp[ray]" in setup
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    text = CLUSTER_YAML.read_text().lower()
    assert not any(s in text for s in ("aws_access_key", "aws_secret", "secret_access", "password", "token:"))


def test_a_broken_cluster_yaml_is_rejected():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    raw["head_node_type"] = "no-such-node-type"
    # ray's own check after the schema (ray/autoscaler/_private/util.py: validate_config)
    with pytest.raises(ValueError, match="`head_node_type` must be one of `available_node_types`"):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("key,value,message", [
    ("no_such_key", 1, r"Additional properties are not allowed \('no_such_key' was unexpected\)"),
    ("max_workers", "many", "'many' is not of type 'integer'"),
])
def test_a_cluster_yaml_that_breaks_the_schema_is_rejected(key, value, message):
    jsonschema = pytest.importorskip("jsonschema")  # a dependency of ray[default]
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    raw[key] = value
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_config(prepare_config(raw))
