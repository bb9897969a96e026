"""Strict validation of a schedule's `updates`."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flagsched.model import MAX_TEXT, InvalidUpdates, Members, Updates, clip


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"enabled": True}, Updates(enabled=True)),
        ({"enabled": False}, Updates(enabled=False)),
        ({"rollout_percentage": 0}, Updates(rollout_percentage=0)),
        ({"rollout_percentage": 100}, Updates(rollout_percentage=100)),
        ({"enabled": True, "rollout_percentage": 50}, Updates(True, 50)),
        # One rule for numbers: an integral value 0..100, however it is spelled.
        ({"rollout_percentage": 50.0}, Updates(rollout_percentage=50)),
        ({"rollout_percentage": Decimal("50.000")}, Updates(rollout_percentage=50)),
        ({"rollout_percentage": Decimal("5E+1")}, Updates(rollout_percentage=50)),
        ({"rollout_percentage": 1e2}, Updates(rollout_percentage=100)),
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
        ({"rollout_percentage": Decimal("50.00000000000000000001")}, "got 50.00000000000000000001"),
        ({"rollout_percentage": 100.5}, "rollout_percentage must be an integer 0..100, got 100.5"),
        ({"rollout_percentage": Decimal("1E+400")}, "rollout_percentage must be an integer"),
        ({"rollout_percentage": 10**400}, "got a number of about 401 digits"),
        ({"enabled": [1, [2]]}, "enabled must be true or false, got an array of 2 item(s)"),
        ({"enabled": {"a": 1}}, "enabled must be true or false, got an object with 1 key(s)"),
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


APP = Members(enabled="isOn", rollout="rolloutPercentage")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"enabled": "yes"}, 'isOn must be true or false, got "yes"'),
        ({"rollout_percentage": 250}, "rolloutPercentage must be an integer 0..100, got 250"),
        ({}, "updates is empty; give isOn and/or rolloutPercentage"),
        ({"colour": "red"}, "updates has unknown key(s) colour; allowed: isOn, rolloutPercentage"),
    ],
)
def test_messages_name_the_members_as_the_schedules_table_writes_them(
    value: Any, message: str
) -> None:
    """On an application's schedules table `updates` is read under the built-in names, and
    every message names its members as that application writes them."""
    with pytest.raises(InvalidUpdates) as caught:
        Updates.parse(value, APP)
    assert str(caught.value) == message
    assert APP.no_rollout_column().startswith("updates sets rolloutPercentage, but the flags")
    assert APP.no_rollout_column().endswith("only isOn can be scheduled")


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
    rollout: Any = value.get("rollout_percentage")
    rollout_ok = "rollout_percentage" not in value or (
        type(rollout) in (int, float) and 0 <= rollout <= 100 and rollout == int(rollout)
    )
    valid = bool(value) and "x" not in value and enabled_ok and rollout_ok
    try:
        parsed = Updates.parse(value)
    except InvalidUpdates:
        assert not valid
    else:
        assert valid
        assert parsed.as_json() == value  # 50.0 == 50


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(value=json_values)
def test_never_crashes_on_any_json(value: Any) -> None:
    try:
        Updates.parse(value)
    except InvalidUpdates as exc:
        assert str(exc)


def test_a_value_too_deep_for_json_encoders_is_quoted_by_its_size() -> None:
    """Nesting in the band 990-1023 (orjson reads it, json.dumps recurses) never raises."""
    value: Any = True
    for _ in range(1000):
        value = [value]
    with pytest.raises(InvalidUpdates, match="got an array of 1 item"):
        Updates.parse({"enabled": value})


def test_huge_values_and_many_unknown_keys_give_a_short_reason() -> None:
    with pytest.raises(InvalidUpdates) as caught:
        Updates.parse({"enabled": "x" * 2_000_000})
    assert len(str(caught.value)) < 200
    many = {f"key{i}": i for i in range(100_000)}
    with pytest.raises(InvalidUpdates) as caught:
        Updates.parse(many)
    assert "and 99995 more" in str(caught.value) and len(str(caught.value)) < 300


@given(st.text(max_size=3000), st.integers(min_value=0, max_value=2000))
# hypothesis found it: a limit just past the note keeps one character of the text, so the
# first ten characters of the result are not the text's (the kept part still is a prefix)
@example(text="0" * 21, limit=20)
def test_clip_bounds_any_text(text: str, limit: int) -> None:
    clipped = clip(text, limit)
    if len(text) <= limit:
        assert clipped == text
    else:
        assert len(clipped) <= limit
        tail = f"... ({len(text)} characters)"
        kept = clipped.removesuffix(tail) if clipped.endswith(tail) else clipped
        assert text.startswith(kept)
    assert len(clip(text)) <= MAX_TEXT


def test_a_change_in_words_is_a_readable_line_not_a_dict() -> None:
    assert Updates(enabled=True, rollout_percentage=25).words() == "on, rollout 25%"
    assert Updates(enabled=False).words() == "off"
    assert Updates(rollout_percentage=0).words() == "rollout 0%"
