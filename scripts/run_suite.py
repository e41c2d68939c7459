#!/usr/bin/env python3
"""Runs the test suite layer by layer and says where its time goes.

`make test`, `make check` and `make flake` all come here, so that every run of the suite
measures itself the same way: set-up, lint, then one pytest process per layer (unit,
integration, e2e, chaos), each with ``--durations`` and a JUnit report. Each layer's pytest
starts its own session servers (PostgreSQL, Redis, RabbitMQ, apiserver, node on free ports),
so layers never share a server and may run side by side (``SUITE_PARALLEL``). A layer may
also be cut into shards (``SUITE_SHARDS``, e.g. ``e2e=3``): each shard is a pytest process of
its own, with its own servers, over a share of the layer's test files balanced by the time each
file took in the last run of whole layers (``tests/durations.json``, which every such run
rewrites). Most of the integration and e2e time is waiting on servers and workers, not CPU,
so shards side by side cut the wall time on a 2-core machine too.

At the end it prints the slowest tests across all layers, one line with the wall time of
set-up, lint and each layer, and one plain ``suite: N passed, N failed`` line (a failed test,
an error, or a layer whose pytest exited non-zero without a report counts as failed); it
exits non-zero if anything failed. A full ``make test`` (every layer, no test selection) also
writes ``docs/suite-timings.md``, the figures docs/development.md points to: never type them.

Standard library only: it runs before ``.venv`` exists (set-up is one of its phases).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = ROOT / ".venv" / "bin" / "pytest"
TIMINGS_FILE = ROOT / "docs" / "suite-timings.md"
# The cold and the warm figure of the last full runs, kept in a block of the developers' guide
# that only this script writes: each run replaces the line of its own kind.
FIGURES_FILE = ROOT / "docs" / "development.md"
FIGURES_BEGIN = "<!-- suite figures: written by scripts/run_suite.py, do not edit -->"
FIGURES_END = "<!-- end of suite figures -->"
DURATIONS_FILE = ROOT / "tests" / "durations.json"
# a test file no run of whole layers has timed yet weighs this many seconds per test function in it
UNTIMED_SECONDS_PER_TEST = 15.0
LAYERS = ("unit", "integration", "e2e", "chaos")
SLOWEST = 30


@dataclasses.dataclass
class Outcome:
    """One phase's result: its wall time, and for a pytest layer what its report counted."""

    name: str
    seconds: float = 0.0
    returncode: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    durations: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    ran: bool = False
    # CPU seconds (user + system) of the phase's process and the descendants it reaped: with
    # the wall time, it says whether running more side by side can still help on this machine.
    cpu_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.ran and self.returncode == 0 and self.failed == 0


def run_phase(name: str, argv: list[str], *, log: Path | None = None) -> Outcome:
    """Runs one command; its output goes to our stdout, or to ``log`` when phases run side by
    side (printed whole once it ends, so two layers' lines never interleave)."""
    started = time.monotonic()
    with log.open("wb") if log is not None else contextlib.nullcontext() as out:
        process = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT if out else None
        )
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    return Outcome(
        name=name,
        seconds=time.monotonic() - started,
        returncode=process.returncode,
        ran=True,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
    )


def read_junit(outcome: Outcome, report: Path) -> None:
    """Counts from pytest's JUnit report: tests, failures (errors included), skips, and each
    test's total time (set-up, call and tear-down)."""
    if not report.exists():
        if outcome.returncode not in (0, 5):  # 5: no test selected, not a failure here
            outcome.failed += 1
            outcome.failures.append(f"{outcome.name}: pytest exited {outcome.returncode}")
        return
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = test_path(case.get("classname", ""), case.get("name", ""))
        outcome.durations.append((float(case.get("time") or 0.0), test_id))
        if case.find("failure") is not None or case.find("error") is not None:
            outcome.failed += 1
            outcome.failures.append(test_id)
        elif case.find("skipped") is not None:
            outcome.skipped += 1
        else:
            outcome.passed += 1
    if outcome.returncode not in (0, 1, 5) and outcome.failed == 0:
        # interrupted, internal error or usage error: the report is not the whole story
        outcome.failed += 1
        outcome.failures.append(f"{outcome.name}: pytest exited {outcome.returncode}")


def test_path(classname: str, name: str) -> str:
    """pytest's id (``tests/e2e/test_x.py::Class::test``) from the report's dotted classname;
    an error outside any test (an interrupt, a collection error) has none: its name alone."""
    parts = [part for part in classname.split(".") if part]
    if not parts:
        return name
    for cut in range(len(parts), 0, -1):
        module = Path(*parts[:cut]).with_suffix(".py")
        if (ROOT / module).exists():
            return "::".join([module.as_posix(), *parts[cut:], name])
    return f"{classname}::{name}"


@dataclasses.dataclass(frozen=True)
class Job:
    """One pytest process: a layer, or one shard of it (its own servers either way)."""

    layer: str
    tests: tuple[str, ...]  # empty: the whole layer
    shard: int = 1
    shards: int = 1

    @property
    def name(self) -> str:
        return self.layer if self.shards == 1 else f"{self.layer}[{self.shard}/{self.shards}]"

    @property
    def file_stem(self) -> str:
        return self.layer if self.shards == 1 else f"{self.layer}-{self.shard}-of-{self.shards}"


def pytest_job(job: Job, *, extra: list[str], reports: Path, log: Path | None) -> Outcome:
    report = reports / f"{job.file_stem}.xml"
    report.unlink(missing_ok=True)
    argv = [
        str(PYTEST),
        *(job.tests or [f"tests/{job.layer}"]),
        f"--durations={SLOWEST}",
        f"--junitxml={report}",
        "-o",
        "junit_family=xunit2",
        *extra,
    ]
    print(f"suite: {job.name}: {shlex.join(argv[1:])}", flush=True)
    outcome = run_phase(job.name, argv, log=log)
    read_junit(outcome, report)
    return outcome


def in_layer(test: str, layer: str) -> bool:
    return test.rstrip("/") == f"tests/{layer}" or test.startswith(f"tests/{layer}/")


def test_files(layer: str) -> list[str]:
    found = (ROOT / "tests" / layer).glob("test_*.py")
    return sorted(path.relative_to(ROOT).as_posix() for path in found)


def file_weight(test_file: str, durations: dict[str, float]) -> float:
    """Seconds the file took in the last run of whole layers; for a file never timed, an
    estimate from how many tests it defines (parametrised ones count once: an estimate, not
    a measure)."""
    if test_file in durations:
        return durations[test_file]
    text = (ROOT / test_file).read_text(encoding="utf-8", errors="replace")
    count = sum(
        1 for line in text.splitlines() if line.startswith(("def test_", "async def test_"))
    )
    return UNTIMED_SECONDS_PER_TEST * max(count, 1)


def balance(weights: dict[str, float], shards: int) -> list[list[str]]:
    """Splits files into at most ``shards`` groups whose summed weights are as even as the
    greedy rule makes them: heaviest file first, each to the lightest group so far. Ties go
    to the lower group and files are named in order, so the split is the same every run."""
    groups: list[list[str]] = [[] for _ in range(max(shards, 1))]
    loads = [0.0] * len(groups)
    for test_file in sorted(weights, key=lambda f: (-weights[f], f)):
        lightest = loads.index(min(loads))
        groups[lightest].append(test_file)
        loads[lightest] += weights[test_file]
    return [sorted(group) for group in groups if group]


def layer_jobs(
    layer: str, *, chosen: list[str], shards: int, durations: dict[str, float]
) -> list[Job]:
    """A layer's pytest processes. Only whole files are cut apart (a module's fixtures stay
    in one process); a selection of single tests, or of fewer files than shards, stays one."""
    files = chosen or test_files(layer)
    if shards <= 1 or len(files) < 2 or any("::" in t or not t.endswith(".py") for t in files):
        return [Job(layer=layer, tests=tuple(chosen))]
    groups = balance({f: file_weight(f, durations) for f in files}, shards)
    return [
        Job(layer=layer, tests=tuple(group), shard=number, shards=len(groups))
        for number, group in enumerate(groups, start=1)
    ]


def stages(layers: list[str], parallel: bool) -> list[list[str]]:
    """The order layers run in. Side by side, the layers that mostly wait (integration, e2e)
    overlap, each with its own servers; chaos, which loads the machine on purpose and restarts
    its servers, runs alone after them, as does unit (seconds, and first to fail fast)."""
    if not parallel:
        return [[layer] for layer in layers]
    together = [layer for layer in layers if layer in ("integration", "e2e")]
    result: list[list[str]] = []
    for layer in layers:
        if layer in together:
            if together not in result:
                result.append(together)
        else:
            result.append([layer])
    return result


def merge(layer: str, outcomes: list[Outcome]) -> Outcome:
    """A layer's outcome from its shards': counts add up, its wall time is the longest one's
    (they ran side by side)."""
    if len(outcomes) == 1:
        return outcomes[0]
    return Outcome(
        name=layer,
        seconds=max(o.seconds for o in outcomes),
        returncode=max(o.returncode for o in outcomes),
        passed=sum(o.passed for o in outcomes),
        failed=sum(o.failed for o in outcomes),
        skipped=sum(o.skipped for o in outcomes),
        failures=[f for o in outcomes for f in o.failures],
        durations=[d for o in outcomes for d in o.durations],
        ran=all(o.ran for o in outcomes),
        cpu_seconds=sum(o.cpu_seconds for o in outcomes),
    )


def run_layers(
    layers: list[str],
    *,
    parallel: bool,
    shards: dict[str, int],
    selection: dict[str, list[str]],
    extra: list[str],
    reports: Path,
) -> list[Outcome]:
    durations = read_durations()
    outcomes: list[Outcome] = []
    for stage in stages(layers, parallel):
        jobs = {
            layer: layer_jobs(
                layer,
                chosen=selection.get(layer, []),
                shards=shards.get(layer, 1),
                durations=durations,
            )
            for layer in stage
        }
        flat = [job for layer in stage for job in jobs[layer]]
        if len(flat) == 1:
            outcomes.append(pytest_job(flat[0], extra=extra, reports=reports, log=None))
            continue
        logs = {job: reports / f"{job.file_stem}.log" for job in flat}
        print(f"suite: side by side: {', '.join(job.name for job in flat)}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(flat)) as pool:
            futures = {
                job: pool.submit(pytest_job, job, extra=extra, reports=reports, log=logs[job])
                for job in flat
            }
        for layer in stage:
            shard_outcomes = []
            for job in jobs[layer]:
                print(f"suite: ---- output of {job.name} (ran beside others) ----", flush=True)
                with logs[job].open("rb") as log:
                    shutil.copyfileobj(log, sys.stdout.buffer)
                sys.stdout.buffer.flush()
                shard_outcomes.append(futures[job].result())
            if len(shard_outcomes) > 1:
                print(
                    f"suite: {layer} shards: "
                    + ", ".join(f"{o.name} {o.seconds:.0f}s" for o in shard_outcomes),
                    flush=True,
                )
            outcomes.append(merge(layer, shard_outcomes))
    return outcomes


def read_durations() -> dict[str, float]:
    try:
        data = json.loads(DURATIONS_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.get("seconds_per_file", {}).items()}


def write_durations(outcomes: list[Outcome]) -> None:
    """Each test file's summed test time in this run, what the next run balances shards by.
    Files of layers this run did not cover keep the figures an earlier run wrote."""
    per_file = {
        f: seconds
        for f, seconds in read_durations().items()
        if not any(in_layer(f, o.name) for o in outcomes)
    }
    for outcome in outcomes:
        for seconds, test_id in outcome.durations:
            test_file = test_id.split("::", 1)[0]
            per_file[test_file] = per_file.get(test_file, 0.0) + seconds
    data = {
        "written_by": "scripts/run_suite.py after each run of whole layers; do not edit",
        "seconds_per_file": {f: round(per_file[f], 1) for f in sorted(per_file)},
    }
    DURATIONS_FILE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"suite: wrote {DURATIONS_FILE.relative_to(ROOT)}", flush=True)


def layer_line(phases: list[Outcome], total: float) -> str:
    parts = [f"{phase.name} {phase.seconds:.0f}s" for phase in phases if phase.ran]
    return "suite wall time: " + ", ".join(parts) + f"; total {total:.0f}s"


def cpu_line(phases: list[Outcome]) -> str:
    """CPU seconds beside wall seconds per phase: a layer using far less than the machine's
    cores x its wall time is mostly waiting, and shards side by side can cut it."""
    parts = [
        f"{phase.name} {phase.cpu_seconds:.0f}s ({phase.cpu_seconds / phase.seconds:.2f} cores)"
        for phase in phases
        if phase.ran and phase.seconds > 0
    ]
    return f"suite cpu time ({os.cpu_count()} cores): " + ", ".join(parts)


def slowest(outcomes: list[Outcome]) -> list[tuple[float, str, str]]:
    rows = [(seconds, o.name, test) for o in outcomes for seconds, test in o.durations]
    return sorted(rows, reverse=True)[:SLOWEST]


def parse_shards(text: str) -> dict[str, int]:
    """``e2e=3,integration=2`` -> {"e2e": 3, "integration": 2}; a layer not named runs whole."""
    shards: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        layer, _, count = part.partition("=")
        if layer not in LAYERS or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: expected LAYER=N with N >= 1")
        shards[layer] = int(count)
    return shards


def describe_shards(shards: dict[str, int]) -> str:
    cut = [f"{layer}={count}" for layer, count in shards.items() if count > 1]
    return ", ".join(cut) or "none"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def write_timings(
    phases: list[Outcome],
    outcomes: list[Outcome],
    *,
    total: float,
    load_start: str,
    cold: bool,
    parallel: bool,
    shards: dict[str, int],
) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    passed = sum(o.passed for o in outcomes)
    failed = sum(o.failed for o in outcomes)
    skipped = sum(o.skipped for o in outcomes)
    finished = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    kind = "cold" if cold else "warm"
    lines = [
        "# Suite timings (written by `make test`; do not edit)",
        "",
        "`scripts/run_suite.py` rewrites this file at the end of every full `make test`",
        "(all layers, no test selection). Commit it when a run on this project's machine kind",
        "produced it; docs/development.md explains how to read it.",
        "",
        f"- finished: {finished}, commit `{commit or 'unknown'}`",
        f"- machine: {os.cpu_count()} cores; load average (1, 5, 15 min) at the start "
        f"{load_start}, at the end {load_average()}",
        f"- control-plane cache: {'cold (built in set-up)' if cold else 'warm'}; layers "
        f"{'side by side (integration beside e2e)' if parallel else 'one after another'}; "
        f"shards: {describe_shards(shards)}",
        f"- tests: {passed} passed, {failed} failed, {skipped} skipped",
        "",
        "| phase | wall seconds | cpu seconds | passed | failed | skipped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for phase in phases:
        if phase.name in LAYERS:
            lines.append(
                f"| {phase.name} | {phase.seconds:.0f} | {phase.cpu_seconds:.0f} | "
                f"{phase.passed} | {phase.failed} | {phase.skipped} |"
            )
        else:
            lines.append(f"| {phase.name} | {phase.seconds:.0f} | {phase.cpu_seconds:.0f} | | | |")
    lines += [f"| **total** | **{total:.0f}** | | | | |", "", f"## The {SLOWEST} slowest tests", ""]
    lines += ["| seconds | layer | test |", "|---:|---|---|"]
    lines += [f"| {s:.1f} | {layer} | `{test}` |" for s, layer, test in slowest(outcomes)]
    TIMINGS_FILE.write_text("\n".join(lines) + "\n")
    print(f"suite: wrote {TIMINGS_FILE.relative_to(ROOT)}", flush=True)
    figure = (
        f"- **{kind}**: {total:.0f} s ({total / 60:.1f} min) in all, "
        f"{passed} passed, {failed} failed; {finished}, commit "
        f"`{commit or 'unknown'}`, {os.cpu_count()} cores, load at the start {load_start}, "
        f"shards: {describe_shards(shards)}"
    )
    FIGURES_FILE.write_text(with_figure(FIGURES_FILE.read_text(), figure, cold=cold))
    print(f"suite: wrote the {kind} figure into {FIGURES_FILE.relative_to(ROOT)}", flush=True)


def with_figure(text: str, figure: str, *, cold: bool) -> str:
    """``text`` with its figures block holding ``figure`` as the line of its kind (cold or
    warm), the other kind's line kept; a text without the block is returned unchanged."""
    start, end = text.find(FIGURES_BEGIN), text.find(FIGURES_END)
    if start < 0 or end < start:
        return text
    body = text[start + len(FIGURES_BEGIN) : end]
    kept = {
        kind: line
        for line in body.splitlines()
        for kind in ("cold", "warm")
        if line.startswith(f"- **{kind}**")
    }
    kept["cold" if cold else "warm"] = figure
    block = "\n".join(kept[kind] for kind in ("cold", "warm") if kind in kept)
    return f"{text[: start + len(FIGURES_BEGIN)]}\n{block}\n{text[end:]}"


def select_tests(layers: list[str], tests: list[str]) -> dict[str, list[str]]:
    """The layers to run, in order, each with the chosen tests in it (empty: all of it); with
    tests chosen, a layer holding none of them is left out."""
    selection: dict[str, list[str]] = {}
    for layer in layers:
        chosen = [t for t in tests if in_layer(t, layer)]
        if tests and not chosen:
            continue
        selection[layer] = chosen
    return selection


def cmd_test(args: argparse.Namespace) -> int:
    started = time.monotonic()
    load_start = load_average()
    cold = not any((Path.home() / ".cache" / "celery-reconciler").glob("k8s-*"))
    phases: list[Outcome] = []
    if not args.no_setup:
        phases.append(run_phase("setup", ["bash", "scripts/setup.sh"]))
        if phases[-1].returncode != 0:
            print("suite: set-up failed", flush=True)
            print("suite: 0 passed, 1 failed", flush=True)
            return 1
    if args.lint:
        phases.append(run_phase("lint", ["make", "--no-print-directory", "lint-only"]))
    extra = shlex.split(args.pytest_args)
    selection = select_tests(args.layers, args.tests)
    layers = list(selection)
    with tempfile.TemporaryDirectory(prefix="suite-") as tmp:
        outcomes = run_layers(
            layers,
            parallel=args.parallel,
            shards=args.shards,
            selection=selection,
            extra=extra,
            reports=Path(tmp),
        )
    total = time.monotonic() - started
    phases += outcomes

    print(f"suite: the {SLOWEST} slowest tests across layers (set-up + call + tear-down):")
    for seconds, layer, test in slowest(outcomes):
        print(f"  {seconds:8.1f}s  {layer:<12} {test}")
    failures = [f for o in outcomes for f in o.failures]
    lint_failed = any(p.name == "lint" and p.returncode != 0 for p in phases)
    if lint_failed:
        failures.insert(0, "lint")
    for failure in failures:
        print(f"suite: FAILED {failure}")
    full = not args.tests and not extra and set(layers) == set(LAYERS) and args.lint
    if full and args.write_timings:
        write_timings(
            phases,
            outcomes,
            total=total,
            load_start=load_start,
            cold=cold,
            parallel=args.parallel,
            shards=args.shards,
        )
    if not args.tests and not extra and args.write_timings and outcomes:
        write_durations(outcomes)
    passed = sum(o.passed for o in outcomes)
    failed = sum(o.failed for o in outcomes) + (1 if lint_failed else 0)
    skipped = sum(o.skipped for o in outcomes)
    print(cpu_line(phases), flush=True)
    print(layer_line(phases, total), flush=True)
    print(f"suite: {passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 0 if failed == 0 and passed > 0 else 1


def cmd_flake(args: argparse.Namespace) -> int:
    """Runs the chosen layers ``rounds`` times with stress-ng loading the CPU beside them and
    lists every test that failed in any round: a test that fails once in N is a bug."""
    extra = shlex.split(args.pytest_args)
    stress_argv = ["stress-ng", *shlex.split(args.stress), "--timeout", "0", "--quiet"]
    if shutil.which("stress-ng") is None:
        print("flake: stress-ng is missing (make setup installs it)", flush=True)
        print("flake: 0 passed, 1 failed", flush=True)
        return 1
    history: dict[str, list[int]] = {}
    rounds: list[list[Outcome]] = []
    started = time.monotonic()
    for number in range(1, args.rounds + 1):
        print(f"flake: round {number}/{args.rounds}, load: {shlex.join(stress_argv)}", flush=True)
        stress = subprocess.Popen(stress_argv, start_new_session=True)
        try:
            selection = select_tests(args.layers, args.tests)
            with tempfile.TemporaryDirectory(prefix="flake-") as tmp:
                outcomes = run_layers(
                    list(selection),
                    parallel=args.parallel,
                    shards=args.shards,
                    selection=selection,
                    extra=extra,
                    reports=Path(tmp),
                )
        finally:
            os.killpg(stress.pid, signal.SIGTERM)
            stress.wait()
        rounds.append(outcomes)
        for outcome in outcomes:
            for failure in outcome.failures:
                history.setdefault(failure, []).append(number)
        print(
            f"flake: round {number}: "
            + ", ".join(
                f"{o.name} {o.passed} passed {o.failed} failed {o.seconds:.0f}s" for o in outcomes
            ),
            flush=True,
        )
    print(
        f"flake: {args.rounds} rounds in {time.monotonic() - started:.0f}s; "
        f"tests that failed in any round: {len(history)}"
    )
    for test, numbers in sorted(history.items()):
        print(f"flake: FAILED in round(s) {', '.join(map(str, numbers))} of {args.rounds}: {test}")
    passed = sum(o.passed for outcomes in rounds for o in outcomes)
    failed = sum(o.failed for outcomes in rounds for o in outcomes)
    print(f"flake: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and passed > 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, layers: str) -> None:
        p.add_argument(
            "--layers",
            default=layers,
            type=lambda s: s.split(","),
            help="comma-separated, from " + ",".join(LAYERS),
        )
        p.add_argument(
            "--tests",
            default="",
            type=str.split,
            help="test files or ids under tests/<layer>/ (space-separated); "
            "a layer none of them names is not run",
        )
        p.add_argument("--pytest-args", default="", help="passed to every layer's pytest")
        p.add_argument(
            "--parallel",
            action="store_true",
            help="run integration beside e2e, each with its own servers",
        )
        p.add_argument(
            "--shards",
            default={},
            type=parse_shards,
            help="cut layers into pytest processes run side by side, e.g. integration=2,e2e=3",
        )

    test = sub.add_parser("test", help="set-up, lint and the layers (make test, make check)")
    common(test, ",".join(LAYERS))
    test.add_argument("--no-setup", action="store_true")
    test.add_argument("--no-lint", dest="lint", action="store_false")
    test.add_argument(
        "--no-timings",
        dest="write_timings",
        action="store_false",
        help=f"do not rewrite {TIMINGS_FILE.relative_to(ROOT)}",
    )
    flake = sub.add_parser("flake", help="layers N rounds under CPU load (make flake)")
    common(flake, "integration,e2e")
    flake.add_argument("--rounds", type=int, default=3)
    flake.add_argument("--stress", default="--cpu 1", help="stress-ng's load options")
    args = parser.parse_args()
    for layer in args.layers:
        if layer not in LAYERS:
            parser.error(f"unknown layer {layer!r}; layers: {', '.join(LAYERS)}")
    return cmd_test(args) if args.command == "test" else cmd_flake(args)


if __name__ == "__main__":
    sys.exit(main())
