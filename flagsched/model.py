"""Plain data: statuses, validated updates, claimed schedules, outcomes and reports. No I/O."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"
    CANCELLED = "cancelled"


class OnConflict(StrEnum):
    """What the tick does with a schedule whose flag someone else changed since (SPEC Safety)."""

    FAIL = "fail"
    APPLY = "apply"


class InvalidUpdates(ValueError):
    """`updates` is not an object with enabled (boolean) and/or rollout_percentage (0..100)."""


ALLOWED_KEYS = ("enabled", "rollout_percentage")


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored JSON value the client could not read (e.g. nested thousands of levels deep):
    it stands in for the value, so one such row fails for good instead of stopping a tick."""

    reason: str

    def __str__(self) -> str:
        return f"(unreadable JSON: {self.reason})"


@dataclass(frozen=True, slots=True)
class Updates:
    """A validated change: None means "leave as it is"."""

    enabled: bool | None = None
    rollout_percentage: int | None = None

    @classmethod
    def parse(cls, value: object) -> Updates:
        """Strict validation of a schedule's `updates`; no lax coercion ("yes", 12.5, "50")."""
        if isinstance(value, Unreadable):
            raise InvalidUpdates(f"updates could not be read: {value.reason}")
        if not isinstance(value, dict):
            raise InvalidUpdates(f"updates must be a JSON object, got {_json_type(value)}")
        unknown = sorted(str(k) for k in value if k not in ALLOWED_KEYS)
        if unknown:
            raise InvalidUpdates(
                f"updates has unknown key(s) {', '.join(unknown)}; "
                "allowed: enabled, rollout_percentage"
            )
        if not value:
            raise InvalidUpdates("updates is empty; give enabled and/or rollout_percentage")
        enabled = value.get("enabled")
        if "enabled" in value and not isinstance(enabled, bool):
            raise InvalidUpdates(f"enabled must be true or false, got {_show(enabled)}")
        rollout = value.get("rollout_percentage")
        if "rollout_percentage" in value and (
            isinstance(rollout, bool) or not isinstance(rollout, int) or not 0 <= rollout <= 100
        ):
            raise InvalidUpdates(
                f"rollout_percentage must be an integer 0..100, got {_show(rollout)}"
            )
        return cls(enabled=enabled, rollout_percentage=rollout)

    def then(self, later: Updates) -> Updates:
        """This change followed by `later`: later values win, unset ones keep ours."""
        return Updates(
            enabled=self.enabled if later.enabled is None else later.enabled,
            rollout_percentage=(
                self.rollout_percentage
                if later.rollout_percentage is None
                else later.rollout_percentage
            ),
        )

    def as_json(self) -> dict[str, Any]:
        return {k: v for k in ALLOWED_KEYS if (v := getattr(self, k)) is not None}


def _json_type(value: object) -> str:
    names = {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def parse_when(text: str) -> datetime | None:
    """`--at`: ISO 8601 with an offset, or "now" (None: the database's now())."""
    if text.strip().lower() == "now":
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 time (e.g. 2026-12-01T09:00:00+01:00)"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{text!r} has no UTC offset; add one (e.g. +00:00 or Z)")
    return value


@dataclass(frozen=True, slots=True)
class Claimed:
    """A schedule claimed by a tick, with what the claim learned about its flag."""

    id: int
    flag_key: str
    scheduled_at: datetime
    updates: object
    status: str
    retry_count: int
    max_retries: int
    next_retry_at: datetime | None
    blocked: bool  # an earlier schedule of the flag, outside this claim, is still open


class Outcome(StrEnum):
    APPLIED = "applied"
    RETRY = "retry"
    FAILED = "failed"
    HELD_BACK = "held_back"


@dataclass(frozen=True, slots=True)
class Result:
    """What happened to one claimed schedule in this tick."""

    schedule: Claimed
    outcome: Outcome
    error: str | None = None
    next_retry_at: datetime | None = None
    max_retries: int | None = None  # the limit used when a failure was recorded


@dataclass(slots=True)
class TickReport:
    """Counts per outcome over every batch of one `flagsched process` run."""

    counts: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    duration_seconds: float = 0.0
    interrupted_by: int | None = None  # signal number
    due_backlog: int | None = None  # due schedules left when the tick ended
    oldest_due_age_seconds: float | None = None

    def add(self, results: list[Result]) -> None:
        self.batches += 1
        self.counts.update(r.outcome.value for r in results)

    def count(self, outcome: Outcome) -> int:
        return self.counts.get(outcome.value, 0)
