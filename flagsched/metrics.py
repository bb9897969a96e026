"""Prometheus metrics of a run: a textfile for node_exporter, or a push to a Pushgateway."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import (
    basic_auth_handler,
    default_handler,
    generate_latest,
    pushadd_to_gateway,
)
from prometheus_client.parser import text_string_to_metric_families

from flagsched.logs import get_logger
from flagsched.model import Outcome, TickReport
from flagsched.render import write_atomically
from flagsched.urls import credentials, one_line

LAST_SUCCESS = "flagsched_last_success_timestamp_seconds"
JOB = "flagsched"


def registry_for(
    report: TickReport | None, *, now: float, last_success: float | None
) -> CollectorRegistry:
    """The run's metrics. `report` None: the run could not tick, so only the run time moves and
    the last success is carried over (when known)."""
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, registry=registry).set(value)

    gauge("flagsched_last_run_timestamp_seconds", "When flagsched process last ran.", now)
    if report is not None:
        last_success = now
    if last_success is not None:
        gauge(
            LAST_SUCCESS,
            "When a tick last ran to completion (could reach its database).",
            last_success,
        )
    if report is None:
        return registry
    gauge("flagsched_tick_duration_seconds", "Duration of the last tick.", report.duration_seconds)
    outcomes = Gauge(
        "flagsched_tick_schedules",
        "Schedules per outcome in the last tick.",
        ["outcome"],
        registry=registry,
    )
    for outcome in Outcome:
        outcomes.labels(outcome=outcome.value).set(report.count(outcome))
    if report.due_backlog is not None:
        gauge(
            "flagsched_due_backlog",
            "Schedules due (or held back) when the tick ended.",
            report.due_backlog,
        )
        gauge(
            "flagsched_oldest_due_age_seconds",
            "Age of the oldest due schedule at the end.",
            report.oldest_due_age_seconds or 0.0,
        )
    if report.awaiting_approval is not None:
        gauge(
            "flagsched_awaiting_approval",
            "Due schedules waiting for a second person's approval when the tick ended.",
            report.awaiting_approval,
        )
        gauge(
            "flagsched_oldest_awaiting_approval_seconds",
            "How long the oldest due schedule awaiting approval has waited (0: none).",
            report.oldest_awaiting_approval_seconds or 0.0,
        )
    return registry


def previous_success(path: Path) -> tuple[float | None, str | None]:
    """(the last success recorded in an existing metrics file, why the file could not be
    read): a missing file is (None, None); an unreadable or corrupt one is (None, reason),
    and the run replaces it with a fresh one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        return None, f"{type(exc).__name__}: {exc}"
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == LAST_SUCCESS:
                    value = float(sample.value)
                    if not math.isfinite(value):
                        return None, f"{LAST_SUCCESS} is {value}"
                    return value, None
    except ValueError as exc:
        return None, f"not Prometheus text format ({exc})"
    return None, None


def publish(
    report: TickReport | None,
    *,
    metrics_file: Path | None,
    pushgateway: str | None,
    now: float | None = None,
) -> None:
    """Write the textfile atomically (temp file, then rename) and/or push-add to a gateway;
    push-add leaves the gateway's last success in place when this run could not tick."""
    now = time.time() if now is None else now
    if metrics_file is not None:
        carried, problem = previous_success(metrics_file)
        if problem is not None:  # once: the fresh file written now reads back next run
            get_logger().warning(
                "metrics_file_replaced", path=str(metrics_file), reason=one_line(problem)
            )
        registry = registry_for(report, now=now, last_success=carried)
        write_atomically(metrics_file, generate_latest(registry))
    if pushgateway:
        # user info in the URL is sent as basic auth (urllib would read it as part of the host)
        gateway, login = credentials(pushgateway)
        pushadd_to_gateway(
            gateway,
            job=JOB,
            registry=registry_for(report, now=now, last_success=None),
            timeout=10,
            handler=default_handler if login is None else _basic_auth(*login),
        )


def _basic_auth(user: str, password: str) -> Callable[..., Callable[[], None]]:
    """prometheus_client's handler that sends `user` and `password` as basic auth."""

    def handler(
        url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes
    ) -> Callable[[], None]:
        return basic_auth_handler(url, method, timeout, headers, data, user, password)

    return handler
