"""The projection behind `plan` and `agenda`: exact cases of the tick's rules, and properties
over any mix of schedules, retries and recurrences (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from flagsched import recurring
from flagsched.model import Updates
from flagsched.projection import (
    MAX_TOTAL_OCCURRENCES,
    FlagAhead,
    Kind,
    Outcome,
    State,
    agenda,
    project,
)
from flagsched.rows import ActiveRecurrence, FlagRow, OpenSchedule

NOW = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)  # a day before Europe/Berlin's DST gap
H = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def schedule(
    id: int,
    key: str,
    at: datetime,
    updates: object,
    *,
    retry_at: datetime | None = None,
    expires_at: datetime | None = None,
    group_id: int | None = None,
    defect: str | None = None,
) -> OpenSchedule:
    return OpenSchedule(
        id=id,
        flag_key=key,
        scheduled_at=at,
        updates=updates,
        status="pending" if retry_at is None else "failed",
        next_retry_at=retry_at,
        expires_at=expires_at,
        reviewed_at=None,
        group_id=group_id,
        recurrence_id=None,
        waiting=retry_at is not None,
        last_error=None,
        defect=defect,
    )


def recurrence(
    id: int,
    key: str,
    cron: str,
    updates: object,
    next_at: datetime,
    zone: str = "UTC",
    expires_after: object = None,
) -> ActiveRecurrence:
    return ActiveRecurrence(id, key, cron, zone, updates, next_at, expires_after)


def by_key(ahead: list[FlagAhead]) -> dict[str, FlagAhead]:
    return {f.flag_key: f for f in ahead}


def test_a_ramp_folds_step_by_step_and_plan_at_now_is_the_flags_as_they_are() -> None:
    flags = [FlagRow("f", False, 0)]
    ramp = [
        schedule(i, "f", NOW + i * H, {"enabled": True, "rollout_percentage": p}, group_id=7)
        for i, p in ((1, 10), (2, 50), (3, 100))
    ]
    f = by_key(project(flags, ramp, [], max_lateness=None, now=NOW, until=NOW + 2 * H))["f"]
    assert f.now == State(False, 0) and f.at == State(True, 50)
    assert [(s.schedule_id, s.at, s.outcome) for s in f.steps] == [
        (1, NOW + H, Outcome.APPLIES),
        (2, NOW + 2 * H, Outcome.APPLIES),
    ]
    same = by_key(project(flags, ramp, [], max_lateness=None, now=NOW, until=NOW))["f"]
    assert same.at == same.now and same.steps == ()


def test_overdue_changes_come_right_after_now_and_a_retry_holds_the_rest() -> None:
    flags = [FlagRow("f", True, 5)]
    rows = [
        schedule(1, "f", NOW - 2 * H, {"rollout_percentage": 20}, retry_at=NOW + 3 * H),
        schedule(2, "f", NOW - H, {"rollout_percentage": 30}),
        schedule(3, "f", NOW + H, {"enabled": False}, expires_at=NOW + 2 * H),
    ]
    at_2 = by_key(project(flags, rows, [], max_lateness=None, now=NOW, until=NOW + 2 * H))["f"]
    # behind the retry (due at +3h): both are still held back at +2h
    assert [(s.schedule_id, s.outcome, s.at) for s in at_2.steps] == [
        (2, Outcome.HELD, NOW),
        (3, Outcome.HELD, NOW + H),
    ]
    assert at_2.at == State(True, 5)
    at_4 = by_key(project(flags, rows, [], max_lateness=None, now=NOW, until=NOW + 4 * H))["f"]
    assert [(s.schedule_id, s.kind, s.outcome, s.at) for s in at_4.steps] == [
        (1, Kind.RETRYING, Outcome.APPLIES, NOW + 3 * H),
        (2, Kind.PENDING, Outcome.APPLIES, NOW + 3 * H),
        (3, Kind.PENDING, Outcome.EXPIRES, NOW + 3 * H),  # past its expires_at by then
    ]
    assert at_4.at == State(True, 30)


def test_lateness_invalid_updates_defects_and_missing_flags_are_shown_not_folded() -> None:
    flags = [FlagRow("f", False, 0)]
    rows = [
        schedule(1, "f", NOW - 2 * H, {"enabled": True}),  # 2 h late with a 1 h limit
        schedule(2, "f", NOW + H, {"rollout_percentage": 12.5}),
        schedule(3, "f", NOW + H, {"enabled": True}, defect="scheduled_at -infinity is out"),
        schedule(4, "gone", NOW + H, {"enabled": True}),
        schedule(5, "f", NOW + 2 * H, {"rollout_percentage": 40}),
    ]
    ahead = by_key(project(flags, rows, [], max_lateness=H, now=NOW, until=NOW + 3 * H))
    assert [(s.schedule_id, s.outcome) for s in ahead["f"].steps] == [
        (1, Outcome.EXPIRES),
        (2, Outcome.FAILS),
        (3, Outcome.FAILS),
        (5, Outcome.APPLIES),
    ]
    assert ahead["f"].at == State(False, 40)
    assert ahead["gone"].now is None and ahead["gone"].at is None
    assert [(s.outcome, s.error) for s in ahead["gone"].steps] == [
        (Outcome.FAILS, "the flag does not exist")
    ]


def test_recurrences_fire_like_the_tick_missed_ones_collapse_and_dst_is_respected() -> None:
    flags = [FlagRow("m", False, 0)]
    rows = [
        # missed for two days: one occurrence now (the latest), then every day at 02:30
        recurrence(1, "m", "30 2 * * *", {"enabled": True}, NOW - 2 * 24 * H, "Europe/Berlin"),
        recurrence(
            2,
            "m",
            "0 3 * * *",
            {"enabled": False},
            datetime(2026, 3, 29, 1, tzinfo=UTC),
            "Europe/Berlin",
        ),
    ]
    ahead = project(flags, [], rows, max_lateness=None, now=NOW, until=NOW + 2 * 24 * H)
    steps = [(s.recurrence_id, s.at) for s in ahead[0].steps]
    assert steps == [
        (1, NOW),  # 2026-03-28 02:30 local, collapsed and due right away
        # 2026-03-29 02:30 does not exist in Berlin: at the first instant after the gap
        (1, datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),
        (2, datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),  # 03:00 CEST: the same instant
        (1, datetime(2026, 3, 30, 0, 30, tzinfo=UTC)),
        (2, datetime(2026, 3, 30, 1, 0, tzinfo=UTC)),
    ]
    assert all(s.schedule_id is None and s.kind is Kind.RECURRING for s in ahead[0].steps)


# --- properties ---------------------------------------------------------------------------

KEYS = ["a", "b", "c"]
_valid = st.builds(
    lambda e, r: {k: v for k, v in (("enabled", e), ("rollout_percentage", r)) if v is not None},
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.integers(0, 100)),
)
_updates = st.one_of(
    _valid,
    _valid,
    _valid,
    st.just({"rollout_percentage": "fifty"}),
    st.just([]),
)
_offset = st.integers(-600, 3000).map(lambda m: timedelta(minutes=m))


@st.composite
def _schedules(draw: Any) -> list[OpenSchedule]:
    rows = []
    for i in range(draw(st.integers(0, 12))):
        at = NOW + draw(_offset)
        retry = draw(st.one_of(st.none(), _offset.map(lambda o: NOW + abs(o))))
        late = draw(st.one_of(st.none(), _offset))
        expires = None if late is None else at + abs(late)
        rows.append(
            schedule(
                i + 1,
                draw(st.sampled_from([*KEYS, "gone"])),
                at,
                draw(_updates),
                retry_at=retry,
                expires_at=expires,
            )
        )
    return rows


@st.composite
def _recurrences(draw: Any) -> list[ActiveRecurrence]:
    rows = []
    for i in range(draw(st.integers(0, 2))):
        rows.append(
            recurrence(
                i + 1,
                draw(st.sampled_from(KEYS)),
                draw(st.sampled_from(["*/45 * * * *", "30 2 * * *", "0 */6 * * 1-5"])),
                draw(_valid.filter(bool)),
                NOW + draw(_offset),
                draw(st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"])),
                draw(st.one_of(st.none(), st.just(timedelta(minutes=30)))),
            )
        )
    return rows


_flags = st.lists(
    st.builds(FlagRow, st.sampled_from(KEYS), st.booleans(), st.integers(0, 100)),
    unique_by=lambda f: f.key,
)
_lateness = st.one_of(st.none(), st.just(timedelta(hours=2)))


def _fold(state: State | None, ahead: FlagAhead) -> State | None:
    for step in ahead.steps:
        if step.outcome is Outcome.APPLIES:
            assert state is not None and step.change is not None
            state = state.folded(step.change)
    return state


@settings(max_examples=150, deadline=None)
@given(_flags, _schedules(), _recurrences(), _lateness, _offset, _offset)
def test_properties_of_the_projection(
    flags: list[FlagRow],
    schedules: list[OpenSchedule],
    recurrences: list[ActiveRecurrence],
    lateness: timedelta | None,
    first: timedelta,
    second: timedelta,
) -> None:
    early, late = sorted((NOW + abs(first), NOW + abs(second)))
    at_now = project(flags, schedules, recurrences, max_lateness=lateness, now=NOW, until=NOW)
    assert {f.flag_key: f.at for f in at_now if f.now is not None} == {
        f.key: State(f.enabled, f.rollout_percentage) for f in flags
    }
    assert all(f.steps == () for f in at_now)

    ahead = project(flags, schedules, recurrences, max_lateness=lateness, now=NOW, until=late)
    before = by_key(
        project(flags, schedules, recurrences, max_lateness=lateness, now=NOW, until=early)
    )
    for f in ahead:
        assert _fold(f.now, f) == f.at  # folding the changes onto now gives the state at
        moved = [s.at for s in f.steps if s.outcome is not Outcome.HELD]
        assert moved == sorted(moved)  # one after another, in the tick's per-flag order
        assert all(NOW <= s.at <= late for s in f.steps)
        # what applies by `early` applies, at the same time, when looking further ahead
        applied_early = [
            (s.schedule_id, s.recurrence_id, s.at)
            for s in before[f.flag_key].steps
            if s.outcome is Outcome.APPLIES
        ]
        assert applied_early == [
            (s.schedule_id, s.recurrence_id, s.at)
            for s in f.steps
            if s.outcome is Outcome.APPLIES and s.at <= early and early > NOW
        ]  # at now itself nothing has happened yet; what is due comes right after
        assert before[f.flag_key].now == f.now
    window = agenda(ahead, start=early)
    assert [s.at for s in window] == sorted(s.at for s in window)
    assert all(early <= s.at <= late for s in window)
    assert {s.schedule_id for s in window if s.schedule_id is not None} <= {r.id for r in schedules}


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["*/45 * * * *", "30 2 * * *", "0,30 1-3 * * *", "15 0 1 * *"]),
    st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]),
    st.integers(0, 365 * 24 * 60).map(
        lambda m: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=m)
    ),
)
def test_occurrences_are_next_after_one_by_one(expr: str, zone_name: str, start: datetime) -> None:
    zone = ZoneInfo(zone_name)
    until = start + timedelta(days=3)
    expected, at = [], start
    while (at := recurring.next_after(expr, zone, at)) <= until:
        expected.append(at)
    assert list(recurring.occurrences(expr, zone, start, until)) == expected


def test_updates_fold_only_what_they_name() -> None:
    assert State(True, 40).folded(Updates(rollout_percentage=10)) == State(True, 10)
    assert State(True, 40).folded(Updates(enabled=False)) == State(False, 40)


def test_a_recurrence_the_tick_cannot_read_never_fires() -> None:
    flags = [FlagRow("m", False, 0)]
    rows = [
        recurrence(1, "m", "not cron", {"enabled": True}, NOW + H),
        recurrence(2, "m", "0 2 * * *", {"enabled": True}, NOW + H, "Mars/Olympus"),
        recurrence(3, "m", "0 2 * * *", {"enabled": True}, None),  # type: ignore[arg-type]
    ]
    [m] = project(flags, [], rows, max_lateness=None, now=NOW, until=NOW + 48 * H)
    assert m.steps == () and m.at == m.now


def test_a_future_occurrence_never_holds_back_a_retry_due_before_it_exists() -> None:
    """The tick makes an occurrence a schedule only at its time: a retry already due (whose
    own scheduled_at is later than the occurrence) applies now, not after the occurrence.
    Found by the property test below (the horizon changed what applied by an earlier time)."""
    flags = [FlagRow("a", False, 0)]
    retry = schedule(1, "a", NOW + 46 * MINUTE, {"rollout_percentage": 5}, retry_at=NOW)
    every = recurrence(1, "a", "*/45 * * * *", {"rollout_percentage": 0}, next_at=NOW + 45 * MINUTE)
    for until in (NOW + MINUTE, NOW + 50 * MINUTE):
        f = by_key(project(flags, [retry], [every], max_lateness=None, now=NOW, until=until))["a"]
        first = f.steps[0]
        assert (first.schedule_id, first.at, first.outcome) == (1, NOW, Outcome.APPLIES)
    late = by_key(
        project(flags, [retry], [every], max_lateness=None, now=NOW, until=NOW + 50 * MINUTE)
    )["a"]
    assert [(s.recurrence_id, s.at) for s in late.steps[1:]] == [(1, NOW + 45 * MINUTE)]
    assert late.at == State(False, 0)


# --- break19: adversarial cases -------------------------------------------------------


def test_a_recurrence_past_the_occurrence_cap_still_decides_the_state_at_the_horizon() -> None:
    """Every minute `enabled: true`; a schedule in three days disables the flag. The tick
    turns the next minute's occurrence into a schedule, so four days out the flag is enabled
    again, however many occurrences the projection shows."""
    flags = [FlagRow("f", False, 0)]
    off = [schedule(1, "f", NOW + timedelta(days=3), {"enabled": False})]
    every = [recurrence(1, "f", "* * * * *", {"enabled": True}, NOW + MINUTE)]
    f = by_key(
        project(flags, off, every, max_lateness=None, now=NOW, until=NOW + timedelta(days=4))
    )["f"]
    assert f.at == State(True, 0)
    assert next(s for s in f.steps if s.schedule_id == 1).outcome is Outcome.APPLIES
    # the last change before the horizon is an occurrence after the schedule
    assert f.steps[-1].kind is Kind.RECURRING and f.steps[-1].at > NOW + timedelta(days=3)


def test_an_agenda_window_far_ahead_shows_a_frequent_recurrence_in_it() -> None:
    """`agenda --from` two days ahead: a recurrence every minute fires in that window too
    (the cap on occurrences counts what is shown, not what comes before the window)."""
    flags = [FlagRow("f", False, 0)]
    every = [recurrence(1, "f", "* * * * *", {"enabled": True}, NOW + MINUTE)]
    start = NOW + timedelta(days=2)
    ahead = project(
        flags, [], every, max_lateness=None, now=NOW, until=start + 10 * MINUTE, start=start
    )
    shown = agenda(ahead, start=start)
    assert [s.at for s in shown] == [start + i * MINUTE for i in range(11)]


def test_a_stored_next_at_between_occurrences_fires_at_the_next_occurrence() -> None:
    """An application stored `next_at` 10:05 for an hourly cron: the tick, at 10:05, finds
    the latest occurrence (10:00) before next_at and makes no schedule; the first schedule
    is at 11:00."""
    flags = [FlagRow("f", False, 0)]
    odd = [recurrence(1, "f", "0 * * * *", {"enabled": True}, NOW + 5 * MINUTE)]
    f = by_key(project(flags, [], odd, max_lateness=None, now=NOW, until=NOW + 2 * H))["f"]
    assert [s.at for s in f.steps] == [NOW + H, NOW + 2 * H]
    assert recurring.due("0 * * * *", "UTC", NOW + 5 * MINUTE, NOW + 5 * MINUTE).fire_at is None


def test_a_recurrence_expiry_outside_the_years_python_holds_is_judged_like_the_tick() -> None:
    """`expires_after` that moves expires_at before year 1 (PostgreSQL holds 4713 BC): the
    tick makes the schedule and it expires at once. One that moves it past what PostgreSQL
    holds (294276 AD, or 4713 BC): the tick stops the recurrence ("timestamp out of range"),
    so nothing fires. Far in the future but within PostgreSQL: it never expires."""
    flags = [FlagRow(k, False, 0) for k in "abcd"]
    years = timedelta(days=365)
    rs = [
        recurrence(1, "a", "0 * * * *", {"enabled": True}, NOW + H, expires_after=-3000 * years),
        recurrence(2, "b", "0 * * * *", {"enabled": True}, NOW + H, expires_after=8000 * years),
        recurrence(3, "c", "0 * * * *", {"enabled": True}, NOW + H, expires_after=-7000 * years),
        recurrence(
            4, "d", "0 * * * *", {"enabled": True}, NOW + H, expires_after="-178000000 years"
        ),
    ]
    ahead = by_key(project(flags, [], rs, max_lateness=None, now=NOW, until=NOW + 2 * H))
    assert [s.outcome for s in ahead["a"].steps] == [Outcome.EXPIRES, Outcome.EXPIRES]
    assert ahead["a"].at == State(False, 0)
    assert [s.outcome for s in ahead["b"].steps] == [Outcome.APPLIES, Outcome.APPLIES]
    assert ahead["c"].steps == () and ahead["c"].at == State(False, 0)
    assert ahead["d"].steps == () and ahead["d"].at == State(False, 0)


def test_many_frequent_recurrences_share_one_bounded_number_of_occurrences() -> None:
    """200 flags each with a recurrence every minute, over a week: 2,000 occurrences each
    made 400,000 steps (26 s of cron arithmetic, over 500 MB). The projection lists a bounded
    number in all, and every flag's state at the horizon and at each schedule stays right."""
    flags = [FlagRow(f"f{i}", False, 0) for i in range(200)]
    every = [
        recurrence(i, f"f{i}", "* * * * *", {"enabled": True}, NOW + MINUTE) for i in range(200)
    ]
    offs = [schedule(1, "f7", NOW + timedelta(days=3), {"enabled": False, "rollout_percentage": 9})]
    ahead = by_key(
        project(flags, offs, every, max_lateness=None, now=NOW, until=NOW + timedelta(days=7))
    )
    assert sum(len(f.steps) for f in ahead.values()) <= MAX_TOTAL_OCCURRENCES + 3 * 200
    assert all(f.at == State(True, 0) for k, f in ahead.items() if k != "f7")
    assert ahead["f7"].at == State(True, 9)
    off = next(s for s in ahead["f7"].steps if s.schedule_id == 1)
    assert off.after == State(False, 9)


def test_agenda_lists_changes_of_one_flag_at_one_moment_in_the_order_they_apply() -> None:
    """Two overdue schedules whose ids run against their times (an application inserted
    the earlier one later), and an occurrence at the same moment as a schedule: the agenda
    lists them as the tick applies them ((scheduled_at, id); existing schedules before the
    occurrence made later), so its last line per flag is the state that remains."""
    flags = [FlagRow("f", False, 0)]
    rows = [
        schedule(9, "f", NOW - 2 * H, {"rollout_percentage": 10}),
        schedule(3, "f", NOW - H, {"rollout_percentage": 20}),
        schedule(1, "f", NOW + H, {"enabled": False}),
    ]
    on = [recurrence(1, "f", "0 * * * *", {"enabled": True}, NOW + H)]
    ahead = project(flags, rows, on, max_lateness=None, now=NOW, until=NOW + H)
    assert ahead[0].at == State(True, 20)
    listed = [(s.schedule_id, s.recurrence_id) for s in agenda(ahead, start=NOW)]
    assert listed == [(9, None), (3, None), (1, None), (None, 1)]
