from __future__ import annotations

import pytest

from multilane.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("30s", 30.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1.5m", 90.0),
        ("2d", 172800.0),
        (" 10s ", 10.0),
        ("45", 45.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
        ("0", 0.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration_reads_units_and_plain_seconds(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [-1, "-1", -0.5, "-5m", float("-inf")])
def test_negative_duration_means_forever(value: str | float) -> None:
    assert parse_duration(value) is None


@pytest.mark.parametrize("value", ["", "abc", "5x", "m5", "1h-30m", "--1", "5 minutes", "nan"])
def test_invalid_duration_raises_value_error_naming_the_value(value: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


def test_bool_is_not_a_duration() -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(True)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "forever"),
        (0, "0s"),
        (0.25, "250ms"),
        (30, "30s"),
        (300, "5m"),
        (5400, "1h30m"),
        (3661.5, "1h1m1.5s"),
        (90000, "1d1h"),
    ],
)
def test_format_duration_writes_what_a_pipeline_file_would(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["250ms", "30s", "5m", "1h30m", "1d2h3m4s"])
def test_format_then_parse_round_trips(text: str) -> None:
    assert format_duration(parse_duration(text)) == text
