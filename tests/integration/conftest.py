"""Integration helpers: run a tick in-process, inject failures from the database side."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from flagsched import tick
from flagsched.db import Database
from flagsched.model import TickReport

FAILURE_TRIGGER = """
CREATE TABLE test_failing_flags (key text PRIMARY KEY, sleep_seconds float NOT NULL DEFAULT 0);
CREATE FUNCTION test_fail_flag() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE pause float;
BEGIN
    SELECT sleep_seconds INTO pause FROM test_failing_flags WHERE key = NEW.key;
    IF FOUND THEN
        IF pause > 0 THEN PERFORM pg_sleep(pause); RETURN NEW; END IF;
        RAISE EXCEPTION 'injected failure for %', NEW.key;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_fail_flag BEFORE UPDATE ON feature_flags
    FOR EACH ROW EXECUTE FUNCTION test_fail_flag();
"""


@pytest.fixture
def run_tick(database: Database) -> Callable[..., TickReport]:
    def run(**options: Any) -> TickReport:
        return tick.run(database, tick.TickOptions(**options), rng=random.Random(1))

    return run


@pytest.fixture
def failing(sql: Callable[..., list[Any]]) -> Callable[..., None]:
    """failing("k") makes updates of flag k raise; failing("k", sleep=5) makes them slow;
    failing("k", on=False) heals it."""
    sql(FAILURE_TRIGGER)

    def toggle(key: str, *, on: bool = True, sleep: float = 0) -> None:
        if on:
            sql(
                "INSERT INTO test_failing_flags VALUES (:k, :s) ON CONFLICT (key) DO UPDATE "
                "SET sleep_seconds = :s",
                k=key,
                s=sleep,
            )
        else:
            sql("DELETE FROM test_failing_flags WHERE key = :k", k=key)

    return toggle


@pytest.fixture
def schedule(sql: Callable[..., list[Any]]) -> Callable[[int], dict[str, Any]]:
    def get(schedule_id: int) -> dict[str, Any]:
        rows = sql(
            "SELECT *, next_retry_at - updated_at AS delay FROM feature_flag_schedules "
            "WHERE id = :i",
            i=schedule_id,
        )
        return dict(rows[0]._mapping)

    return get


@pytest.fixture
def flag(sql: Callable[..., list[Any]]) -> Callable[[str], tuple[bool, int]]:
    def get(key: str) -> tuple[bool, int]:
        rows = sql("SELECT enabled, rollout_percentage FROM feature_flags WHERE key = :k", k=key)
        return (rows[0][0], rows[0][1])

    return get
