"""deploy/prometheus/: the alert rules pass `promtool check rules`, and the unit tests in
tests/deploy/flagsched-alerts.test.yml (each alert firing and quiet) pass `promtool test
rules`. promtool comes with Debian's `prometheus` package (.ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require
from tests.deploy import DEPLOY, REPO
from tests.test_links import anchors

RULES = DEPLOY / "prometheus" / "flagsched-alerts.yml"
UNIT_TESTS = Path(__file__).with_name("flagsched-alerts.test.yml")


@pytest.fixture(scope="module")
def promtool() -> str:
    return require("prometheus", shutil.which("promtool"))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def _alerts() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    return rules


def test_promtool_check_rules(promtool: str) -> None:
    done = _run(promtool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_promtool_test_rules(promtool: str) -> None:
    done = _run(promtool, "test", "rules", str(UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_test_rules_does_fail_a_wrong_expectation(promtool: str, tmp_path: Path) -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(RULES)]
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            check["exp_alerts"] = [] if check["exp_alerts"] else [{"exp_labels": {}}]
    broken = tmp_path / "broken.test.yml"
    broken.write_text(yaml.safe_dump(tests))
    assert _run(promtool, "test", "rules", str(broken)).returncode != 0


def test_every_alert_is_tested_firing_and_quiet() -> None:
    checks = [
        check
        for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for check in case["alert_rule_test"]
    ]
    for alert in (rule["alert"] for rule in _alerts()):
        mine = [c for c in checks if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert} is never tested firing"
        assert any(not c["exp_alerts"] for c in mine), f"{alert} is never tested quiet"


def test_each_alert_has_a_summary_a_severity_and_a_runbook_that_exists() -> None:
    for rule in _alerts():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].startswith("flagsched: "), rule["alert"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor in anchors(REPO / page), f"{rule['alert']}: no #{anchor} in {page}"


def test_docs_point_to_the_file_instead_of_inlining_the_rules() -> None:
    deploy = (REPO / "docs" / "deploy.md").read_text()
    assert "deploy/prometheus/flagsched-alerts.yml" in deploy
    assert "expr:" not in deploy
