"""No output of any command shows a database or Pushgateway password, however it is spelled;
messages name the database by host, port and name, and alter no other text."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Ran, invoke

CLOSED = "127.0.0.1:1"  # nothing listens: connecting fails at once


def test_a_password_with_a_hash_is_not_printed_and_the_database_is_named() -> None:
    ran = invoke("process", url=f"postgresql://u:Hash#Secret99@{CLOSED}/db")
    assert ran.code == 3
    assert "Secret99" not in ran.stdout + ran.stderr
    assert ran.stderr.startswith("flagsched: error: could not connect to database db at ")
    assert "127.0.0.1:1 as u" in ran.stderr and ran.stderr.count("\n") == 1


def test_a_password_libpq_would_misread_is_a_configuration_error_not_quoted() -> None:
    for written in ("Pq/Zx", "Pq@Zx", "Pq%zzZx"):
        ran = invoke("process", url=f"postgresql://u:{written}@{CLOSED}/db")
        assert ran.code == 2, ran.stderr
        assert ran.stderr.startswith("flagsched: error: FLAGSCHED_DATABASE_URL: ")
        assert "percent-encode" in ran.stderr and ran.stderr.count("\n") == 1
        assert "Pq" not in ran.stderr + ran.stdout and "Zx" not in ran.stderr + ran.stdout


_passwords = st.text(st.characters(codec="utf-8", blacklist_characters="\x00"), min_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=_passwords, encode=st.booleans(), command=st.sampled_from(["process", "status"]))
def test_no_output_of_a_failing_connect_shows_the_password(
    password: str, encode: bool, command: str
) -> None:
    written = quote(password, safe="") if encode else password
    ran = invoke(command, url=f"postgresql://u:{written}@{CLOSED}/db")
    shown = ran.stdout + ran.stderr
    assert ran.code in (2, 3), shown  # a URL libpq would misread, or the closed port
    assert ran.stderr.count("\n") == 1 and "Traceback" not in shown
    baseline = invoke(command, url=f"postgresql://u:x@{CLOSED}/db").stderr
    for spelling in {password, written}:
        if spelling not in baseline and spelling not in "FLAGSCHED_DATABASE_URL":
            assert spelling not in shown


def test_a_short_password_leaves_flag_keys_in_the_log_readable(
    flagsched: Callable[..., Ran], database_url: str, add_flag: Any, add_schedule: Any
) -> None:
    add_flag("flag_key-1")
    add_schedule("flag_key-1", {"enabled": True})
    url = database_url.replace("postgres@", "postgres:flag@")  # trust auth ignores it
    ran = flagsched("process", url=url)
    assert ran.code == 0, ran.stderr
    applied = json.loads(ran.stderr.splitlines()[0])
    assert applied["event"] == "schedule_applied" and applied["flag_key"] == "flag_key-1"
    assert "***" not in ran.stderr


def test_a_pushgateway_password_is_not_in_its_warning(flagsched: Callable[..., Ran]) -> None:
    for gateway in (
        "http://push:Pw%23Secret@127.0.0.1:1/",
        "http://push:Pw#Secret@127.0.0.1:1/",
        "http://push:Pw/Secret@127.0.0.1:1/",
        "http://127.0.0.1:1/?token=PwSecret",
    ):
        ran = flagsched("process", "--pushgateway", gateway)
        assert ran.code == 0, ran.stderr
        warning = next(
            json.loads(line) for line in ran.stderr.splitlines() if "metrics_publish_failed" in line
        )
        assert "Secret" not in ran.stderr and "Pw" not in ran.stderr, gateway
        assert warning["pushgateway"].startswith("http://127.0.0.1:1/")


def test_a_server_message_quoting_a_short_password_by_chance_is_shown_whole(
    flagsched: Callable[..., Ran], database_url: str, sql: Any
) -> None:
    # A statement error the server words (the schema itself holds all flagsched uses).
    sql("ALTER TABLE feature_flag_schedules ADD CONSTRAINT flag_refused CHECK (false) NOT VALID")
    url = database_url.replace("postgres@", "postgres:flag@")
    ran = flagsched("schedule", "checkout", "--at", "now", "--enable", url=url)
    assert ran.code == 3
    assert 'relation "feature_flag_schedules" violates check constraint "flag_refused"' in (
        ran.stderr
    )
