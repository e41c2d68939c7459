"""Logging set-up: plain or JSON lines, a last line of defence against leaked secrets, and
levels that mean what an operator on call expects (``KopfRetriesAreWarnings``).

Secrets are kept out of messages where they are built (errors name hosts and Secret names,
never DSNs). The ``RedactSecrets`` filter still rewrites any ``scheme://user:password@``
userinfo and ``password=...`` pair in every record — including third-party libraries' — so a
slip anywhere cannot put a password into a log line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
_KEYWORD_PASSWORD = re.compile(r"(?i)(?P<key>password|passwd|pwd)\s*=\s*(?:'[^']*'|\"[^\"]*\"|\S+)")


def redact(text: str) -> str:
    """Mask passwords: ``redis://:pw@host`` -> ``redis://:***@host``, ``password=pw`` -> ``***``."""
    text = _URL_USERINFO.sub(r"\g<scheme>\g<user>:***@", text)
    return _KEYWORD_PASSWORD.sub(r"\g<key>=***", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class KopfRetriesAreWarnings(logging.Filter):
    """kopf logs each failed attempt of a request it will retry at ERROR — say, HTTP 429
    "storage is (re)initializing" while a freshly started apiserver warms up — and most such
    retries succeed by themselves. An ERROR is what pages a person on call, so a retry is a
    WARNING here; the last attempt ("escalating") stays an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno == logging.ERROR
            and record.name.startswith("kopf.")
            and "failed; will retry" in record.getMessage()
        ):
            record.levelno, record.levelname = (
                logging.WARNING,
                logging.getLevelName(logging.WARNING),
            )
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"fields": {...}}`` adds structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def configure(*, json_logs: bool, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactSecrets())
    handler.addFilter(KopfRetriesAreWarnings())
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("kubernetes.client.rest", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
