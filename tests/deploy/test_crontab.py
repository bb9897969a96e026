"""deploy/crontab: an /etc/cron.d file whose one job line parses, runs `flagsched process`
every minute with valid options, and, run by sh as cron would, ticks and writes metrics."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import DEPLOY, parse_flagsched_args, tool

CRONTAB = DEPLOY / "crontab"
# minute, hour, day of month, month, day of week (numbers only: no names are used)
RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
FLAGSCHED = "/opt/flagsched/bin/flagsched"
ENV_FILE = "/etc/flagsched/env"
LOGGER = "logger --size 8192 -t flagsched"


@dataclass
class Job:
    times: list[str]
    user: str
    command: str


def read_crontab(text: str) -> tuple[dict[str, str], list[Job]]:
    """Variables and jobs of a cron.d file (the format with a user field)."""
    variables: dict[str, str] = {}
    jobs: list[Job] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assignment = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", line.strip())
        if assignment:
            name, value = assignment.groups()
            variables[name] = value.strip('"')
            continue
        fields = line.split(None, 6)
        assert len(fields) == 7, f"not a cron.d job line: {line!r}"
        jobs.append(Job(fields[:5], fields[5], fields[6]))
    return variables, jobs


def valid_field(field: str, low: int, high: int) -> bool:
    """One cron time field: lists of *, N, N-M, each with an optional /STEP."""
    for part in field.split(","):
        match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
        if not match:
            return False
        _, start, end, step = match.groups()
        numbers = [int(n) for n in (start, end) if n is not None]
        if any(not low <= n <= high for n in numbers) or numbers != sorted(numbers):
            return False
        if step is not None and int(step) == 0:
            return False
    return True


def the_job() -> tuple[dict[str, str], Job]:
    text = CRONTAB.read_text()
    assert text.endswith("\n")  # cron ignores a last line without one
    variables, jobs = read_crontab(text)
    (job,) = jobs
    return variables, job


def test_the_field_parser_rejects_what_cron_rejects() -> None:
    assert valid_field("*/5", 0, 59) and valid_field("1,2,10-20/2", 0, 59)
    for bad in ("60", "5-1", "*/0", "a", "", "1-"):
        assert not valid_field(bad, 0, 59), bad


def test_every_minute_as_an_unprivileged_user() -> None:
    variables, job = the_job()
    assert all(valid_field(f, lo, hi) for f, (lo, hi) in zip(job.times, RANGES, strict=True))
    assert job.times == ["*"] * 5
    assert job.user == "flagsched"
    assert variables["SHELL"] == "/bin/sh"
    assert variables["MAILTO"] == ""
    assert "%" not in job.command  # cron would turn it into a newline


def test_the_command_is_valid_sh_and_a_valid_flagsched_process() -> None:
    _, job = the_job()
    checked = subprocess.run(["sh", "-n", "-c", job.command], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert f". {ENV_FILE};" in job.command
    assert job.command.endswith(f"2>&1 | {LOGGER}")
    match = re.search(rf"{re.escape(FLAGSCHED)} ([^;|]*);", job.command)
    assert match, job.command
    args = shlex.split(match.group(1))
    assert args[0] == "process"
    parse_flagsched_args(args)
    metrics = Path(args[args.index("--metrics-file") + 1])
    assert metrics.suffix == ".prom"  # the only files the textfile collector reads


@pytest.fixture
def run_job(tmp_path: Path) -> Callable[[str | None], tuple[int, str, Path]]:
    """Run the job's command with sh as cron would (only the crontab's variables), with the
    host paths moved into tmp_path and `logger` replaced by a file; `env` None: no env file."""

    def run(env: str | None) -> tuple[int, str, Path]:
        variables, job = the_job()
        env_file, log, metrics = tmp_path / "env", tmp_path / "log", tmp_path / "flagsched.prom"
        if env is not None:
            env_file.write_text(env)
        command = (
            job.command.replace(ENV_FILE, str(env_file))
            .replace(FLAGSCHED, tool("flagsched"))
            .replace("/var/lib/prometheus/node-exporter/flagsched.prom", str(metrics))
            .replace(LOGGER, f"cat > {log}")
        )
        done = subprocess.run(
            [variables["SHELL"], "-c", command],
            env={k: variables[k] for k in ("PATH", "SHELL")},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return done.returncode, log.read_text(), metrics

    return run


def test_the_job_ticks_and_writes_metrics(
    run_job: Callable[[str | None], tuple[int, str, Path]],
    database_url: str,
    add_flag: Any,
    add_schedule: Any,
    sql: Callable[..., list[Any]],
) -> None:
    add_flag("a")
    schedule_id = add_schedule("a", {"enabled": True})
    quoted = shlex.quote(database_url)
    code, log, metrics = run_job(f"FLAGSCHED_DATABASE_URL={quoted}\nFLAGSCHED_LOG_FORMAT=json\n")
    assert code == 0, log
    events = [json.loads(line)["event"] for line in log.splitlines()]
    assert events == ["schedule_applied", "tick_finished"]
    status = sql("SELECT status FROM feature_flag_schedules WHERE id = :i", i=schedule_id)
    assert status[0][0] == "applied"
    assert "flagsched_last_success_timestamp_seconds" in metrics.read_text()


def test_a_missing_env_file_stops_the_run_and_is_logged(
    run_job: Callable[[str | None], tuple[int, str, Path]],
) -> None:
    _, log, metrics = run_job(None)
    assert "No such file" in log, log  # from sh, before any tick
    assert not metrics.exists()


def test_the_ping_option_shown_in_the_comments_parses() -> None:
    """The crontab documents --ping-url / FLAGSCHED_PING_URL; the option is a real one."""
    text = CRONTAB.read_text()
    assert "FLAGSCHED_PING_URL=" in text and "--ping-url URL" in text
    _, job = the_job()
    match = re.search(rf"{re.escape(FLAGSCHED)} ([^;|]*);", job.command)
    assert match
    parse_flagsched_args([*shlex.split(match.group(1)), "--ping-url", "https://hc-ping.com/x"])
