"""Tests of the policy file: validation, defaults, matching (broker/policy.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.broker.policy import (
    DEFAULT_POLICY_YAML,
    FleetPolicy,
    GroupPolicy,
    HostFacts,
    IdleRule,
    default_policy,
    load_policy,
)
from gpufleet.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_policy(text, source="test.yaml")
    assert info.value.source == "test.yaml"
    return info.value.problems


def test_default_policy_only_notifies() -> None:
    policy = default_policy()
    assert policy.groups == ()
    assert policy.default.action == "notify"
    assert policy.group_for(HostFacts(host_id="any")).action == "notify"


def test_load_policy_fills_documented_defaults() -> None:
    policy = load_policy("fleet: lab\n")
    assert policy == FleetPolicy(fleet="lab")
    group = policy.default
    assert group.idle == IdleRule(0.05, 0.10, None, 300.0)
    assert (group.grace_window_s, group.warn_before_s) == (1800.0, 300.0)
    assert (group.debounce_observations, group.kill_timeout_s) == (3, 30.0)
    assert (group.action, group.dry_run, policy.stale_after_s) == (
        "notify",
        False,
        30.0,
    )


def test_example_policy_loads_and_round_trips_through_yaml() -> None:
    text = (REPO / "examples" / "policy.yaml").read_text()
    policy = load_policy(text, source="examples/policy.yaml")
    assert [g.name for g in policy.groups] == ["spot-a10g", "onprem", "gcp-trial"]
    assert load_policy(policy.to_yaml()) == policy
    assert load_policy(DEFAULT_POLICY_YAML) == load_policy(default_policy().to_yaml())


def test_group_inherits_omitted_fields_from_default_section() -> None:
    policy = load_policy(
        """
max_sample_gap_s: 120
default:
  grace_window_s: 600
  idle: {max_activity_ratio: 0.0}
  exempt: {hosts: [keep-*], process_names: [jupyter-lab]}
groups:
  - name: a
    idle: {max_processes: 0}
    exempt: {hosts: [other]}
"""
    )
    (group,) = policy.groups
    assert group.grace_window_s == 600.0
    assert group.idle == IdleRule(
        max_activity_ratio=0.0, max_processes=0, max_sample_gap_s=120.0
    )
    assert group.exempt.hosts == ("other",)
    assert group.exempt.process_names == ("jupyter-lab",)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (
            HostFacts(
                "i-1", "aws", instance_type="g5.xlarge", labels={"team": "vision"}
            ),
            "spot-a10g",
        ),
        (HostFacts("i-2", "aws", instance_type="p4d.24xlarge"), "aws-any"),
        (HostFacts("gpu-a07", "", labels={"team": "vision"}), "onprem"),
        (HostFacts("i-3", "gcp", region="us-central1"), "default"),
    ],
    ids=["first-match", "second-match", "host-glob", "fallback"],
)
def test_group_for_first_matching_group_wins(host: HostFacts, expected: str) -> None:
    policy = load_policy(
        """
groups:
  - name: spot-a10g
    match: {provider: aws, instance_types: ["g5.*"], labels: {team: vis*}}
  - name: aws-any
    match: {provider: aws}
  - name: onprem
    match: {hosts: ["gpu-a*"], provider: ""}
"""
    )
    assert policy.group_for(host).name == expected


def test_load_policy_lists_every_problem_with_its_field_path() -> None:
    problems = problems_of(
        """
fleet: demo
stale_after_s: 0
groups:
  - name: a
    grace_windw_s: 3
    grace_window_s: -5
    idle: {max_activity_ratio: 2, max_processes: -1}
    exempt:
      labels: {keep: true}
      windows: [{days: [mon, funday], start: "9:00", end: "18:00", tz: Mars/Base}]
  - match: {provider: 3, spot: maybe}
    action: nuke
    debounce_observations: 0
    dry_run: "no"
  - name: a
default: {kill_timeout_s: false}
colour: blue
"""
    )
    assert problems == [
        "colour: unknown field; expected one of fleet, groups, default, "
        "stale_after_s, max_sample_gap_s",
        "stale_after_s: must be a number > 0, got 0",
        "default.kill_timeout_s: must be a number > 0, got False",
        "groups[0].grace_windw_s: unknown field; did you mean grace_window_s?",
        "groups[0].grace_window_s: must be a number > 0, got -5",
        "groups[0].idle.max_processes: must be a whole number >= 0, got -1",
        "groups[0].idle.max_activity_ratio: must be a ratio between 0 and 1, got 2",
        "groups[0].exempt.windows[0].days: each day must be one of mon, tue, wed, "
        "thu, fri, sat, sun, got 'funday'",
        "groups[0].exempt.windows[0].start: must be \"HH:MM\" (quoted), got '9:00'",
        "groups[0].exempt.windows[0].tz: must be an IANA time zone such as UTC, "
        "got 'Mars/Base'",
        "groups[0].exempt.labels.keep: keys and values must be strings "
        '(quote values: "true"), got True',
        "groups[1].name: is required",
        "groups[1].action: must be one of notify, kill-processes, stop-instance, "
        "terminate-instance, got 'nuke'",
        "groups[1].match.provider: must be a string, got 3",
        "groups[1].match.spot: must be true or false, got 'maybe'",
        "groups[1].debounce_observations: must be a whole number >= 1 and <= 100, "
        "got 0",
        "groups[1].dry_run: must be true or false, got 'no'",
        "groups[2].name: duplicate group name 'a'",
    ]


def test_load_policy_problems_name_each_bad_field() -> None:
    problems = "\n".join(
        problems_of(
            """
groups:
  - name: a
    grace_window_s: 100
    warn_before_s: 200
default: {idle: {max_mem_util_ratio: -0.1}}
max_sample_gap_s: .nan
"""
        )
    )
    assert "groups[0].warn_before_s: must be <= grace_window_s (100), got 200" in (
        problems
    )
    assert "default.idle.max_mem_util_ratio: must be a ratio between 0 and 1" in (
        problems
    )
    assert "max_sample_gap_s: must be a number > 0, got nan" in problems


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "document is empty: expected a mapping with fleet and default"),
        ("- a\n- b\n", "document: must be a mapping, got ['a', 'b']"),
        ("fleet: [\n", "yaml: line 2, column 1: expected the node content"),
        ("fleet: a\nfleet: b\n", "yaml: line 2, column 1: duplicate key 'fleet'"),
        ("groups: {name: a}\n", "groups: must be a list of groups, got {'name': 'a'}"),
        ("groups: [3]\n", "groups[0]: must be a mapping, got 3"),
    ],
    ids=["empty", "not-mapping", "bad-yaml", "duplicate-key", "groups-map", "group"],
)
def test_load_policy_malformed_document_is_refused(text: str, problem: str) -> None:
    problems = problems_of(text)
    assert problems[0].startswith(problem), problems


def test_config_error_message_carries_every_problem_and_a_hint() -> None:
    with pytest.raises(ConfigError) as info:
        load_policy("fleet: 3\nstale_after_s: -1\n", source="/etc/gpufleet/policy.yaml")
    message = str(info.value)
    assert message.startswith("invalid /etc/gpufleet/policy.yaml:")
    assert "fleet: must be a non-empty string, got 3" in message
    assert "stale_after_s: must be a number > 0, got -1" in message
    assert info.value.hint is not None
    assert "docs/policy.md" in info.value.hint


def test_group_needs_processes_when_rule_exemption_or_action_reads_them() -> None:
    assert not GroupPolicy().needs_processes
    assert GroupPolicy(idle=IdleRule(max_processes=0)).needs_processes
    assert GroupPolicy(action="kill-processes").needs_processes


def test_policy_alias_bomb_is_refused_fast() -> None:
    import time

    from gpufleet.broker.policy import load_policy
    from gpufleet.errors import ConfigError

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    lines.append("default: {action: *i}")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="aliases"):
        load_policy("\n".join(lines))
    assert time.monotonic() - started < 1.0
