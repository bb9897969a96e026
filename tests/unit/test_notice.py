"""The change notice's payload: pure, bounded by PostgreSQL's NOTIFY limit."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from flagsched.model import NOTIFY_LIMIT, change_notice


def test_no_change_no_notice() -> None:
    assert change_notice([]) is None


def test_keys_sorted_and_once() -> None:
    assert json.loads(change_notice(["b", "a", "b"]) or "") == {"flags": ["a", "b"]}


def test_keys_that_would_not_fit_become_null() -> None:
    keys = [f"flag-{i:05d}" for i in range(1000)]
    assert json.loads(change_notice(keys) or "") == {"flags": None}


@given(st.lists(st.text(min_size=1, max_size=300), min_size=1, max_size=60))
def test_payload_always_fits_and_names_every_key_or_none(keys: list[str]) -> None:
    payload = change_notice(keys)
    assert payload is not None and len(payload.encode()) < NOTIFY_LIMIT
    flags = json.loads(payload)["flags"]
    assert flags is None or flags == sorted(set(keys))
