"""``spec.workers``: which pods run the task (their restarts orphan the leases they held), and
how long a dispatched entry may wait for one of them to start it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery_reconciler.policy import fields, label_syntax, records

SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
DEFAULT_START_TIMEOUT = "3m"
MAX_START_TIMEOUT_SECONDS = 24 * 3600.0


def parse(value: Any, *, reader: fields.FieldReader) -> records.Workers:
    path = "spec.workers"
    raw = reader.mapping(value, path, allowed=("podSelector", "startTimeout"))
    start_timeout = reader.duration(
        raw.get("startTimeout", DEFAULT_START_TIMEOUT),
        f"{path}.startTimeout",
        maximum_seconds=MAX_START_TIMEOUT_SECONDS,
    )
    selector = reader.mapping(
        raw.get("podSelector"),
        f"{path}.podSelector",
        allowed=("matchLabels", "matchExpressions"),
    )
    if "podSelector" in raw and not (
        selector.get("matchLabels") or selector.get("matchExpressions")
    ):
        reader.problem(
            f"{path}.podSelector",
            "is empty, which would select every pod in the namespace; give matchLabels "
            "or matchExpressions of the worker pods, or leave workers out",
        )
    labels: list[tuple[str, str]] = []
    match_labels = selector.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        reader.problem(f"{path}.podSelector.matchLabels", "must be a map of label: value")
        match_labels = {}
    for key, label_value in match_labels.items():
        label_path = f"{path}.podSelector.matchLabels[{fields.describe(key)}]"
        if not label_syntax.is_label_key(key):
            reader.problem(
                label_path,
                f"{fields.describe(key)} is not a label key{label_syntax.LABEL_KEY_HINT}",
            )
        elif not label_syntax.is_label_value(label_value):
            reader.problem(
                label_path,
                f"{fields.describe(label_value)} is not a label value"
                f"{label_syntax.LABEL_VALUE_HINT}",
            )
        else:
            labels.append((key, label_value))
    expressions: list[records.LabelSelectorRequirement] = []
    raw_expressions = selector.get("matchExpressions") or []
    if not isinstance(raw_expressions, list):
        reader.problem(f"{path}.podSelector.matchExpressions", "must be a list")
        raw_expressions = []
    for index, item in enumerate(raw_expressions):
        requirement = selector_requirement(
            item, reader=reader, path=f"{path}.podSelector.matchExpressions[{index}]"
        )
        if requirement is not None:
            expressions.append(requirement)
    return records.Workers(
        match_labels=tuple(sorted(labels)),
        match_expressions=tuple(expressions),
        start_timeout_seconds=start_timeout,
    )


def selector_requirement(
    value: Any, *, reader: fields.FieldReader, path: str
) -> records.LabelSelectorRequirement | None:
    expression = reader.mapping(value, path, allowed=("key", "operator", "values"))
    key = expression.get("key")
    operator = expression.get("operator")
    values = expression.get("values") or []
    problems_before = len(reader.problems)
    if not label_syntax.is_label_key(key):
        reader.problem(
            f"{path}.key", f"{fields.describe(key)} is not a label key{label_syntax.LABEL_KEY_HINT}"
        )
    if operator not in SELECTOR_OPERATORS:
        reader.problem(f"{path}.operator", f"must be one of {', '.join(SELECTOR_OPERATORS)}")
    if not isinstance(values, list):
        reader.problem(f"{path}.values", "must be a list of label values")
        values = []
    for position, item in enumerate(values):
        if not label_syntax.is_label_value(item):
            reader.problem(
                f"{path}.values[{position}]",
                f"{fields.describe(item)} is not a label value{label_syntax.LABEL_VALUE_HINT}",
            )
    if operator in ("In", "NotIn") and not values:
        reader.problem(f"{path}.values", f"must not be empty for operator {operator}")
    if operator in ("Exists", "DoesNotExist") and values:
        reader.problem(f"{path}.values", f"must be empty for operator {operator}")
    if len(reader.problems) != problems_before:
        return None
    return records.LabelSelectorRequirement(
        key=str(key), operator=str(operator), values=tuple(values)
    )
