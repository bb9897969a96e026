"""deploy/kubernetes/: `kubernetes-validate --strict` against bundled schemas (offline), and
the choices docs/deploy.md promises, which a schema cannot check."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import DEPLOY, parse_flagsched_args, tool

MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
KUBERNETES = "1.30.0"  # the oldest minor still supported upstream that the package bundles


def validate(path: Path) -> tuple[int, list[str]]:
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).splitlines()


def load(name: str) -> dict[str, Any]:
    (document,) = yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text())
    assert isinstance(document, dict)
    return document


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    job = resource["spec"]["jobTemplate"] if resource["kind"] == "CronJob" else resource
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def test_the_manifests_are_the_two_documented_ones() -> None:
    assert [p.name for p in MANIFESTS] == ["cronjob.yaml", "migrate-job.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_strict_schema_validation(path: Path) -> None:
    code, lines = validate(path)
    assert code == 0, lines
    # An unknown kind or apiVersion is only a WARN with exit 0: demand a pass per resource.
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len([line for line in lines if line.startswith("INFO ") and "passed" in line]) == len(
        documents
    ), lines
    assert not [line for line in lines if not line.startswith("INFO ")], lines


def test_strict_validation_does_reject_an_unknown_field(tmp_path: Path) -> None:
    broken = tmp_path / "cronjob.yaml"
    text = (DEPLOY / "kubernetes" / "cronjob.yaml").read_text()
    broken.write_text(text.replace("concurrencyPolicy:", "concurrencyPolcy:"))
    code, lines = validate(broken)
    assert code == 1
    assert any("concurrencyPolcy" in line for line in lines), lines


def test_cronjob_ticks_every_minute_and_never_outlives_the_minute() -> None:
    cron = load("cronjob.yaml")
    spec = cron["spec"]
    assert spec["schedule"] == "* * * * *"
    assert spec["concurrencyPolicy"] in ("Forbid", "Allow")  # overlap is safe either way
    assert 10 <= spec["startingDeadlineSeconds"] < 60
    assert spec["successfulJobsHistoryLimit"] >= 1
    assert spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    pod = pod_spec(cron)
    # SIGTERM at the deadline, SIGKILL after the grace period: both within the interval.
    assert job["activeDeadlineSeconds"] + pod["terminationGracePeriodSeconds"] <= 60
    assert pod["restartPolicy"] == "Never"


@pytest.mark.parametrize("name", ["cronjob.yaml", "migrate-job.yaml"])
def test_pods_run_locked_down_with_the_url_from_a_secret(name: str) -> None:
    pod = pod_spec(load(name))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    env = {e["name"]: e for e in container["env"]}
    ref = env["FLAGSCHED_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "url"
    assert "value" not in env["FLAGSCHED_DATABASE_URL"]


def test_migrate_uses_its_own_secret_and_the_tick_the_least_privilege_one() -> None:
    def secret(name: str) -> str:
        (container,) = pod_spec(load(name))["containers"]
        env = {e["name"]: e for e in container["env"]}
        value: str = env["FLAGSCHED_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"]
        return value

    assert secret("cronjob.yaml") == "flagsched-db"
    assert secret("migrate-job.yaml") == "flagsched-migrate-db"
    docs = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    assert "flagsched-db" in docs and "flagsched-migrate-db" in docs


@pytest.mark.parametrize(
    ("name", "command"), [("cronjob.yaml", "process"), ("migrate-job.yaml", "migrate")]
)
def test_the_args_are_a_valid_flagsched_command_line(name: str, command: str) -> None:
    (container,) = pod_spec(load(name))["containers"]
    assert "command" not in container  # the image's entrypoint is flagsched
    args = container["args"]
    assert args[0] == command
    parse_flagsched_args(args)


def test_the_tick_may_ping_a_monitor_whose_url_stays_in_an_optional_secret() -> None:
    (container,) = pod_spec(load("cronjob.yaml"))["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["FLAGSCHED_PING_URL"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"], ref["optional"]) == ("flagsched-ping", "url", True)
    assert "value" not in env["FLAGSCHED_PING_URL"]
