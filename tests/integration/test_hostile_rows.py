"""No row stops the queue: whatever PostgreSQL lets an application store in a schedule,
every command still runs, every valid schedule still applies, and a bad row fails for good
on its own (or is left alone and reported), with a short last_error."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from flagsched.cli import main
from flagsched.model import MAX_TEXT, Outcome, TickReport
from flagsched.sql import current
from tests.conftest import Ran, _command_env

Sql = Callable[..., list[Any]]
Tick = Callable[..., TickReport]

# Times PostgreSQL stores and Python cannot hold, and the edges of what it can.
ODD_TIMES = [
    "-infinity",
    "infinity",
    "4714-11-24 00:00:00+00 BC",  # PostgreSQL's first
    "0044-03-15 12:00:00+00 BC",
    "0001-12-31 23:00:00+00 BC",  # what `--at 0001-01-01T00:00:00+01:00` used to store
    "0001-01-01 00:00:00+00",
    "9999-12-31 23:59:59.999999+00",
    "10000-01-01 00:00:00+00",
    "20260-06-01 09:00:00+00",
    "294276-12-31 23:59:59.999999+00",  # PostgreSQL's last
]
INT_EDGES = [-(2**31), -1, 0, 1, 3, 10, 11, 2**31 - 2, 2**31 - 1]
STATUSES = ["pending", "failed", "applied", "cancelled", "PENDING", "", "done", "pending "]


@dataclass
class Command:
    code: int
    stdout: str
    stderr: str


@contextmanager
def _environment(url: str) -> Iterator[None]:
    variables = _command_env(url, None)  # with the configuration of the test's shape
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def command(url: str, *args: str) -> Command:
    """The real entry point, in-process (a subprocess per command would cost seconds)."""
    out, err = io.StringIO(), io.StringIO()
    with _environment(url), redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        else:  # pragma: no cover - main always exits
            code = -1
    return Command(code, out.getvalue(), err.getvalue())


def row(updates: str, **fields: Any) -> dict[str, Any]:
    """A schedule row for `insert`: a pending one, due a minute ago, unless told otherwise."""
    defaults = dict(flag_key="a", scheduled_at=-60, status="pending", retry_count=0)
    return {**defaults, "max_retries": 3, "next_retry_at": None, "updates": updates, **fields}


def insert(url: str, rows: list[dict[str, Any]]) -> list[int]:
    """Rows as an application might write them: times as PostgreSQL text or an offset from
    now() in seconds, `updates` as JSON text."""
    ids = []
    with psycopg.connect(url, autocommit=True) as conn:
        # An application's schedules table (shape 3) refers to its flags by a foreign key:
        # a row of a flag that does not exist cannot be there, and is not written.
        referenced = conn.execute("SELECT to_regclass('public.app_schedules')").fetchone()
        keys = {k for (k,) in conn.execute("SELECT key FROM feature_flags").fetchall()}
        for row in rows:
            if referenced and referenced[0] is not None and row["flag_key"] not in keys:
                continue
            ids.append(
                conn.execute(
                    """
                    INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates, status,
                        retry_count, max_retries, next_retry_at, created_at, expires_at,
                        reviewed_at, attempts, on_conflict)
                    VALUES (%(flag_key)s, {scheduled_at}, CAST(%(updates)s AS jsonb),
                        %(status)s, %(retry_count)s, %(max_retries)s, {next_retry_at},
                        coalesce({created_at}, now()), {expires_at}, {reviewed_at},
                        CAST(%(attempts)s AS jsonb), %(on_conflict)s)
                    RETURNING id
                    """.format(**{name: _time_sql(name, row.get(name)) for name in TIME_COLUMNS}),
                    {"attempts": "[]", "on_conflict": "fail", **row},
                ).fetchone()[0]  # type: ignore[index]
            )
    return ids


TIME_COLUMNS = ("scheduled_at", "next_retry_at", "created_at", "expires_at", "reviewed_at")


def _time_sql(name: str, value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return f"CAST(%({name})s AS timestamptz)"
    return f"now() + make_interval(secs => %({name})s)"


def snapshot(url: str) -> dict[int, str]:
    """Every schedule as text (no Python type can fail to hold it)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, CAST(to_jsonb(s) AS text) FROM feature_flag_schedules s"
        ).fetchall()
    return {int(i): str(text) for i, text in rows}


def check_lines_are_short(stderr: str) -> None:
    """Every log field quoting a value is at most MAX_TEXT characters. JSON lines end at
    "\n" only: a key may hold U+0085 or U+2028, which str.splitlines() would split on."""
    for line in stderr.split("\n"):
        if not line.startswith("{"):
            continue
        for key, value in json.loads(line).items():
            assert len(str(value)) <= MAX_TEXT, (key, len(str(value)))


# --- the cases found, one by one --------------------------------------------------------


@pytest.mark.parametrize("when", ["-infinity", "0044-03-15 BC", "20260-01-01", "infinity"])
def test_a_time_python_cannot_hold_stops_nothing(
    database_url: str, add_flag: Any, add_schedule: Any, sql: Sql, flag: Any, when: str
) -> None:
    add_flag("a")
    add_flag("other")
    (odd,) = insert(
        database_url,
        [row(scheduled_at=when, updates='{"enabled": true}')],
    )
    waiting = add_schedule(
        "a", {"enabled": True}, status="failed", retry_count=1, next_retry_at=f"'{when}'"
    )
    fine = add_schedule("other", {"rollout_percentage": 30})
    for args in (["process", "--dry-run"], ["status"], ["list-failed"]):
        ran = command(database_url, *args)
        assert ran.code == 0, ran.stderr
    ran = command(database_url, "process")
    assert ran.code == 1, ran.stderr  # the unreadable row failed for good
    assert flag("other") == (False, 30)
    assert sql("SELECT status FROM feature_flag_schedules WHERE id = :i", i=fine)[0][0] == "applied"
    rows = {
        r[0]: r[1:]
        for r in sql(
            "SELECT id, status, next_retry_at IS NULL, last_error FROM feature_flag_schedules"
        )
    }
    if when.startswith("-") or "BC" in when:  # due: fails for good, unattempted
        assert rows[odd][:2] == ("failed", True)
        assert "outside the years 1..9999" in rows[odd][2] and when.split()[0] in rows[odd][2]
    else:  # never due: left alone, reported as scheduled for later
        assert rows[odd] == ("pending", True, None)
    assert rows[waiting][:2] == ("failed", True)  # a retry that cannot be timed is final
    assert "next_retry_at" in rows[waiting][2]
    for fmt in ("table", "json"):
        for name in ("status", "list-failed"):
            ran = command(database_url, name, "--format", fmt)
            assert ran.code == 0, ran.stderr
    listed = json.loads(command(database_url, "list-failed", "--format", "json").stdout)
    assert {r["id"] for r in listed} >= {waiting}
    assert command(database_url, "cancel", str(odd)).code == 0  # not "busy", not 3


def test_the_cli_refuses_a_time_it_could_not_read_back(flagsched: Callable[..., Ran]) -> None:
    """`schedule --at 0001-01-01T00:00:00+01:00` would store a BC time: exit 2, one line."""
    ran = flagsched("schedule", "a", "--at", "0001-01-01T00:00:00+01:00", "--enable")
    assert ran.code == 2, ran
    assert "Traceback" not in ran.stderr


# A created_at in PostgreSQL's first hour (4714-11-24 BC), on a row inserted as any other
# (with its created_snapshot): 0009's safety check put its window's start an hour earlier,
# before PostgreSQL's time ("timestamp out of range"), and the tick's write failed the row,
# retry after retry, though nothing else stops it. Migration 0011's check starts that window
# at the beginning of time instead.
@pytest.mark.parametrize("created_at", ["4714-11-24 00:30:00+00 BC", "4714-11-24 00:00:00+00 BC"])
@pytest.mark.parametrize("another_writer", [False, True])
def test_a_created_at_in_postgresqls_first_hour_is_checked_and_applied(
    database_url: str,
    add_flag: Any,
    flag: Any,
    sql: Sql,
    created_at: str,
    another_writer: bool,
) -> None:
    add_flag("a", rollout=7)
    (sid,) = insert(database_url, [row('{"enabled": true}', created_at=created_at)])
    if another_writer:  # after it was created: a conflict, as for any other row
        sql("UPDATE feature_flags SET rollout_percentage = 8 WHERE key = 'a'")
    plan = command(database_url, "process", "--dry-run")
    assert plan.code == 0, plan.stderr
    ran = command(database_url, "process")
    ((status, timed, error),) = sql(  # (Python holds no BC time: not the whole row)
        "SELECT status, next_retry_at IS NOT NULL, last_error FROM feature_flag_schedules "
        "WHERE id = :i",
        i=sid,
    )
    if another_writer:
        assert (status, timed) == ("failed", False), error
        assert error.startswith("conflict: flag 'a' was changed by"), error
        assert ran.code == 1 and flag("a") == (False, 8)
        assert "fail for good: conflict: flag 'a' was changed by" in plan.stdout, plan.stdout
    else:
        assert (status, error) == ("applied", None)
        assert ran.code == 0 and flag("a") == (True, 7)
        assert "apply: on" in plan.stdout, plan.stdout


@pytest.mark.parametrize("levels", [990, 1010, 1023, 3000])
def test_deep_nesting_fails_its_row_not_the_tick(
    database_url: str, add_flag: Any, add_schedule: Any, schedule: Any, levels: int
) -> None:
    add_flag("a")
    deep = "[" * levels + "true" + "]" * levels
    (sid,) = insert(
        database_url,
        [row(scheduled_at=-120, updates='{"enabled": ' + deep + "}")],
    )
    fine = add_schedule("a", {"rollout_percentage": 40})
    assert command(database_url, "process", "--dry-run").code == 0
    ran = command(database_url, "process")
    assert ran.code == 1, ran.stderr
    assert schedule(fine)["status"] == "applied"
    failed = schedule(sid)
    assert failed["status"] == "failed" and failed["next_retry_at"] is None
    assert "enabled must be true or false" in failed["last_error"] or "read" in failed["last_error"]
    listed = command(database_url, "list-failed", "--format", "json")
    assert listed.code == 0 and json.loads(listed.stdout)[0]["id"] == sid


@pytest.mark.parametrize("retry_count", [2**31 - 1, 2**31 - 2, -(2**31), -1])
@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_retry_count_at_the_integer_limits_is_final_not_fatal(
    database_url: str,
    run_tick: Tick,
    add_flag: Any,
    add_schedule: Any,
    failing: Any,
    schedule: Any,
    retry_count: int,
) -> None:
    add_flag("broken")
    add_flag("fine")
    failing("broken")
    sid = add_schedule("broken", {"enabled": True}, retry_count=retry_count, max_retries=10)
    ghost = add_schedule("ghost", {"enabled": True}, retry_count=retry_count)
    fine = add_schedule("fine", {"enabled": True})
    report = run_tick()
    assert report.count(Outcome.APPLIED) == 1 and schedule(fine)["status"] == "applied"
    for row in (schedule(sid), schedule(ghost)):
        assert row["status"] == "failed" and row["next_retry_at"] is None  # final
        assert row["retry_count"] == min(retry_count + 1, 2**31 - 1)
    if not 0 <= retry_count < 2**31 - 1:
        assert "cannot be counted" in schedule(sid)["last_error"]
    assert command(database_url, "list-failed").code == 0


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_error_text_and_memory_are_bounded(
    database_url: str, run_tick: Tick, add_flag: Any, schedule: Any, sql: Sql
) -> None:
    add_flag("a")
    add_flag("k" * 1500)
    sql("""INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates)
           SELECT 'a', now() - interval '1 minute',
                  jsonb_build_object('enabled', repeat('x', 512 * 1024))
           FROM generate_series(1, 3)""")
    sql("""INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates)
           SELECT 'a', now() - interval '1 minute', jsonb_object_agg('key' || g, g)
           FROM generate_series(1, 100000) g""")
    sql(
        """INSERT INTO feature_flag_schedules (flag_key, scheduled_at, updates)
           VALUES ('a', now() - interval '1 minute', '{"enabled": "%s"}'),
                  (repeat('k', 1500), now() - interval '1 minute', '{"color": 1}'),
                  (repeat('g', 5000), now() - interval '1 minute', '{"enabled": true}')""".replace(
            "%s", "y" * 6000
        )
    )
    ran = command(database_url, "process")
    assert ran.code == 1, ran.stderr[-500:]
    check_lines_are_short(ran.stderr)
    errors = sql("SELECT last_error FROM feature_flag_schedules")
    assert all(e[0] and len(e[0]) <= MAX_TEXT for e in errors), [len(e[0] or "") for e in errors]
    assert any("bytes, more than the 8192 flagsched reads" in e[0] for e in errors)
    listed = command(database_url, "list-failed", "--format", "json")
    assert listed.code == 0 and len(listed.stdout) < 100_000


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_a_last_error_stored_long_ago_is_shown_bounded(
    database_url: str, add_schedule: Any, sql: Sql
) -> None:
    sid = add_schedule("a", {"enabled": True}, status="failed")
    sql("UPDATE feature_flag_schedules SET last_error = repeat('e', 200000) WHERE id = :i", i=sid)
    listed = json.loads(command(database_url, "list-failed", "--format", "json").stdout)
    assert len(listed[0]["last_error"]) == MAX_TEXT


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_status_counts_unknown_statuses(database_url: str, add_schedule: Any) -> None:
    for odd in ("PENDING", "done", ""):
        add_schedule("a", {"enabled": True}, status=odd)
    add_schedule("a", {"enabled": True}, status="applied")
    report = json.loads(command(database_url, "status", "--format", "json").stdout)
    assert report["unknown"] == 3 and report["applied"] == 1 and report["due"] == 0
    table = command(database_url, "status").stdout
    assert [line.split()[-1] for line in table.splitlines() if line.startswith("unknown")] == ["3"]


@pytest.mark.parametrize(
    ("spelling", "applies"),
    [
        ("50", True),
        ("5e1", True),
        ("50.0", True),
        ("5.0E+1", True),
        ("50.000000000000000000001", False),  # a float would round it to 50
        ("50.5", False),
        ("1e400", False),
        ("-0", True),
    ],
)
def test_one_rule_for_numbers_however_they_are_spelled(
    database_url: str,
    run_tick: Tick,
    add_flag: Any,
    flag: Any,
    spelling: str,
    applies: bool,
    schedule: Any,
) -> None:
    add_flag("a", rollout=7)
    (sid,) = insert(
        database_url,
        [row(updates='{"rollout_percentage": ' + spelling + "}")],
    )
    run_tick()
    if applies:
        assert schedule(sid)["status"] == "applied"
        assert flag("a") == (False, round(float(spelling)))
    else:
        assert schedule(sid)["status"] == "failed" and flag("a") == (False, 7)
        member = current().members[1]  # as the schedules table writes it (shape 3)
        assert f"{member} must be an integer 0..100" in schedule(sid)["last_error"]


# --- the class: rows from the whole range PostgreSQL accepts -----------------------------

# jsonb refuses \u0000 and lone surrogates; everything else a JSON text can hold is fair.
_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_chars, max_size=20)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(_chars, max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_number_spellings = st.sampled_from(
    ["0", "100", "50", "5e1", "50.0", "-0", "101", "-1", "12.5", "1e400", "1e-400", "99.999"]
)


@st.composite
def _updates_text(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["json", "shaped", "deep", "big", "wide"]))
    if kind == "json":
        return json.dumps(draw(_json_values))
    if kind == "deep":
        levels = draw(st.sampled_from([100, 990, 1000, 1023, 1030, 2500]))
        return '{"enabled": ' + "[" * levels + "]" * levels + "}"
    if kind == "big":
        size = draw(st.sampled_from([8000, 9000, 200_000]))
        return json.dumps({"enabled": "x" * size})
    if kind == "wide":
        return json.dumps({f"k{i}": i for i in range(draw(st.sampled_from([10, 3000])))})
    parts = []
    if draw(st.booleans()):
        parts.append('"enabled": ' + json.dumps(draw(_json_scalars | st.booleans())))
    if draw(st.booleans()):
        parts.append('"rollout_percentage": ' + draw(_number_spellings))
    return "{" + ", ".join(parts) + "}"


_times = st.sampled_from(ODD_TIMES) | st.integers(min_value=-86400 * 400, max_value=86400 * 400)
_hostile_rows = st.fixed_dictionaries(
    {
        "flag_key": st.sampled_from(["h1", "h2", "missing", "", "k" * 1500, "new\nline"]),
        "scheduled_at": _times,
        "updates": _updates_text(),
        "status": st.sampled_from(STATUSES),
        "retry_count": st.sampled_from(INT_EDGES) | st.integers(-(2**31), 2**31 - 1),
        "max_retries": st.integers(min_value=0, max_value=10),  # max_retries_check
        "next_retry_at": st.none() | _times,
        # The record's and the safety checks' columns (migration 0004).
        "created_at": st.none() | _times,
        "expires_at": st.none() | _times,
        "reviewed_at": st.none() | _times,
        "attempts": st.sampled_from(
            ["[]", "null", '{"attempt": 1}', '"x"', '[1, "two", {"attempt": []}]', "7"]
        ),
        "on_conflict": st.sampled_from(["fail", "apply"]),  # on_conflict_check
    }
)
VALID_FLAGS = ["v1", "v2", "v3"]

# Rows the SPEC calls due, that nothing holds back: after the ticks there must be none.
_STUCK = """
    SELECT s.id FROM feature_flag_schedules s
    WHERE ((s.status = 'pending' AND s.scheduled_at <= now())
           OR (s.status = 'failed' AND s.next_retry_at <= now()
               AND s.retry_count <= s.max_retries))
      AND NOT EXISTS (
        SELECT 1 FROM feature_flag_schedules e
        WHERE e.flag_key = s.flag_key AND (e.scheduled_at, e.id) < (s.scheduled_at, s.id)
          AND (e.status = 'pending' OR (e.status = 'failed' AND e.next_retry_at IS NOT NULL
                                        AND e.retry_count <= e.max_retries)))
"""
_FOR_GOOD = "status = 'failed' AND NOT (next_retry_at IS NOT NULL AND retry_count <= max_retries)"


@pytest.fixture
def hostile_database(database_url: str, failing: Callable[..., None]) -> str:
    """Flags h1 and h2 exist; every write to h2 fails (a retry, or final when it cannot be
    counted or the retries are spent)."""
    failing("h2")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO feature_flags (key) VALUES ('h1'), ('h2'), ('v1'), ('v2'), ('v3'), "
            "(repeat('k', 1500)), ('new' || chr(10) || 'line')"
        )
    return database_url


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(_hostile_rows, min_size=1, max_size=8),
    batch_size=st.sampled_from(["1", "3", "100"]),
)
# Found by this test (shape 3): a created_at at the start of PostgreSQL's time made the
# safety check's window overflow, and `process --dry-run` exited 3 (it checked every claimed
# row in one statement, also a row with a defect, which the tick fails unattempted).
@example(
    rows=[
        {"flag_key": "h1", "scheduled_at": "-infinity", "updates": "null", "status": "pending",
         "retry_count": -(2**31), "max_retries": 0, "next_retry_at": None,
         "created_at": "4714-11-24 00:00:00+00 BC", "expires_at": None, "reviewed_at": None,
         "attempts": "[]", "on_conflict": "fail"},
    ],
    batch_size="1",
)  # fmt: skip
# And a valid row created in PostgreSQL's first hour: 0009's check overflowed in the tick's
# write too, which retried it with "timestamp out of range" until it failed for good.
@example(
    rows=[
        {"flag_key": "h1", "scheduled_at": -60, "updates": '{"enabled": true}',
         "status": "pending", "retry_count": 0, "max_retries": 3, "next_retry_at": None,
         "created_at": "4714-11-24 00:30:00+00 BC", "expires_at": None, "reviewed_at": None,
         "attempts": "[]", "on_conflict": on_conflict}
        for on_conflict in ("apply", "fail")
    ],
    batch_size="100",
)  # fmt: skip
def test_no_row_stops_the_queue(
    hostile_database: str, rows: list[dict[str, Any]], batch_size: str
) -> None:
    url = hostile_database
    with psycopg.connect(url, autocommit=True) as conn:  # a cleaned database per example
        conn.execute("DELETE FROM feature_flag_schedules")  # a view on shape 3
        conn.execute("UPDATE feature_flags SET rollout_percentage = 0 WHERE key LIKE 'v_'")
    hostile = insert(url, rows)
    with psycopg.connect(url, autocommit=True) as conn:  # another writer: conflicts are possible
        conn.execute("UPDATE feature_flags SET enabled = NOT enabled WHERE key = 'h1'")
    valid = insert(
        url,
        [
            row(flag_key=key, scheduled_at=-30, updates=json.dumps({"rollout_percentage": 10 + n}))
            for n, key in enumerate(VALID_FLAGS)
        ],
    )
    before = snapshot(url)
    for args in (
        ["process", "--dry-run", "--batch-size", batch_size],
        ["status", "--format", "json"],
        ["list-failed", "--format", "json"],
        ["process", "--batch-size", batch_size, "--max-batches", "30"],
        ["process", "--batch-size", batch_size, "--max-batches", "30"],
        ["process", "--dry-run"],
        ["status"],
        ["status", "--max-lag", "60"],
        ["list-failed"],
        ["list-failed", "--format", "json"],
        ["history", "--format", "json"],
        ["history"],
        *(["show", str(i), *f] for i in hostile[:3] for f in ([], ["--format", "json"])),
    ):
        ran = command(url, *args)
        assert ran.code in (0, 1), (args, ran.stdout[-300:], ran.stderr[-600:])
        assert "Traceback" not in ran.stderr and "internal error" not in ran.stderr
        check_lines_are_short(ran.stderr)
    after = snapshot(url)
    with psycopg.connect(url, autocommit=True) as conn:
        flags: dict[str, int] = dict(
            conn.execute("SELECT key, rollout_percentage FROM feature_flags").fetchall()
        )
        states: dict[int, str] = dict(
            conn.execute("SELECT id, status FROM feature_flag_schedules").fetchall()
        )
        for_good = {
            r[0] for r in conn.execute(f"SELECT id FROM feature_flag_schedules WHERE {_FOR_GOOD}")
        }
        retrying = {  # a failed write to h2, timed (in range, later than now)
            r[0]
            for r in conn.execute(
                "SELECT id FROM feature_flag_schedules WHERE flag_key = 'h2' "
                "AND status = 'failed' AND next_retry_at > now() "
                "AND next_retry_at < now() + interval '2 hours' AND retry_count <= max_retries "
                "AND last_error LIKE 'injected failure%'"
            )
        }
        stuck = [r[0] for r in conn.execute(_STUCK)]
        longest = conn.execute(
            "SELECT coalesce(max(length(last_error)), 0) FROM feature_flag_schedules"
        ).fetchone()
    assert [states[i] for i in valid] == ["applied"] * len(valid)
    assert [flags[k] for k in VALID_FLAGS] == [10, 11, 12]
    for sid in hostile:
        assert (
            after[sid] == before[sid]
            or states[sid] == "applied"
            or sid in for_good
            or sid in retrying
        ), after[sid]
    assert stuck == [], [after[i] for i in stuck]
    assert longest is not None and longest[0] <= MAX_TEXT
    report = json.loads(command(url, "status", "--format", "json").stdout)
    counted = sum(
        report[k]
        for k in ("due", "scheduled", "waiting_retry", "failed", "applied", "cancelled", "unknown")
    )
    assert counted == len(hostile) + len(valid)  # every row is reported somewhere


_first_hour = st.sampled_from(
    ["4714-11-24 00:00:00+00 BC", "4714-11-24 00:30:00+00 BC", "4714-11-24 01:00:00+00 BC"]
)


def _check(url: str, version: str, sid: int) -> list[tuple[str, str]] | str:
    """What flagsched_check_<version> says of schedule `sid`, or the error it raises."""
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            rows = conn.execute(
                f"SELECT outcome, message FROM flagsched_check_{version}(%(i)s, NULL)",
                {"i": sid},
            ).fetchall()
        except psycopg.DataError as exc:
            return str(exc)
    return [(str(o), str(m)) for o, m in rows]


@pytest.mark.built_in_only("the previous release's check exists for the built-in tables only")
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    created_at=_times | _first_hour,
    reviewed_at=st.none() | _times | _first_hour,
    written_at=st.lists(_times | _first_hour, min_size=1, max_size=3),
)
def test_the_clamped_check_decides_as_the_previous_one_wherever_that_one_could(
    database_url: str, created_at: Any, reviewed_at: Any, written_at: list[Any]
) -> None:
    """Migration 0011's check (flagsched_check_v4) says what 0009's (flagsched_check_v3)
    says of any schedule, and where 0009's fails (its window's start in PostgreSQL's first
    hour) it still decides. The foreign changes are written by a transaction open while the
    schedule was inserted, so the hour before the window's start (the clamped part) counts."""
    url = database_url
    with psycopg.connect(url, autocommit=True) as conn:  # a cleaned database per example
        conn.execute("DELETE FROM feature_flag_schedules")
        conn.execute("TRUNCATE feature_flag_changes")
    with psycopg.connect(url) as writer:  # open before the schedule's INSERT, commits after
        writer.execute("SELECT pg_current_xact_id()")
        (sid,) = insert(
            url, [row('{"enabled": true}', created_at=created_at, reviewed_at=reviewed_at)]
        )
        for when in written_at:
            writer.execute(
                "INSERT INTO feature_flag_changes (flag_key, actor, old_enabled, new_enabled, "
                f"written_at) VALUES ('a', 'app', false, true, {_time_sql('written_at', when)})",
                {"written_at": when},
            )
    before, after = _check(url, "v3", sid), _check(url, "v4", sid)
    assert not isinstance(after, str), after
    if isinstance(before, str):
        assert "timestamp out of range" in before
    else:
        assert after == before


def test_a_real_process_survives_hostile_rows(
    flagsched: Callable[..., Ran], database_url: str, add_flag: Any, flag: Any
) -> None:
    """The same, once through a real subprocess (entry point, logging, exit code)."""
    add_flag("a")
    add_flag("fine")
    insert(
        database_url,
        [
            row(scheduled_at=when, updates=updates, retry_count=count)
            for when, updates, count in [
                ("-infinity", '{"enabled": true}', 0),
                ("0001-12-31 23:00:00+00 BC", '{"enabled": true}', 0),
                (-60, '{"enabled": ' + "[" * 1000 + "]" * 1000 + "}", 0),
                (-60, json.dumps({"enabled": "x" * 2_000_000}), 0),
                (-60, '{"rollout_percentage": 50.0}', 2**31 - 1),
                ("infinity", '{"enabled": true}', 0),
            ]
        ]
        + [row(flag_key="fine", updates='{"rollout_percentage": 5e1}')],
    )
    for args in (("process", "--dry-run"), ("status",), ("list-failed", "--format", "json")):
        assert flagsched(*args).code == 0
    ran = flagsched("process")
    assert ran.code == 1, ran.stderr[-500:]
    check_lines_are_short(ran.stderr)
    assert flag("fine") == (False, 50) and flag("a") == (False, 50)
    assert flagsched("status", "--max-lag", "600").code == 0


def test_a_pending_rows_meaningless_next_retry_at_does_not_fail_it(
    run_tick: Tick, add_flag: Any, add_schedule: Any, schedule: Any, flag: Any
) -> None:
    add_flag("a")
    sid = add_schedule("a", {"rollout_percentage": 20}, next_retry_at="'-infinity'")
    assert run_tick().count(Outcome.APPLIED) == 1
    row = schedule(sid)
    assert row["status"] == "applied" and row["next_retry_at"] is None and flag("a") == (False, 20)


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_operator_commands_log_a_huge_flag_key_bounded(
    database_url: str, add_schedule: Any
) -> None:
    waiting = add_schedule("g" * 5000, {"enabled": True}, status="failed")
    pending = add_schedule("g" * 5000, {"enabled": True}, at="now() + interval '1 day'")
    for args in (["retry", str(waiting)], ["cancel", str(pending)]):
        ran = command(database_url, *args)
        assert ran.code == 0, ran.stdout
        assert '"event":"schedule_' in ran.stderr
        check_lines_are_short(ran.stderr)


def test_a_long_database_error_is_clipped_and_keeps_its_verdict(
    run_tick: Tick, add_flag: Any, add_schedule: Any, failing: Any, schedule: Any
) -> None:
    key = "x" * 2000  # the injected failure quotes it: a 2,000-character server message
    add_flag(key)
    failing(key)
    sid = add_schedule(key, {"enabled": True}, max_retries=0)
    with capture_logs() as logs:
        assert run_tick().count(Outcome.FAILED) == 1
    error = schedule(sid)["last_error"]
    assert len(error) <= MAX_TEXT and error.endswith("(gave up after 1 attempts)")
    failed = [e for e in logs if e["event"] == "schedule_failed"]
    assert failed[0]["error"] == error and len(failed[0]["flag_key"]) <= MAX_TEXT


# --- every command reads any row (list, show, history; table and JSON) ------------------

_attempts_text = st.sampled_from(
    [
        "[]",
        "null",
        '"x"',
        "7",
        '[{"attempt": 1, "at": "2026-01-01T00:00:00Z", "outcome": "retry", "error": 12.5}]',
        '[{"attempt": 1.5, "at": 1e400, "outcome": ["x"], "error": {"e": 1e-400}}]',
        '[{"attempt": ' + "[" * 40 + "]" * 40 + "}]",
        '[{"attempt": 1, "error": ' + "[" * 1000 + "]" * 1000 + "}]",
        '[{"attempt": 1, "error": ' + "[" * 2500 + "]" * 2500 + "}]",
        "[" * 1000 + "]" * 1000,
        "[" * 2500 + "]" * 2500,
        '[1, "two", null, {"attempt": []}]',
    ]
) | st.lists(_json_values, max_size=3).map(json.dumps)
_read_rows = st.fixed_dictionaries(
    {
        "flag_key": st.sampled_from(["r1", "r2", "", "k" * 1500, "new\nline"]),
        "scheduled_at": _times,
        "updates": _updates_text()
        | _number_spellings.map(lambda n: '{"rollout_percentage": ' + n + "}")
        | st.sampled_from(
            [
                '{"rollout_percentage": 1' + "0" * 400 + "}",
                '{"rollout_percentage": 1e5000}',
                '{"x": [0.1, 1e-7, -1e5000, 1e-5000]}',
                '{"x": ' + "9" * 5000 + "}",
            ]
        ),
        "status": st.sampled_from(STATUSES),
        "retry_count": st.sampled_from(INT_EDGES),
        "next_retry_at": st.none() | _times,
        "expires_at": st.none() | _times,
        "attempts": _attempts_text,
    }
)
_history_rows = st.fixed_dictionaries(
    {
        "flag_key": st.sampled_from(["r1", "", "k" * 1500, "tab\there"]),
        "changed_at": st.sampled_from([*ODD_TIMES, "2026-03-01 09:00:00+00"]),
        "actor": st.sampled_from(["app", "", "a" * 3000, "\x1b[31mred"]),
        "old_enabled": st.none() | st.booleans(),
        "old_rollout_percentage": st.none() | st.sampled_from(INT_EDGES),
        "new_enabled": st.none() | st.booleans(),
        "new_rollout_percentage": st.none() | st.sampled_from(INT_EDGES),
        "schedule_ids": st.sampled_from(
            ["{}", "{1,NULL}", "{9223372036854775807,-9223372036854775808}", "{1,2,3,4,5,6,7}"]
        ),
    }
)


def insert_changes(url: str, rows: list[dict[str, Any]]) -> None:
    """History rows as a person in psql might write them (any value the columns hold)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for change in rows:
            conn.execute(
                """
                INSERT INTO feature_flag_changes (flag_key, changed_at, actor, old_enabled,
                    old_rollout_percentage, new_enabled, new_rollout_percentage, schedule_ids)
                VALUES (%(flag_key)s, CAST(%(changed_at)s AS timestamptz), %(actor)s,
                    %(old_enabled)s, %(old_rollout_percentage)s, %(new_enabled)s,
                    %(new_rollout_percentage)s, CAST(%(schedule_ids)s AS bigint[]))
                """,
                change,
            )


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(_read_rows, min_size=1, max_size=5),
    changes=st.lists(_history_rows, max_size=3),
)
def test_every_command_reads_any_row(
    database_url: str, rows: list[dict[str, Any]], changes: list[dict[str, Any]]
) -> None:
    """`list`, `show` and `history` show any value an application stored, in table form as
    in JSON (a value too deep or too big is a short note), and exit 0."""
    url = database_url
    with psycopg.connect(url, autocommit=True) as conn:  # a cleaned database per example
        conn.execute("DELETE FROM feature_flag_schedules")  # a view on shape 3
        conn.execute("TRUNCATE feature_flag_changes")
    ids = insert(url, [row(**r) for r in rows])
    insert_changes(url, changes)
    reads: list[list[str]] = [
        ["list"],
        *(["list", "--status", s] for s in ("pending", "failed", "applied", "cancelled")),
        ["list", "--tz", "Europe/Berlin", "--status", "pending"],
        ["history"],
        ["history", "r1", "--tz", "Asia/Kolkata"],
        *(["show", str(i)] for i in ids),
    ]
    for args in reads:
        for form in ([], ["--format", "json"]):
            ran = command(url, *args, *form)
            assert ran.code == 0, (args, form, ran.stdout[-300:], ran.stderr[-600:])
            assert "Traceback" not in ran.stderr and "internal error" not in ran.stderr
            if form:
                json.loads(ran.stdout)


@pytest.mark.not_app_schedules(
    "a schedule of a missing flag: an application's foreign key keeps it out"
)
def test_a_fractional_rollout_and_deep_attempts_are_shown(database_url: str) -> None:
    """The two rows the adversarial pass found, as examples."""
    (fractional,) = insert(database_url, [row('{"rollout_percentage": 12.5}')])
    # jsonb writes 1e5000 back as 5,001 digits: more than Python reads as an int.
    insert(database_url, [row('{"rollout_percentage": 1e5000}', flag_key="b")])
    (deep,) = insert(database_url, [row("{}", attempts="[" * 2500 + "]" * 2500)])
    listed = command(database_url, "list")
    assert listed.code == 0, listed.stderr
    assert '{"rollout_percentage":12.5}' in listed.stdout
    assert "(unreadable JSON: Exceeds the limit (4300 digits)" in listed.stdout
    as_json = command(database_url, "list", "--format", "json")
    assert as_json.code == 0, as_json.stderr
    shown_updates = [r["updates"] for r in json.loads(as_json.stdout)]
    assert shown_updates[0] == {"rollout_percentage": 12.5}
    assert shown_updates[1].startswith("(unreadable JSON: Exceeds the limit (4300 digits)")
    shown = command(database_url, "show", str(deep))
    assert shown.code == 0, shown.stderr
    assert "attempts: (unreadable JSON: nested too deeply)" in shown.stdout
    assert command(database_url, "show", str(fractional)).code == 0


@pytest.fixture
def database_url(shaped_database_url: str) -> str:
    """Every test here on the built-in tables and on your own flags table (issue 18)."""
    return shaped_database_url
