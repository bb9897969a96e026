"""SPEC "Correctness rules the adversarial pass made explicit" (issue 16, defects 1-5 and 9),
on a real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from flagsched import operators
from flagsched.db import Database
from flagsched.model import Outcome, TickReport

Sql = Callable[..., list[Any]]
Tick = Callable[..., TickReport]

# --- 1. A batch is never spent on rows that cannot move ---------------------------------

# A flag's schedules, in (scheduled_at, id) order:
#   due       pending, due
#   retry     failed, waiting for a retry that is due
#   waiting   failed, waiting for a retry not due yet (holds the later ones back)
#   dead      failed for good (holds nothing back)
KINDS = ("due", "retry", "waiting", "dead")


def _movable_and_held(kinds: list[str]) -> tuple[list[int], list[int]]:
    """Positions that can move (the leading run of due ones) and due ones held back."""
    movable: list[int] = []
    held: list[int] = []
    blocked = False
    for i, kind in enumerate(kinds):
        if kind == "dead":
            continue
        if kind == "waiting":
            blocked = True
        elif blocked:
            held.append(i)
        else:
            movable.append(i)
    return movable, held


def _seed(sql: Sql, flags: list[list[str]]) -> dict[tuple[int, int], int]:
    """One flag per list, its schedules in order; each schedule sets a distinct rollout."""
    sql("DELETE FROM feature_flag_schedules")
    sql("DELETE FROM feature_flags")
    ids: dict[tuple[int, int], int] = {}
    for f, kinds in enumerate(flags):
        sql("INSERT INTO feature_flags (key) VALUES (:k)", k=f"f{f}")
        for i, kind in enumerate(kinds):
            status = "pending" if kind == "due" else "failed"
            next_retry = {
                "due": "NULL",
                "retry": f"now() - interval '{(f * 7 + i) % 5 + 1} seconds'",
                "waiting": "now() + interval '1 hour'",
                "dead": "NULL",
            }[kind]
            rows = sql(
                f"""INSERT INTO feature_flag_schedules
                    (flag_key, scheduled_at, updates, status, retry_count, next_retry_at,
                     on_conflict)
                    VALUES (:k, now() - make_interval(mins => 100 - :i), CAST(:u AS jsonb),
                            :s, :rc, {next_retry}, 'apply')
                    RETURNING id""",
                k=f"f{f}",
                i=i,
                u=json.dumps({"rollout_percentage": i + 1}),
                s=status,
                rc=0 if kind == "due" else (4 if kind == "dead" else 1),
            )
            ids[(f, i)] = int(rows[0][0])
    return ids


def _statuses(sql: Sql) -> dict[int, tuple[str, int]]:
    rows = sql("SELECT id, status, retry_count FROM feature_flag_schedules")
    return {int(r[0]): (str(r[1]), int(r[2])) for r in rows}


_flags = st.lists(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4), min_size=1, max_size=6)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(flags=_flags, batch_size=st.integers(min_value=1, max_value=4))
@example(flags=[["due"], ["due", "due"], ["dead", "due"]], batch_size=3)
@example(flags=[["due", "due", "retry", "due"]], batch_size=3)  # a retry between steps
def test_held_back_schedules_never_take_a_place_and_max_batches_drains_what_can_move(
    sql: Sql, run_tick: Tick, flags: list[list[str]], batch_size: int
) -> None:
    ids = _seed(sql, flags)
    expected = [_movable_and_held(kinds) for kinds in flags]
    before = _statuses(sql)
    free = [f for f, (movable, _) in enumerate(expected) if movable]
    held_total = sum(len(held) for _, held in expected)

    # One batch: every flag whose next schedule is due and free applies it (batch size
    # permitting), however many held-back schedules there are.
    with capture_logs():
        one = run_tick(batch_size=batch_size)
    after = _statuses(sql)
    applied_flags = {
        f for (f, _), sid in ids.items() if after[sid][0] == "applied" != before[sid][0]
    }
    if len(free) <= batch_size:
        assert applied_flags == set(free)
    else:
        assert len(applied_flags) == batch_size
    assert one.count(Outcome.HELD_BACK) == min(held_total, batch_size)
    assert one.count(Outcome.RETRY) == one.count(Outcome.FAILED) == 0

    # --max-batches: keeps claiming while anything can move, and moves nothing else.
    with capture_logs():
        run_tick(batch_size=batch_size, max_batches=100)
    after = _statuses(sql)
    for f, (movable, held) in enumerate(expected):
        for i in movable:
            assert after[ids[(f, i)]][0] == "applied", (f, i)
        for i in held:  # left as they were: no retry spent
            assert after[ids[(f, i)]] == before[ids[(f, i)]], (f, i)
        if movable:  # in order: the last movable step's value won
            rows = sql("SELECT rollout_percentage FROM feature_flags WHERE key = :k", k=f"f{f}")
            assert rows[0][0] == movable[-1] + 1


def test_held_back_retries_beyond_the_batch_size_do_not_stop_other_flags(
    sql: Sql, run_tick: Tick
) -> None:
    """The runbook's case: more held-back due retries than a batch holds, and one free flag.
    The held ones are reported (once per tick) and never claimed."""
    ids = _seed(sql, [["waiting", "retry"]] * 5 + [["due", "due", "due", "due"]])
    with capture_logs() as logs:
        report = run_tick(batch_size=4, max_batches=3)
    assert [
        sql("SELECT status FROM feature_flag_schedules WHERE id = :i", i=ids[(5, i)])[0][0]
        for i in range(4)
    ] == ["applied"] * 4  # four overdue steps of one flag land in one tick
    assert report.count(Outcome.APPLIED) == 4
    held = [e["schedule_id"] for e in logs if e["event"] == "schedule_held_back"]
    assert len(held) == len(set(held)) == 4  # at most a batch's worth, each once
    assert set(held) <= {ids[(f, 1)] for f in range(5)}


def test_interleaved_due_retries_and_pending_steps_of_one_flag_all_land_in_one_tick(
    sql: Sql, run_tick: Tick
) -> None:
    """Consecutive due schedules of one flag apply in the same tick (SPEC "A tick", 3)
    whatever mix of due retries and pending ones they are: retry, pending, retry, pending
    (a pending step inserted before a schedule that failed, say) is one tick, not two."""
    ids = _seed(sql, [["retry", "due", "retry", "due"], ["due", "retry", "due", "retry"]])
    with capture_logs():
        report = run_tick(batch_size=100)
    after = _statuses(sql)
    assert [after[ids[(f, i)]][0] for f in range(2) for i in range(4)] == ["applied"] * 8
    assert report.count(Outcome.APPLIED) == 8
    assert sql("SELECT rollout_percentage FROM feature_flags ORDER BY key") == [(4,), (4,)]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(flags=_flags)
def test_with_room_in_the_batch_every_movable_schedule_applies_in_one_tick(
    sql: Sql, run_tick: Tick, flags: list[list[str]]
) -> None:
    ids = _seed(sql, flags)
    before = _statuses(sql)
    with capture_logs():
        report = run_tick(batch_size=100)
    after = _statuses(sql)
    for f, kinds in enumerate(flags):
        movable, held = _movable_and_held(kinds)
        for i in movable:
            assert after[ids[(f, i)]][0] == "applied", (flags, f, i)
        for i in held:
            assert after[ids[(f, i)]] == before[ids[(f, i)]], (flags, f, i)
    assert report.count(Outcome.HELD_BACK) == sum(len(_movable_and_held(k)[1]) for k in flags)


def test_schedules_behind_one_another_tick_holds_do_not_stop_max_batches(
    database_url: str, sql: Sql, run_tick: Tick
) -> None:
    """Another tick holds a flag's first due schedule (it is applying it): that flag's later
    due schedules were claimed and found blocked. A batch of only those ended the tick, so a
    free flag due after them waited for the next minute although --max-batches had room.
    Each flag's first due schedule is claimed before any flag's later steps now: a batch
    of only blocked rows means nothing else can move."""
    ids = _seed(sql, [["due", "due", "due"], ["due"]])
    sql(
        "UPDATE feature_flag_schedules SET scheduled_at = now() - interval '1 second' "
        "WHERE flag_key = 'f1'"
    )
    with psycopg.connect(database_url) as other:  # the other tick's claim of f0's first
        other.execute(
            "SELECT id FROM feature_flag_schedules WHERE id = %s FOR NO KEY UPDATE", [ids[(0, 0)]]
        )
        with capture_logs():
            report = run_tick(batch_size=2, max_batches=5)
        other.rollback()
    assert _statuses(sql)[ids[(1, 0)]][0] == "applied", report
    assert [_statuses(sql)[ids[(0, i)]][0] for i in range(3)] == ["pending"] * 3


# --- 2. A change made earlier in the inserting transaction is not a conflict --------------


def test_a_change_made_earlier_in_the_inserting_transaction_is_not_a_conflict(
    database_url: str, add_flag: Any, run_tick: Tick, sql: Sql
) -> None:
    add_flag("promo")
    with psycopg.connect(database_url, application_name="checkout-api") as app:
        app.execute("SELECT pg_sleep(0.01)")  # the statements come later than now()
        app.execute("UPDATE feature_flags SET enabled = true WHERE key = 'promo'")
        sid = app.execute(
            "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
            "VALUES ('promo', now(), '{\"enabled\": false}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        app.commit()
    with capture_logs():
        report = run_tick()
    assert report.count(Outcome.APPLIED) == 1, sql(
        "SELECT last_error FROM feature_flag_schedules WHERE id = :i", i=sid
    )
    assert sql("SELECT enabled FROM feature_flags WHERE key = 'promo'")[0][0] is False


def test_a_change_by_another_transaction_after_the_insert_still_conflicts(
    database_url: str, add_flag: Any, run_tick: Tick, sql: Sql
) -> None:
    add_flag("promo")
    with psycopg.connect(database_url) as app:
        app.execute(
            "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
            "VALUES ('promo', now(), '{\"enabled\": false}')"
        )
        app.commit()
        app.execute("UPDATE feature_flags SET rollout_percentage = 3 WHERE key = 'promo'")
        app.commit()
    with capture_logs():
        assert run_tick().count(Outcome.FAILED) == 1


def test_a_change_written_before_the_insert_but_committed_after_it_conflicts(
    database_url: str, add_flag: Any, run_tick: Tick, sql: Sql
) -> None:
    """The schedule could not have known a change that was not committed when it became
    visible, however early that change's statement ran (its written_at is before the
    schedule's created_at): it is a conflict."""
    add_flag("promo")
    with psycopg.connect(database_url) as other, psycopg.connect(database_url) as app:
        other.execute("UPDATE feature_flags SET enabled = true WHERE key = 'promo'")
        app.execute("SELECT pg_sleep(0.01)")
        sid = app.execute(
            "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
            "VALUES ('promo', now(), '{\"rollout_percentage\": 50}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        app.commit()
        other.commit()  # the foreign change becomes visible after the schedule did
    with capture_logs():
        assert run_tick().count(Outcome.FAILED) == 1
    error = sql("SELECT last_error FROM feature_flag_schedules WHERE id = :i", i=sid)[0][0]
    assert error.startswith("conflict:")
    assert sql("SELECT rollout_percentage FROM feature_flags WHERE key = 'promo'")[0][0] == 0


def test_a_change_committed_before_the_insert_in_a_longer_transaction_is_not_a_conflict(
    database_url: str, add_flag: Any, run_tick: Tick, sql: Sql
) -> None:
    """A transaction that began before another one changed the flag, and inserts the schedule
    after that change committed (READ COMMITTED: the INSERT sees it), knew of the change:
    the window starts when the row became visible, not when its transaction began."""
    add_flag("promo")
    with psycopg.connect(database_url) as app, psycopg.connect(database_url) as other:
        app.execute("SELECT pg_current_xact_id()")  # the app's transaction has begun
        other.execute("UPDATE feature_flags SET enabled = true WHERE key = 'promo'")
        other.commit()
        sid = app.execute(
            "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
            "VALUES ('promo', now(), '{\"rollout_percentage\": 50}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        app.commit()
    with capture_logs():
        report = run_tick()
    assert report.count(Outcome.APPLIED) == 1, sql(
        "SELECT last_error FROM feature_flag_schedules WHERE id = :i", i=sid
    )
    assert sql("SELECT enabled, rollout_percentage FROM feature_flags")[0] == (True, 50)


def test_a_schedule_from_a_cluster_with_later_transaction_ids_still_conflicts(
    add_flag: Any, add_schedule: Any, run_tick: Tick, sql: Sql
) -> None:
    """A database moved to another cluster (dump and restore, a logical-replication upgrade)
    keeps its schedules' snapshots, whose transaction ids may lie ahead of the new cluster's:
    every new change would look "seen" by them. Such a snapshot is not used; the schedule is
    judged by time."""
    add_flag("k")
    sid = add_schedule("k", {"rollout_percentage": 50})
    sql(
        "UPDATE feature_flag_schedules SET created_xact = '4000000000', "
        "created_snapshot = '4000000000:4000000000:' WHERE id = :i",
        i=sid,
    )
    sql("UPDATE feature_flags SET enabled = true WHERE key = 'k'")  # after the schedule
    with capture_logs():
        assert run_tick().count(Outcome.FAILED) == 1
    assert sql("SELECT rollout_percentage FROM feature_flags")[0][0] == 0


# --- 3. The history is keyed by the flag ----------------------------------------------


def _changes(sql: Sql) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in sql(
            "SELECT flag_key, old_flag_key, old_enabled, new_enabled, actor, "
            "to_jsonb(schedule_ids) FROM feature_flag_changes "
            "WHERE old_enabled IS NOT NULL ORDER BY flag_key"
        )
    ]


@pytest.mark.not_app_schedules(
    "the application's foreign key refuses changing the id of a flag its schedules refer to"
)
def test_an_update_that_changes_the_id_with_a_value_is_recorded_and_conflicts(
    add_flag: Any, add_schedule: Any, run_tick: Tick, sql: Sql, schedule: Any
) -> None:
    add_flag("k")
    sid = add_schedule("k", {"rollout_percentage": 50})
    sql("UPDATE feature_flags SET id = id + 1000, enabled = true WHERE key = 'k'")
    assert [c[:4] for c in _changes(sql)] == [("k", None, False, True)]
    with capture_logs():
        assert run_tick().count(Outcome.FAILED) == 1
    assert schedule(sid)["last_error"].startswith("conflict:")


def test_one_statement_moving_ids_and_changing_values_records_each_flag_once(
    add_flag: Any, sql: Sql
) -> None:
    """One flag moved to a new id with a value change, another's value changed in place,
    in one statement; then a plain update in the same transaction pairs as usual."""
    for key in ("a", "b", "c"):
        add_flag(key)
    sql(
        "UPDATE feature_flags SET id = CASE WHEN key = 'b' THEN id + 10 ELSE id END, "
        "enabled = true WHERE key IN ('b', 'c'); "
        "UPDATE feature_flags SET rollout_percentage = 9 WHERE key = 'a'"
    )
    assert [c[:4] for c in _changes(sql)] == [
        ("a", None, False, False),
        ("b", None, False, True),
        ("c", None, False, True),
    ]
    rollout = sql(
        "SELECT new_rollout_percentage FROM feature_flag_changes "
        "WHERE flag_key = 'a' AND old_enabled IS NOT NULL"
    )
    assert [r[0] for r in rollout] == [9]


def test_a_key_swap_is_one_row_per_flag_and_both_schedules_conflict(
    add_flag: Any, add_schedule: Any, run_tick: Tick, sql: Sql, schedule: Any
) -> None:
    add_flag("a", enabled=False)
    add_flag("b", enabled=True)
    sa_, sb = add_schedule("a", {"rollout_percentage": 10}), add_schedule("b", {"enabled": False})
    # The keys are unique (not deferrable): a swap goes through a third key, in one
    # transaction; each flag keeps its values under the other's key, recorded as renamed.
    sql(
        "UPDATE feature_flags SET key = 'swap' WHERE key = 'a'; "
        "UPDATE feature_flags SET key = 'a' WHERE key = 'b'; "
        "UPDATE feature_flags SET key = 'b' WHERE key = 'swap'"
    )
    assert [c[:4] for c in _changes(sql)] == [
        ("a", "b", True, True),
        ("b", "swap", False, False),
        ("swap", "a", False, False),
    ]
    with capture_logs():
        assert run_tick().count(Outcome.FAILED) == 2
    assert schedule(sa_)["last_error"].startswith("conflict:")
    assert schedule(sb)["last_error"].startswith("conflict:")
    assert sql("SELECT key, enabled, rollout_percentage FROM feature_flags ORDER BY key") == [
        ("a", True, 0),
        ("b", False, 0),
    ]


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_a_rename_with_a_value_change_says_so_and_conflicts(
    add_flag: Any, add_schedule: Any, run_tick: Tick, sql: Sql, schedule: Any
) -> None:
    add_flag("old")
    new, old = add_schedule("new", {"enabled": False}), add_schedule("old", {"enabled": False})
    sql("UPDATE feature_flags SET key = 'new', enabled = true WHERE key = 'old'")
    assert [c[:4] for c in _changes(sql)] == [("new", "old", False, True)]
    with capture_logs():
        assert run_tick().count(Outcome.FAILED) == 2
    assert schedule(new)["last_error"].startswith("conflict:")
    assert "does not exist" in schedule(old)["last_error"]  # no flag under the old key
    assert sql("SELECT enabled FROM feature_flags WHERE key = 'new'")[0][0] is True


@pytest.mark.built_in_only(
    "the previous release's stored functions exist for the built-in tables only"
)
def test_writes_by_the_previous_release_are_still_recognised_as_flagsched(
    add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    """The previous release's tick (flagsched_apply_v2) runs beside this schema."""
    add_flag("k")
    sid = add_schedule("k", {"enabled": True})
    sql(
        "SELECT * FROM flagsched_apply_v2(ARRAY[:i]::bigint[], ARRAY['k'], ARRAY[true], "
        "ARRAY[NULL]::integer[], ARRAY[true], NULL, false)",
        i=sid,
    )
    assert _changes(sql) == [("k", None, False, True, "flagsched", [sid])]


# --- 4. prune --history keeps what an open schedule needs ------------------------------


def test_prune_history_keeps_a_change_an_open_schedule_still_needs(
    database: Database, add_flag: Any, add_schedule: Any, run_tick: Tick, sql: Sql, schedule: Any
) -> None:
    add_flag("k")
    add_flag("other")
    sid = add_schedule("k", {"enabled": True})
    sql("UPDATE feature_flags SET rollout_percentage = 5")  # a manual change of both flags
    # All of it long ago: the schedule was created 60 days ago, the changes 40 days ago.
    sql("UPDATE feature_flag_schedules SET created_at = now() - interval '60 days'")
    sql(
        "UPDATE feature_flag_changes SET changed_at = now() - interval '40 days', "
        "written_at = now() - interval '40 days'"
    )
    with capture_logs():
        counts = operators.prune(database, older_than_days=30, dry_run=True, history=True)
        # other's creation and change, and k's creation (committed before the schedule's
        # INSERT saw the flag: never a conflict); k's change after it stays
        assert counts.history == 3
        operators.prune(database, older_than_days=30, dry_run=False, history=True)
    assert [tuple(r) for r in sql("SELECT flag_key, old_enabled FROM feature_flag_changes")] == [
        ("k", False)
    ]
    with capture_logs():
        assert run_tick().count(Outcome.FAILED) == 1
    assert schedule(sid)["last_error"].startswith("conflict:")


def test_prune_history_keeps_a_change_committed_after_the_schedule_though_written_before(
    database: Database, database_url: str, add_flag: Any, run_tick: Tick, sql: Sql
) -> None:
    """The change a schedule did not see (committed after its INSERT) is what its conflict
    check needs, even when its written_at is older than the schedule and the cut-off."""
    add_flag("k")
    with psycopg.connect(database_url) as other, psycopg.connect(database_url) as app:
        other.execute("UPDATE feature_flags SET enabled = true WHERE key = 'k'")
        app.execute(
            "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates) "
            "VALUES ('k', now(), '{\"rollout_percentage\": 50}')"
        )
        app.commit()
        other.commit()
    # Long ago: the change written 40 days ago, the schedule inserted half an hour later.
    sql(
        "UPDATE feature_flag_schedules "
        "SET created_at = now() - interval '40 days' + interval '30 minutes'"
    )
    sql(
        "UPDATE feature_flag_changes SET changed_at = now() - interval '40 days', "
        "written_at = now() - interval '40 days'"
    )
    with capture_logs():
        operators.prune(database, older_than_days=30, dry_run=False, history=True)
    assert [tuple(r) for r in sql("SELECT flag_key, old_enabled FROM feature_flag_changes")] == [
        ("k", False)
    ]
    with capture_logs():
        assert run_tick().count(Outcome.FAILED) == 1


# --- 5. Locking a flag never waits on a foreign key ------------------------------------


def test_a_transaction_inserting_a_row_that_references_the_flag_does_not_block_the_tick(
    database_url: str, add_flag: Any, add_schedule: Any, run_tick: Tick, sql: Sql, flag: Any
) -> None:
    sql(
        "CREATE TABLE test_flag_overrides (id bigint GENERATED ALWAYS AS IDENTITY, "
        "flag_id bigint NOT NULL REFERENCES feature_flags (id), user_id text)"
    )
    add_flag("k")
    add_schedule("k", {"enabled": True})
    with psycopg.connect(database_url) as app:  # holds FOR KEY SHARE on the flag until it ends
        app.execute(
            "INSERT INTO test_flag_overrides (flag_id, user_id) "
            "SELECT id, 'u1' FROM feature_flags WHERE key = 'k'"
        )
        with capture_logs():
            report = run_tick()
        assert report.count(Outcome.APPLIED) == 1, report
        app.commit()
    assert flag("k") == (True, 0)


@pytest.mark.not_app_schedules(
    "a foreign key refers to the application's table, not to flagsched's view"
)
def test_a_transaction_inserting_a_row_that_references_the_schedule_does_not_hide_it(
    database_url: str, add_flag: Any, add_schedule: Any, run_tick: Tick, sql: Sql, flag: Any
) -> None:
    """An application table referencing schedules (approvals, an audit trail): inserting a
    row holds FOR KEY SHARE on the schedule, which the claim's FOR UPDATE SKIP LOCKED skipped
    silently (applied 0, held back 0) for as long as that transaction stayed open. The
    claim takes FOR NO KEY UPDATE, as the record's UPDATE does: ticks still exclude each
    other, operators' FOR UPDATE still waits for a tick."""
    sql(
        "CREATE TABLE test_schedule_notes (id bigint GENERATED ALWAYS AS IDENTITY, "
        "schedule_id bigint NOT NULL REFERENCES feature_flag_schedules (id), note text)"
    )
    add_flag("k")
    sid = add_schedule("k", {"enabled": True})
    with psycopg.connect(database_url) as app:
        app.execute("INSERT INTO test_schedule_notes (schedule_id, note) VALUES (%s, 'ok')", [sid])
        with capture_logs():
            report = run_tick()
        assert report.count(Outcome.APPLIED) == 1, report
        app.commit()
    assert flag("k") == (True, 0)


@pytest.mark.not_app_schedules(
    "a foreign key refers to the application's table, not to flagsched's view"
)
def test_prune_keeps_a_schedule_an_application_row_references_and_deletes_the_rest(
    database: Database, add_flag: Any, add_schedule: Any, sql: Sql
) -> None:
    """A schedule an application table references (without ON DELETE CASCADE) cannot be
    deleted: prune failed the whole batch on it (exit 3, nothing pruned, on every run)."""
    sql(
        "CREATE TABLE test_schedule_notes (id bigint GENERATED ALWAYS AS IDENTITY, "
        "schedule_id bigint NOT NULL REFERENCES feature_flag_schedules (id), note text)"
    )
    add_flag("k")
    ids = [add_schedule("k", {"enabled": True}, status="applied") for _ in range(5)]
    sql("UPDATE feature_flag_schedules SET applied_at = now() - interval '40 days'")
    sql("INSERT INTO test_schedule_notes (schedule_id) VALUES (:i)", i=ids[2])
    with capture_logs() as logs:
        counts = operators.prune(database, older_than_days=30, dry_run=False, batch=2)
    assert counts.applied == 4 and counts.batches >= 2
    assert sql("SELECT id FROM feature_flag_schedules") == [(ids[2],)]
    finished = next(e for e in logs if e["event"] == "prune_finished")
    assert finished["kept_referenced"] == 1


# --- 9. Attempts: record time and memory bounded by the batch -------------------------


def test_attempts_near_the_size_limit_are_not_carried_along(
    add_flag: Any, add_schedule: Any, run_tick: Tick, sql: Sql, schedule: Any
) -> None:
    add_flag("k")
    sid = add_schedule("k", {"enabled": True})
    # ~900 kB of attempts that do not compress (what v1 kept and re-wrote on every record)
    sql(
        "UPDATE feature_flag_schedules SET attempts = (SELECT jsonb_agg(jsonb_build_object("
        "'attempt', n, 'at', '2026-01-01T00:00:00Z', 'outcome', 'retry', 'error', "
        "(SELECT string_agg(md5(n::text || m::text), '') FROM generate_series(1, 25) m))) "
        "FROM generate_series(1, 1000) n) WHERE id = :i",
        i=sid,
    )
    assert sql("SELECT pg_column_size(attempts) FROM feature_flag_schedules")[0][0] > 500_000
    with capture_logs():
        assert run_tick().count(Outcome.APPLIED) == 1
    size, n = sql(
        "SELECT pg_column_size(attempts), jsonb_array_length(attempts) "
        "FROM feature_flag_schedules WHERE id = :i",
        i=sid,
    )[0]
    assert size < 65536 and n == 1


@pytest.mark.built_in_only("it calls migration 0009's claim by name")
def test_compressible_attempts_under_the_limit_are_read_twice_a_row_not_once_per_use(
    add_flag: Any, sql: Sql, run_tick: Tick, engine: Any
) -> None:
    """An `attempts` array under the 64 kB limit as stored can be megabytes once
    decompressed (the same error 30,000 times: 3 MB of text, 60 kB stored). The claim read it
    once per use of the kept attempts (~12 decompressions a row: 1,000 such rows took the
    claim past the 30 s statement timeout, every tick exited 3 and the queue stopped); it
    costs a few full reads of the array now, whatever the batch size."""
    import time

    import sqlalchemy as sa

    n = 40
    for i in range(n):
        add_flag(f"k{i}")
    sql(
        "CREATE TABLE test_big AS SELECT (SELECT jsonb_agg(jsonb_build_object('attempt', 1, "
        "'at', '2026-01-01T00:00:00Z', 'outcome', 'retry', 'error', repeat('e', 40))) "
        "FROM generate_series(1, 30000) k) AS a"
    )
    sql(
        "INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, status, "
        "retry_count, max_retries, next_retry_at, attempts) "
        "SELECT 'k' || g, now() - interval '1 hour', '{\"enabled\": true}', 'failed', 1, 10, "
        "now() - interval '1 minute', (SELECT a FROM test_big) FROM generate_series(0, :n) g",
        n=n - 1,
    )
    stored, raw = sql(
        "SELECT max(pg_column_size(attempts)), max(octet_length(attempts::text)) "
        "FROM feature_flag_schedules"
    )[0]
    assert stored < 65536 < 2_000_000 < raw  # kept, and megabytes to decompress

    def best_of_three(statement: str) -> float:
        """The fastest of three runs on one connection (the first also plans the claim)."""
        times = []
        with engine.connect() as conn:
            for _ in range(3):
                started = time.perf_counter()
                conn.execute(sa.text(statement)).fetchall()
                times.append(time.perf_counter() - started)
                conn.rollback()
        return min(times)

    one_read = best_of_three("SELECT sum(jsonb_array_length(attempts)) FROM feature_flag_schedules")
    claim = best_of_three(
        "SELECT sum(attempts_made) FROM flagsched_claim_v3(1000, false, CAST('{}' AS jsonb), NULL)"
    )
    assert claim < 8 * one_read, (claim, one_read)  # was over 100x
    with capture_logs():
        assert run_tick(batch_size=1000).count(Outcome.APPLIED) == n
    assert sql(
        "SELECT min(jsonb_array_length(attempts)), max(attempts -> -1 ->> 'attempt') "
        "FROM feature_flag_schedules"
    ) == [(20, "20")]


def test_only_the_last_attempts_are_kept_and_numbering_goes_on(
    add_flag: Any, add_schedule: Any, run_tick: Tick, sql: Sql, schedule: Any
) -> None:
    add_flag("k")
    sid = add_schedule("k", {"enabled": True})
    sql(
        "UPDATE feature_flag_schedules SET attempts = (SELECT jsonb_agg(jsonb_build_object("
        "'attempt', n, 'at', '2026-01-01T00:00:00Z', 'outcome', 'retry', 'error', 'x') "
        "ORDER BY n) FROM generate_series(1, 30) n) WHERE id = :i",
        i=sid,
    )
    with capture_logs():
        assert run_tick().count(Outcome.APPLIED) == 1
    attempts = schedule(sid)["attempts"]
    assert [a["attempt"] for a in attempts] == list(range(12, 32))
    assert attempts[-1]["outcome"] == "applied"


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
