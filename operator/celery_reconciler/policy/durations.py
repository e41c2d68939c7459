"""Go-style durations (``90s``, ``5m``, ``1h30m``, ``250ms``), the way Kubernetes users write
them in a spec: the one parser behind every duration field and the CLI's."""

from __future__ import annotations

import re

# [0-9], not \d: \d also matches other scripts' digits, which float() would then accept.
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class InvalidDuration(ValueError):
    """A duration string is not Go-style (``90s``, ``5m``, ``1h30m``, ``250ms``)."""


def parse_duration_seconds(text: str) -> float:
    """Parse a Go-style duration (``90s``, ``5m``, ``1h30m``, ``250ms``, ``-5m``) to seconds.

    Negative durations parse (so the caller can say "must be positive" rather than "bad
    syntax"); a bare number without a unit is rejected because ``300`` is ambiguous.
    """
    if not isinstance(text, str):
        raise InvalidDuration(f'{text!r} is not a duration string; write e.g. "90s" or "5m"')
    body = text.strip()
    sign = 1.0
    if body and body[0] in "+-":
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    position = 0
    total = 0.0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        if match is None:
            break
        total += float(match.group(1)) * _DURATION_UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not body or position != len(body):
        raise InvalidDuration(
            f"{text!r} is not a duration; write a number with a unit (ns, us, ms, s, m, h), "
            'e.g. "90s", "5m", "1h30m" or "250ms"'
        )
    return sign * total
