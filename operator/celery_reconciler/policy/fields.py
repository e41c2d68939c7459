"""The field readers every section of the spec is parsed with: each checks one value, records
a ``Problem`` with its field path when the value is wrong, and returns a usable fallback, so
parsing goes on and the user sees every problem of the spec at once, not the first one.

Identifiers are only validated here (``^[A-Za-z_][A-Za-z0-9_]{0,62}$`` per part); they are
always quoted later with ``psycopg.sql.Identifier``, so MixedCase names work and nothing is
ever concatenated into SQL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from celery_reconciler.policy import durations, records

IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class FieldReader:
    """Collects problems instead of stopping at the first one."""

    def __init__(self) -> None:
        self.problems: list[records.Problem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(records.Problem(path, message))

    # --- generic field readers: each returns a usable fallback after recording a problem

    def mapping(self, value: Any, path: str, *, allowed: Sequence[str]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(path, f"must be an object, got {describe(value)}")
            return {}
        for key in value:
            if key not in allowed:
                self.problem(
                    f"{path}.{key}", f"unknown field; known fields are {', '.join(allowed)}"
                )
        return value

    def identifier(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not IDENTIFIER_PATTERN.fullmatch(value):
            self.problem(
                path,
                f"{describe(value)} is not a SQL identifier; use letters, digits and "
                "underscores, starting with a letter or underscore, at most 63 characters",
            )
            return "invalid"
        return value

    def duration(self, value: Any, path: str, *, maximum_seconds: float) -> float:
        try:
            seconds = durations.parse_duration_seconds(value)
        except durations.InvalidDuration as error:
            self.problem(path, str(error))
            return 1.0
        if seconds <= 0:
            self.problem(path, f"{value!r} must be positive")
            return 1.0
        if seconds > maximum_seconds:
            self.problem(path, f"{value!r} is longer than the maximum {_hours(maximum_seconds)}")
            return maximum_seconds
        return seconds

    def integer(self, value: Any, path: str, *, minimum: int, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(path, f"must be an integer, got {describe(value)}")
            return minimum
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.problem(path, f"{value} is out of range; it must be {bound}")
            return minimum
        return value

    def number(self, value: Any, path: str, *, minimum: float, maximum: float) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.problem(path, f"must be a number, got {describe(value)}")
            return minimum
        if not minimum <= value <= maximum:
            self.problem(
                path, f"{value} is out of range; it must be between {minimum:g} and {maximum:g}"
            )
            return minimum
        return float(value)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.problem(path, f"must be true or false, got {describe(value)}")
            return False
        return value

    def secret_ref(
        self, value: Any, path: str, *, default_key: str, required: bool
    ) -> records.SecretRef | None:
        if value is None:
            if required:
                self.problem(path, f"is required: {{name: <secret>, key: {default_key}}}")
            return None
        ref = self.mapping(value, path, allowed=("name", "key"))
        secret_name = ref.get("name")
        if not isinstance(secret_name, str) or not secret_name:
            self.problem(f"{path}.name", "is required: the name of a Secret in this namespace")
            secret_name = "invalid"
        key = ref.get("key", default_key)
        if not isinstance(key, str) or not key:
            self.problem(f"{path}.key", f"must be a non-empty string, got {describe(key)}")
            key = default_key
        return records.SecretRef(name=secret_name, key=key)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g}h"


def describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:77] + "...")
    if isinstance(value, bool | int | float):
        return repr(value)
    return f"a {type(value).__name__}"
