"""The annotation class of the hostile corpus (``tests/e2e/hostile_corpus.ANNOTATION_CASES``)
against the operator's own validation: what it acts on and what it removes with a Warning
Event. The loop's handling of a removed one (the Event, the policy sweeping on) is
``tests/e2e/test_hostile_annotations.py``."""

from __future__ import annotations

import pytest

from celery_reconciler import policy_annotations
from tests.e2e.hostile_corpus import ANNOTATION_CASES, AnnotationCase


def acted_on(case: AnnotationCase) -> bool:
    if case.key == policy_annotations.RETRY_DEAD:
        try:
            policy_annotations.parse_retry_dead(case.value)
        except policy_annotations.InvalidAnnotation as error:
            assert policy_annotations.RETRY_DEAD in str(error)  # the Event names it
            assert "\x00" not in str(error) and "\x1b" not in str(error)
            return False
        return True
    assert case.key == policy_annotations.DIFFBASE
    problem = policy_annotations.diffbase_problem(case.value)
    assert problem is None or policy_annotations.DIFFBASE in problem
    return problem is None


@pytest.mark.parametrize("case", ANNOTATION_CASES, ids=lambda case: case.name)
def test_each_hostile_annotation_is_acted_on_or_removed_as_the_corpus_says(
    case: AnnotationCase,
) -> None:
    assert acted_on(case) == (case.expect == "acted on")
