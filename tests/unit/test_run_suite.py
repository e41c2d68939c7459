"""The suite runner's pure parts: how a layer is cut into shards and how shards add up.

A bad split costs the whole suite its wall time (the slowest shard decides), and a bad merge
could hide a failed shard: both are checked here without running any pytest.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]


def _load_run_suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_suite", ROOT / "scripts" / "run_suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module runs.
    sys.modules.setdefault("run_suite", module)
    spec.loader.exec_module(module)
    return module


run_suite = _load_run_suite()

weights_strategy = st.dictionaries(
    st.text(alphabet="abcdefgh", min_size=1, max_size=6).map(lambda n: f"tests/e2e/test_{n}.py"),
    st.floats(min_value=0.0, max_value=500.0, allow_nan=False),
    min_size=1,
    max_size=30,
)


@given(weights=weights_strategy, shards=st.integers(min_value=1, max_value=6))
def test_every_file_lands_in_exactly_one_shard(weights: dict[str, float], shards: int) -> None:
    groups = run_suite.balance(weights, shards)
    placed = [f for group in groups for f in group]
    assert sorted(placed) == sorted(weights)
    assert 1 <= len(groups) <= shards
    assert all(groups)


@given(weights=weights_strategy, shards=st.integers(min_value=2, max_value=6))
def test_the_slowest_shard_is_within_one_file_of_a_perfect_split(
    weights: dict[str, float], shards: int
) -> None:
    # The greedy rule's known bound: the heaviest shard exceeds the mean by at most one file.
    groups = run_suite.balance(weights, shards)
    loads = [sum(weights[f] for f in group) for group in groups]
    assert max(loads) <= sum(weights.values()) / shards + max(weights.values()) + 1e-6


def test_the_split_is_the_same_every_run_and_puts_heavy_files_apart() -> None:
    weights = {"a.py": 100.0, "b.py": 90.0, "c.py": 10.0, "d.py": 10.0, "e.py": 5.0}
    first = run_suite.balance(weights, 2)
    assert first == run_suite.balance(dict(reversed(list(weights.items()))), 2)
    assert first == [["a.py", "d.py"], ["b.py", "c.py", "e.py"]]


def test_a_selection_of_single_tests_is_never_cut_apart() -> None:
    chosen = ["tests/e2e/test_cli.py::test_x", "tests/e2e/test_demo.py"]
    jobs = run_suite.layer_jobs("e2e", chosen=chosen, shards=3, durations={})
    assert [job.tests for job in jobs] == [tuple(chosen)]
    whole = run_suite.layer_jobs("e2e", chosen=["tests/e2e"], shards=3, durations={})
    assert [job.name for job in whole] == ["e2e"]


def test_a_whole_layer_is_cut_by_file_and_names_each_shard() -> None:
    jobs = run_suite.layer_jobs("e2e", chosen=[], shards=3, durations={})
    assert [job.name for job in jobs] == ["e2e[1/3]", "e2e[2/3]", "e2e[3/3]"]
    files = sorted(f for job in jobs for f in job.tests)
    assert files == run_suite.test_files("e2e")


def test_a_failed_shard_fails_its_layer_and_the_layer_took_its_slowest_shard() -> None:
    ok = run_suite.Outcome(name="e2e[1/2]", seconds=300.0, passed=10, ran=True)
    broken = run_suite.Outcome(
        name="e2e[2/2]",
        seconds=200.0,
        returncode=1,
        passed=4,
        failed=1,
        ran=True,
        failures=["tests/e2e/test_x.py::test_y"],
    )
    layer = run_suite.merge("e2e", [ok, broken])
    assert (layer.name, layer.seconds, layer.passed, layer.failed) == ("e2e", 300.0, 14, 1)
    assert not layer.ok
    assert layer.failures == ["tests/e2e/test_x.py::test_y"]


@pytest.mark.parametrize("text", ["e2e", "e2e=0", "nope=2", "e2e=x"])
def test_a_bad_shard_option_is_refused(text: str) -> None:
    with pytest.raises(Exception, match="LAYER=N"):
        run_suite.parse_shards(text)


def test_an_interrupted_shards_report_fails_its_layer_instead_of_crashing_the_runner(
    tmp_path: Path,
) -> None:
    # What pytest writes for an error outside any test (an interrupt, a collection error):
    # a test case with an empty classname. The runner once raised on it and lost every
    # other shard's result.
    report = tmp_path / "e2e-2-of-3.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.e2e.test_cli" name="test_help" time="1.5"/>'
        '<testcase classname="" name="tests/e2e/test_demo.py" time="0">'
        '<error message="KeyboardInterrupt"/></testcase>'
        "</testsuite></testsuites>"
    )
    outcome = run_suite.Outcome(name="e2e[2/3]", returncode=2, ran=True)
    run_suite.read_junit(outcome, report)
    assert (outcome.passed, outcome.failed) == (1, 1)
    assert outcome.failures == ["tests/e2e/test_demo.py"]
    assert not outcome.ok


def test_chosen_tests_select_their_layers_in_order_and_no_choice_selects_every_layer() -> None:
    layers = ["unit", "integration", "e2e", "chaos"]
    chosen = ["tests/e2e/test_demo.py", "tests/unit/test_policy.py::test_x"]
    assert run_suite.select_tests(layers, chosen) == {
        "unit": ["tests/unit/test_policy.py::test_x"],
        "e2e": ["tests/e2e/test_demo.py"],
    }
    assert run_suite.select_tests(layers, []) == {layer: [] for layer in layers}


def test_a_figure_replaces_its_own_kinds_line_and_keeps_the_others() -> None:
    empty = f"intro\n{run_suite.FIGURES_BEGIN}\n{run_suite.FIGURES_END}\nafter\n"
    warm = run_suite.with_figure(empty, "- **warm**: 1200 s", cold=False)
    both = run_suite.with_figure(warm, "- **cold**: 2700 s", cold=True)
    again = run_suite.with_figure(both, "- **warm**: 1100 s", cold=False)
    block = again.split(run_suite.FIGURES_BEGIN)[1].split(run_suite.FIGURES_END)[0]
    assert block.strip().splitlines() == ["- **cold**: 2700 s", "- **warm**: 1100 s"]
    assert again.startswith("intro\n") and again.endswith("\nafter\n")


def test_a_text_without_the_figures_block_is_left_alone() -> None:
    assert run_suite.with_figure("no block\n", "- **warm**: 1 s", cold=False) == "no block\n"
