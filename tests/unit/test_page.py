"""The agenda page without a database: escaping, and the atomic write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from flagsched import page, render
from flagsched.operators import Outlook
from flagsched.projection import agenda, project
from flagsched.rows import FlagRow, OpenSchedule

NOW = datetime(2026, 10, 24, 12, 0, tzinfo=UTC)  # the day before Europe/Berlin's fold


def _outlook(key: str, updates: object) -> Outlook:
    row = OpenSchedule(
        id=1, flag_key=key, scheduled_at=NOW + timedelta(hours=5), updates=updates,
        status="pending", next_retry_at=None, expires_at=None, reviewed_at=None, group_id=None,
        recurrence_id=None, waiting=False, last_error=None, defect=None,
    )  # fmt: skip
    end = NOW + timedelta(days=7)
    flags = project([FlagRow(key, False, 0)], [row], [], max_lateness=None, now=NOW, until=end)
    return Outlook(now=NOW, start=NOW, until=end, flags=flags, failed=[])


def test_stored_values_are_text_on_the_page() -> None:
    key = '"><script>alert(1)</script><x y="'
    seen = _outlook(key, {"rollout_percentage": Decimal("1E+400"), "<b>": "</title>"})
    html = page.render(seen, agenda(seen.flags, start=NOW), zone=ZoneInfo("Europe/Berlin"))
    assert "<script" not in html
    assert html.count("<title") == html.count("</title>")  # a stored `</title>` is text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'data-flag-key="&#34;&gt;&lt;script&gt;' in html
    # times in the chosen zone, across the fold of 25 October
    assert "2026-10-24T19:00:00+02:00" in html
    assert "Sun 25 Oct" in html and "Mon 26 Oct" in html
    assert " src=" not in html and " href=" not in html and "url(" not in html  # loads nothing


def test_the_page_is_replaced_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "agenda.html"
    target.write_text("the old page")
    seen = _outlook("f", {"enabled": True})

    def broken(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken)
    with pytest.raises(OSError):
        page.write(target, seen, agenda(seen.flags, start=NOW), zone=None)
    assert target.read_text() == "the old page"
    assert [p.name for p in tmp_path.iterdir()] == ["agenda.html"]  # no temporary file left
    monkeypatch.undo()
    page.write(target, seen, agenda(seen.flags, start=NOW), zone=None)
    assert target.read_text().startswith("<!DOCTYPE html>")
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # readable by a web server


def test_compact_shows_exact_numbers_and_deep_values_briefly() -> None:
    fraction = {"rollout_percentage": Decimal("12.5")}
    assert render.compact(fraction, 60) == '{"rollout_percentage":12.5}'
    assert render.compact("x" * 100, 60) == "x" * 57 + "..."
    deep: list[object] = []
    for _ in range(100):
        deep = [deep]
    assert "nested" in render.compact(deep, 60)
