"""Configuration files: every problem reported at once, each naming its field."""

from pathlib import Path

import pytest

from gpufleet.agent.config import load_agent_config
from gpufleet.broker.config import load_broker_config
from gpufleet.errors import ConfigError


def test_agent_config_reports_type_unknown_and_range_problems_together(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "buffer_max_samples: lots\ninterval_s: 0\ntls: {ca: /x}\nreplay: {speedx: 2}\n"
        "identity: {metadata_total_timeout_s: 0}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    problems = "\n".join(info.value.problems)
    assert "buffer_max_samples: must be an integer, got 'lots'" in problems
    assert "interval_s: must be a number > 0" in problems
    assert "tls: set ca, cert and key together" in problems
    assert "replay.speedx: unknown field; did you mean replay.speedup?" in problems
    assert "identity.metadata_total_timeout_s: must be a number of seconds" in problems


def test_agent_config_environment_overrides_nested_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUFLEET_AGENT_IDENTITY__PROVIDER", "aws")
    monkeypatch.setenv("GPUFLEET_AGENT_INTERVAL_S", "2.5")
    monkeypatch.setenv("GPUFLEET_AGENT_CONFIG", str(tmp_path / "ignored.yaml"))
    cfg = load_agent_config(None)
    assert cfg.identity.provider == "aws"
    assert cfg.interval_s == 2.5


def test_agent_config_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_agent_config(path)


def test_broker_config_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_broker_config(None, {"policy_file": tmp_path / "nope.yaml"})
    assert any("policy_file: no such file" in p for p in info.value.problems)


def test_broker_provisioning_needs_the_market_and_a_cloud_to_launch_in(
    tmp_path: Path,
) -> None:
    """Provisioning without a cloud to launch in is refused at start, and a
    mistyped market field is reported as such, not as 'market is off'."""
    path = tmp_path / "broker.yaml"
    path.write_text(
        "market: {enabled: true}\n"
        "provisioning: {enabled: true, broker_address: 'broker.lab:50051'}\n"
    )
    with pytest.raises(ConfigError, match="no cloud can launch"):
        load_broker_config(path)
    path.write_text(
        "market: {enabled: true, aws: {instance_type: [g5.xlarge]}}\n"
        "provisioning: {enabled: true, broker_address: 'broker.lab:50051',"
        " aws: {images: {us-east-1: ami-1}}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_broker_config(path)
    text = str(caught.value)
    assert "instance_types" in text
    assert "needs the market catalog" not in text


def test_broker_config_refuses_fractional_and_infinite_counts_and_empty_map_values(
    tmp_path: Path,
) -> None:
    path = tmp_path / "broker.yaml"
    path.write_text(
        "provisioning:\n"
        "  max_instances: .inf\n"
        "  aws:\n"
        "    disk_gb: 5.7\n"
        "    images: {us-east-1: }\n"
    )
    with pytest.raises(ConfigError) as info:
        load_broker_config(path)
    problems = "\n".join(info.value.problems)
    assert "provisioning.max_instances: must be an integer, got inf" in problems
    assert "provisioning.aws.disk_gb: must be an integer, got 5.7" in problems
    assert "provisioning.aws.images.us-east-1: must be a text value, got nothing" in (
        problems
    )
