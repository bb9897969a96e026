"""Rendering without a database: any value a row can hold is shown, as valid JSON."""

from __future__ import annotations

import json
from decimal import Decimal

from flagsched import render


def test_exact_numbers_are_numbers_and_those_python_cannot_hold_are_their_text() -> None:
    big_fraction = Decimal("1" + "0" * 5000 + ".5")  # what jsonb writes for 1e5000 + 0.5
    values = [Decimal("12.5"), Decimal("50"), Decimal("1E-5000"), big_fraction]
    text = render.to_json({"updates": values})
    shown = json.loads(text, parse_constant=lambda c: c)  # Infinity or NaN would stay text
    assert shown["updates"][:3] == [12.5, 50, "1E-5000"]
    assert shown["updates"][3] == str(big_fraction)
    assert render.compact({"x": Decimal("12.5")}) == '{"x":12.5}'


def test_a_cell_too_deep_is_a_note_and_long_text_is_cut() -> None:
    deep: list[object] = []
    for _ in range(render.MAX_DEPTH + 5):
        deep = [deep]
    assert render.compact(deep) == f"(nested {render.MAX_DEPTH + 6} levels deep: not shown)"
    assert render.compact({"enabled": "x" * 100}, width=20) == '{"enabled":"xxxxx...'


def test_a_flags_unset_values_are_words_never_none() -> None:
    # an application's nullable enabled / rollout columns (your own tables) may hold NULL
    assert render.flag_values(True, 25) == "on 25%"
    assert render.flag_values(False, 0) == "off 0%"
    assert render.flag_values(None, 5) == "enabled unset, 5%"
    assert render.flag_values(True, None) == "on, rollout unset"
    assert render.flag_values(None, None) == "enabled unset, rollout unset"
