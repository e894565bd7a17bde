"""deploy/prometheus: the alerting and recording rules, checked and unit-tested by promtool.

promtool (Debian's ``prometheus`` package) runs ``check rules`` and ``test
rules`` on deploy/prometheus/tests/*.yml; a failure shows promtool's output.
The rules may use only metrics the sidecar exports (docs/metrics-reference.md,
plus the event-loop lag gauge), every alert has what an operator needs
(``for:``, a severity, a summary and a description), and the unit tests show
each alert both firing and staying silent, and every recorded series.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.exported import (
    EVENT_LOOP_LAG,
    reference_metrics,
    series_names,
    used_metric_names,
)
from tests.support.sidecar import REPO_ROOT

PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
RECORDING = PROMETHEUS / "recording.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
SEVERITIES = {"critical", "warning"}

INSTALL_HINT = (
    "promtool is not installed: it comes with Debian's prometheus package "
    "(`scripts/setup-env --system`, or `apt-get install prometheus`)."
)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return subprocess.run(
        [binary, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def rule_tests() -> list[dict[str, Any]]:
    return [test for file in RULE_TESTS for test in yaml.safe_load(file.read_text())["tests"]]


def test_promtool_checks_the_rules_and_the_prometheus_config() -> None:
    checked = promtool("check", "rules", ALERTS, RECORDING)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    # prometheus.yml loads both rule files (paths relative to it).
    config = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    for path in (ALERTS, RECORDING):
        assert f"SUCCESS: {len(rules(path))} rules found" in config.stdout, config.stdout


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool unit tests in deploy/prometheus/tests"
    result = promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The tests catch a rule that fires later than it should (so they test something)."""
    (tmp_path / "tests").mkdir()
    slow = ALERTS.read_text().replace("for: 2m", "for: 30m")
    assert slow != ALERTS.read_text()
    (tmp_path / ALERTS.name).write_text(slow)
    test_file = PROMETHEUS / "tests" / "alerts_test.yml"
    shutil.copyfile(test_file, tmp_path / "tests" / test_file.name)
    result = promtool("test", "rules", tmp_path / "tests" / test_file.name)
    assert result.returncode != 0, result.stdout
    assert "ThriftSidecarBreakerOpen" in result.stdout + result.stderr


def test_rules_use_only_exported_metrics() -> None:
    exported = series_names(reference_metrics()) | {EVENT_LOOP_LAG}
    used = {
        name
        for path in (ALERTS, RECORDING)
        for r in rules(path)
        for name in used_metric_names(r["expr"])
    }
    assert EVENT_LOOP_LAG in used
    assert {"thrift_sidecar_breaker_state", "thrift_sidecar_state_backend_up"} <= used
    assert not used - exported, f"not exported: {sorted(used - exported)}"
    # The unit tests' synthetic series carry real names too.
    series = {
        name
        for test in rule_tests()
        for item in test.get("input_series", [])
        for name in used_metric_names(item["series"])
    }
    assert not series - exported, f"not exported: {sorted(series - exported)}"
    # The check can fail: a name that is not in the reference is caught.
    assert "thrift_sidecar_no_such_total" not in exported


def test_every_alert_tells_an_operator_what_to_do() -> None:
    alerts = rules(ALERTS)
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    for alert in alerts:
        name = alert["alert"]
        assert alert.get("for"), f"{name}: no `for:` (it would fire on one bad sample)"
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert annotations["summary"].strip(), name
        # A description says what is wrong and what to check or change.
        assert len(annotations["description"].split()) >= 30, name


def test_unit_tests_show_every_alert_firing_and_silent() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for test in rule_tests():
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = {a["alert"] for a in rules(ALERTS)}
    assert alerts <= fired, f"never shown firing: {sorted(alerts - fired)}"
    assert alerts <= silent, f"never shown silent: {sorted(alerts - silent)}"


def test_unit_tests_cover_every_recorded_series() -> None:
    tested = {
        name
        for test in rule_tests()
        for case in test.get("promql_expr_test", [])
        for name in [case["expr"].split("{")[0].strip()]
    }
    recorded = {r["record"] for r in rules(RECORDING)}
    assert recorded <= tested, f"not tested: {sorted(recorded - tested)}"
