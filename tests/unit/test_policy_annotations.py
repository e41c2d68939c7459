"""Annotations are read as untrusted input: what is acted on, what is refused and how it shows."""

from __future__ import annotations

import json

import pytest

from celery_reconciler import policy_annotations as annotations


@pytest.mark.parametrize("value", ["", "all", " * ", "*"])
def test_all_dead_entries(value: str) -> None:
    assert annotations.parse_retry_dead(value).entry_ids is None


def test_ids_are_split_stripped_and_deduplicated_in_order() -> None:
    request = annotations.parse_retry_dead(" 7, 3 ,7,,a-b ")
    assert request.entry_ids == ("7", "3", "a-b")


@pytest.mark.parametrize(
    "value",
    ["7\x00", "\x00", "1,\x1b[31m2", "\x7f", "a\x08b", "\x01,2"],
)
def test_control_characters_are_refused_and_shown_escaped(value: str) -> None:
    with pytest.raises(annotations.InvalidAnnotation) as refused:
        annotations.parse_retry_dead(value)
    message = str(refused.value)
    assert annotations.RETRY_DEAD in message
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in message)


def test_an_id_longer_than_the_bound_is_refused_and_cut_short_in_the_message() -> None:
    with pytest.raises(annotations.InvalidAnnotation) as refused:
        annotations.parse_retry_dead("1," + "x" * 5000)
    assert len(str(refused.value)) < 300


def test_a_request_over_the_size_bound_is_refused() -> None:
    ids = ",".join(str(n) for n in range(20_000))
    assert len(ids) > annotations.MAX_RETRY_DEAD_BYTES
    with pytest.raises(annotations.InvalidAnnotation, match="longer than"):
        annotations.parse_retry_dead(ids)


def test_only_separators_name_no_id() -> None:
    with pytest.raises(annotations.InvalidAnnotation, match="names no entry id"):
        annotations.parse_retry_dead(" , ,")


@pytest.mark.parametrize("value", [None, "{}", json.dumps({"spec": {"a": 1}}) + "\n"])
def test_a_diff_base_kopf_could_have_written_is_fine(value: str | None) -> None:
    assert annotations.diffbase_problem(value) is None


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", "null", "7", "\x00"])
def test_a_diff_base_that_is_not_a_json_object_is_a_problem_naming_it(value: str) -> None:
    problem = annotations.diffbase_problem(value)
    assert problem is not None and annotations.DIFFBASE in problem
