"""Strict validation of a schedule's `updates`."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagsched.model import InvalidUpdates, Updates


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"enabled": True}, Updates(enabled=True)),
        ({"enabled": False}, Updates(enabled=False)),
        ({"rollout_percentage": 0}, Updates(rollout_percentage=0)),
        ({"rollout_percentage": 100}, Updates(rollout_percentage=100)),
        ({"enabled": True, "rollout_percentage": 50}, Updates(True, 50)),
    ],
)
def test_valid_updates(value: Any, expected: Updates) -> None:
    assert Updates.parse(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"enabled": "yes"}, 'enabled must be true or false, got "yes"'),
        ({"enabled": 1}, "enabled must be true or false, got 1"),
        ({"enabled": None}, "enabled must be true or false, got null"),
        ({"rollout_percentage": 12.5}, "rollout_percentage must be an integer 0..100, got 12.5"),
        ({"rollout_percentage": 50.0}, "rollout_percentage must be an integer 0..100, got 50.0"),
        ({"rollout_percentage": "50"}, 'rollout_percentage must be an integer 0..100, got "50"'),
        ({"rollout_percentage": True}, "rollout_percentage must be an integer 0..100, got true"),
        ({"rollout_percentage": 101}, "rollout_percentage must be an integer 0..100, got 101"),
        ({"rollout_percentage": -1}, "rollout_percentage must be an integer 0..100, got -1"),
        ({}, "updates is empty"),
        ({"enabled": True, "colour": "red"}, "unknown key(s) colour"),
        ([{"enabled": True}], "updates must be a JSON object, got an array"),
        ("enabled", "updates must be a JSON object, got a string"),
        (None, "updates must be a JSON object, got null"),
        (42, "updates must be a JSON object, got a number"),
    ],
)
def test_invalid_updates_have_a_readable_reason(value: Any, message: str) -> None:
    with pytest.raises(InvalidUpdates, match=None) as caught:
        Updates.parse(value)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(value=st.dictionaries(st.sampled_from(["enabled", "rollout_percentage", "x"]), json_values))
def test_accepts_exactly_the_strict_shape(value: dict[str, Any]) -> None:
    enabled_ok = "enabled" not in value or isinstance(value["enabled"], bool)
    rollout = value.get("rollout_percentage")
    rollout_ok = "rollout_percentage" not in value or (type(rollout) is int and 0 <= rollout <= 100)
    valid = bool(value) and "x" not in value and enabled_ok and rollout_ok
    try:
        parsed = Updates.parse(value)
    except InvalidUpdates:
        assert not valid
    else:
        assert valid
        assert parsed.as_json() == value


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(value=json_values)
def test_never_crashes_on_any_json(value: Any) -> None:
    try:
        Updates.parse(value)
    except InvalidUpdates as exc:
        assert str(exc)


def test_later_changes_win_and_unset_fields_keep_earlier_ones() -> None:
    merged = Updates(enabled=True, rollout_percentage=10).then(Updates(rollout_percentage=50))
    assert merged == Updates(enabled=True, rollout_percentage=50)
    assert Updates().then(Updates(enabled=False)) == Updates(enabled=False)
