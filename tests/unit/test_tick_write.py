"""The pure parts of the tick, without a database: the plan of a batch, the verdict mapping,
the failure decision, and the write's one mechanism and one fallback against a fake
repository (how many savepoints a failing flag costs)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flagsched import repository, tick
from flagsched.errors import StatementFailed
from flagsched.model import Change, Claimed, Outcome, Updates, Verdict

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def claimed(
    i: int,
    key: str = "f",
    *,
    updates: object = None,
    blocked: bool = False,
    defect: str | None = None,
    retry_count: int = 0,
    max_retries: int = 3,
) -> Claimed:
    return Claimed(
        id=i,
        flag_key=key,
        scheduled_at=NOW - timedelta(minutes=10 - i % 10),
        updates={"enabled": True} if updates is None else updates,
        status="pending",
        retry_count=retry_count,
        max_retries=max_retries,
        next_retry_at=None,
        blocked=blocked,
        defect=defect,
    )


def failures(**options: Any) -> tick._Failures:
    return tick._Failures(NOW, tick.TickOptions(**options), random.Random(0))


# -- the plan -----------------------------------------------------------------------------


def test_the_plan_decides_defects_held_back_and_invalid_updates_and_groups_the_rest() -> None:
    batch = [
        claimed(1, "a"),
        claimed(2, "a", updates={"rollout_percentage": 50}),
        claimed(3, "b", defect="scheduled_at infinity is outside the years 1..9999"),
        claimed(4, "c", blocked=True),
        claimed(5, "d", updates={"enabled": "yes"}),
        claimed(6, "d"),
    ]
    decided, steps = tick._plan(batch, failures())
    by_id = {r.schedule.id: r for r in decided}
    assert by_id[3].outcome is Outcome.FAILED and "outside the years" in (by_id[3].error or "")
    assert by_id[4].outcome is Outcome.HELD_BACK and by_id[4].error is None
    assert by_id[5].outcome is Outcome.FAILED and "true or false" in (by_id[5].error or "")
    assert {k: [s.id for s, _ in v] for k, v in steps.items()} == {"a": [1, 2], "d": [6]}
    assert steps["a"][1][1] == Updates(rollout_percentage=50)


def test_a_defect_fails_for_good_even_when_held_back() -> None:
    decided, steps = tick._plan([claimed(1, defect="too large", blocked=True)], failures())
    assert [r.outcome for r in decided] == [Outcome.FAILED] and steps == {}


# -- the verdict mapping ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdict", "error", "outcome", "shown"),
    [
        (None, None, Outcome.APPLIED, None),
        (Verdict.HELD_BACK, None, Outcome.HELD_BACK, None),
        (Verdict.BUSY, None, Outcome.HELD_BACK, "its flag is held"),
        (Verdict.NOT_ATTEMPTED, "the tick was stopped", Outcome.HELD_BACK, "the tick was stopped"),
        (Verdict.MISSING, None, Outcome.FAILED, "flag 'f' does not exist"),
        (Verdict.EXPIRED, "expired: 2 hours late", Outcome.FAILED, "expired: 2 hours late"),
        (Verdict.CONFLICT, "conflict: changed", Outcome.FAILED, "conflict: changed"),
        (Verdict.ERROR, "refused (SQLSTATE P0001)", Outcome.RETRY, "refused (SQLSTATE P0001)"),
    ],
)
def test_each_verdict_maps_to_one_outcome(
    verdict: Verdict | None, error: str | None, outcome: Outcome, shown: str | None
) -> None:
    result = tick._result(claimed(1), verdict, error, failures())
    assert result.outcome is outcome
    assert result.error == shown


def test_an_error_without_retries_left_fails_for_good() -> None:
    result = tick._result(claimed(1, retry_count=3), Verdict.ERROR, "boom", failures())
    assert result.outcome is Outcome.FAILED
    assert result.error == "boom (gave up after 4 attempts)"


def test_the_retry_limit_override_is_used_and_recorded() -> None:
    fail = failures(max_retries_override=0)
    assert not fail.would_retry(claimed(1))
    result = tick._result(claimed(1), Verdict.ERROR, "boom", fail)
    assert (result.outcome, result.max_retries) == (Outcome.FAILED, 0)


# -- the failure decision -----------------------------------------------------------------


def _changes(*stops: bool, key: str = "f") -> list[Change]:
    return [
        Change(claimed(i + 1, key), Updates(enabled=True), stop) for i, stop in enumerate(stops)
    ]


def test_a_failure_that_will_be_retried_holds_back_the_flags_later_changes() -> None:
    changes = _changes(True, True, False)
    decided = tick._after_failure(
        changes, [0, 1, 2], StatementFailed("refused", "P0001"), one_by_one=True
    )
    assert decided[0] == (Verdict.ERROR, "refused")
    assert {i: v for i, (v, _) in decided.items() if i} == {
        1: Verdict.NOT_ATTEMPTED,
        2: Verdict.NOT_ATTEMPTED,
    }
    assert "schedule 1 of this flag failed first" in (decided[1][1] or "")


def test_a_final_failure_lets_the_flags_later_changes_be_tried() -> None:
    changes = _changes(False, True)
    decided = tick._after_failure(
        changes, [0, 1], StatementFailed("refused", "P0001"), one_by_one=True
    )
    assert decided == {0: (Verdict.ERROR, "refused")}


def test_a_timeout_holds_back_whatever_the_failure() -> None:
    changes = _changes(False, False)
    decided = tick._after_failure(
        changes, [0, 1], StatementFailed("lock timeout", "55P03"), one_by_one=True
    )
    assert [v for v, _ in decided.values()] == [Verdict.ERROR, Verdict.NOT_ATTEMPTED]


# -- the write: one mechanism, one fallback -----------------------------------------------


class FakeDatabase:
    """repository.apply and repository.savepoint on flags, as flagsched_apply_v4 answers:
    `refused` keys fail their write (flag_failed, the others are written), `held` keys are
    busy to a statement that does not wait, `slow` keys time the whole statement out."""

    def __init__(
        self, refused: Iterable[str] = (), held: Iterable[str] = (), slow: Iterable[str] = ()
    ) -> None:
        self.refused, self.held, self.slow = set(refused), set(held), set(slow)
        self.savepoints = 0
        self.statements = 0
        self.written: list[int | str] = []

    @contextmanager
    def savepoint(self, conn: Any) -> Iterator[None]:
        self.savepoints += 1
        yield

    def apply(
        self,
        conn: Any,
        changes: Sequence[Change],
        *,
        wait: bool,
        max_lateness_seconds: float | None,
    ) -> dict[int, tuple[Verdict, str | None]]:
        self.statements += 1
        if any(c.schedule.flag_key in self.slow for c in changes):
            raise StatementFailed("canceling statement due to statement timeout", "57014")
        verdicts: dict[int, tuple[Verdict, str | None]] = {}
        for n, c in enumerate(changes):
            key = c.schedule.flag_key
            if key in self.held and not wait:
                verdicts[n] = (Verdict.BUSY, None)
            elif key in self.refused:
                verdicts[n] = (Verdict.FLAG_FAILED, f"refused {key} (SQLSTATE P0001)")
            else:
                self.written.append(c.schedule.id)
        return verdicts


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(**kwargs: Any) -> FakeDatabase:
        db = FakeDatabase(**kwargs)
        monkeypatch.setattr(repository, "apply", db.apply)
        monkeypatch.setattr(repository, "savepoint", db.savepoint)
        return db

    return install


def _batch(flags: int, per_flag: int = 1, stop: bool = True) -> list[Change]:
    return [
        Change(claimed(f * per_flag + n + 1, f"flag-{f:04}"), Updates(enabled=True), stop)
        for f in range(flags)
        for n in range(per_flag)
    ]


def test_a_batch_that_writes_costs_one_savepoint(fake: Any) -> None:
    db = fake()
    changes = _batch(1000)
    assert tick._write(None, changes, tick.StopFlag(), None, tick.HeldFlags()) == {}  # type: ignore[arg-type]
    assert db.savepoints == 1 and len(db.written) == 1000


def test_a_refused_flag_with_one_change_costs_no_second_statement(fake: Any) -> None:
    db = fake(refused={"flag-0617", "flag-0618"})
    changes = _batch(1000)
    verdicts = tick._write(None, changes, tick.StopFlag(), None, tick.HeldFlags())  # type: ignore[arg-type]
    assert verdicts == {
        617: (Verdict.ERROR, "refused flag-0617 (SQLSTATE P0001)"),
        618: (Verdict.ERROR, "refused flag-0618 (SQLSTATE P0001)"),
    }
    assert len(db.written) == 998
    assert (db.statements, db.savepoints) == (1, 1)


def test_a_failing_flags_changes_go_one_by_one_with_the_hold_back_rule(fake: Any) -> None:
    db = fake(refused={"flag-0001"})
    changes = _batch(3, per_flag=3, stop=False)  # final failures: the next one is tried
    verdicts = tick._write(None, changes, tick.StopFlag(), None, tick.HeldFlags())  # type: ignore[arg-type]
    assert sorted(verdicts) == [3, 4, 5]  # each tried alone, each refused
    assert sorted(db.written) == [1, 2, 3, 7, 8, 9]
    assert db.savepoints == 1 + 3  # the batch, then the failing flag's changes one by one
    assert {v for v, _ in verdicts.values()} == {Verdict.ERROR}
    fake(refused={"flag-0001"})
    changes = _batch(3, per_flag=3, stop=True)  # retried: the later ones are held back
    verdicts = tick._write(None, changes, tick.StopFlag(), None, tick.HeldFlags())  # type: ignore[arg-type]
    assert [verdicts[i][0] for i in (3, 4, 5)] == [
        Verdict.ERROR,
        Verdict.NOT_ATTEMPTED,
        Verdict.NOT_ATTEMPTED,
    ]


def test_a_timed_out_statement_goes_flag_by_flag(fake: Any) -> None:
    db = fake(slow={"flag-0001"})
    changes = _batch(3, per_flag=2)
    verdicts = tick._write(None, changes, tick.StopFlag(), None, tick.HeldFlags())  # type: ignore[arg-type]
    assert [verdicts[i][0] for i in (2, 3)] == [Verdict.ERROR, Verdict.NOT_ATTEMPTED]
    assert sorted(verdicts) == [2, 3] and sorted(db.written) == [1, 2, 5, 6]
    assert db.savepoints == 1 + 3  # the batch, then each flag once


def test_a_busy_flag_is_left_for_the_next_batch_never_waited_for_with_the_claim_held(
    fake: Any,
) -> None:
    """A flag another session holds is not waited for while the batch's schedules are
    locked (a deadlock with an application that holds the flag and then writes its
    schedules): its changes are deferred, untouched, and the flag noted to be waited for
    before the next batch's claim. Waited for already this tick, its first change is a
    retry as after a lock timeout, the next held back."""
    db = fake(held={"flag-0002"})
    changes = _batch(4, per_flag=2)
    held = tick.HeldFlags()
    verdicts = tick._write(None, changes, tick.StopFlag(), None, held)  # type: ignore[arg-type]
    assert verdicts == {4: (Verdict.DEFERRED, None), 5: (Verdict.DEFERRED, None)}
    assert sorted(db.written) == [1, 2, 3, 4, 7, 8]
    assert (db.statements, db.savepoints) == (1, 1)  # no statement waits for the flag
    assert {k: [s.id for s in v] for k, v in held.deferred.items()} == {"flag-0002": [5, 6]}

    held = tick.HeldFlags(waited={"flag-0002": StatementFailed("lock timeout", "55P03")})
    verdicts = tick._write(None, changes, tick.StopFlag(), None, held)  # type: ignore[arg-type]
    assert verdicts == {
        4: (Verdict.ERROR, "lock timeout"),
        5: (Verdict.NOT_ATTEMPTED, "not attempted: schedule 5 of this flag failed first"),
    }
    assert held.deferred == {}


def test_a_stop_leaves_the_rest_not_attempted(fake: Any) -> None:
    fake(held={"flag-0000", "flag-0001"})
    stop = tick.StopFlag()
    stop.request(15)
    changes = _batch(2)
    verdicts = tick._write(None, changes, stop, None, tick.HeldFlags())  # type: ignore[arg-type]
    assert {v for v, _ in verdicts.values()} == {Verdict.NOT_ATTEMPTED}
