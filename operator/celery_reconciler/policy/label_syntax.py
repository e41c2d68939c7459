"""Kubernetes label syntax, so a pod selector built from a spec can never smuggle ``,``,
``!=`` or ``(`` into a selector string (the kube client's label selectors use it too)."""

from __future__ import annotations

import re

# Kubernetes label syntax (apimachinery's IsQualifiedName / IsValidLabelValue): a key is an
# optional DNS-subdomain prefix and "/", then a name of at most 63 characters; a value is at
# most 63 characters, alphanumeric at both ends, or empty. The CRD says the same, so a key
# that could smuggle ",", "!=" or "(" into a selector string is refused at apply time.
LABEL_NAME_PATTERN = re.compile(r"^(?:[A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
LABEL_PREFIX_PATTERN = re.compile(
    r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$"
)
LABEL_VALUE_PATTERN = re.compile(r"^(?:(?:[A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
MAX_LABEL_PREFIX_LENGTH = 253


LABEL_KEY_HINT = (
    " (an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', '_' "
    "or '.', beginning and ending with a letter or digit)"
)
LABEL_VALUE_HINT = (
    " (at most 63 letters, digits, '-', '_' or '.', beginning and ending with a letter or "
    "digit, or empty)"
)


def is_label_key(key: object) -> bool:
    """A Kubernetes qualified name: ``[prefix/]name`` (``app``, ``app.kubernetes.io/name``)."""
    if not isinstance(key, str):
        return False
    prefix, slash, name = key.rpartition("/")
    if slash and (
        not prefix
        or len(prefix) > MAX_LABEL_PREFIX_LENGTH
        or not LABEL_PREFIX_PATTERN.fullmatch(prefix)
    ):
        return False
    return bool(LABEL_NAME_PATTERN.fullmatch(name))


def is_label_value(value: object) -> bool:
    """A Kubernetes label value: at most 63 characters, alphanumeric at both ends, or empty."""
    return isinstance(value, str) and bool(LABEL_VALUE_PATTERN.fullmatch(value))
