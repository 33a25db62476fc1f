"""Where the minutes went: setup (fixtures: image builds, boots, servers), call and teardown time per test
file and per test folder, printed at the end of every run and kept in .ci/times.json when CI runs."""

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

_TIMES: dict[str, dict[str, float]] = defaultdict(lambda: {"setup": 0.0, "call": 0.0, "teardown": 0.0})
# `builder build` / `builder pxe build` runs (tests/conftest.py's run_cli records them): seconds and count
_BUILDS: dict[str, list[float]] = defaultdict(list)
# QEMU boots (tests/support/qemu.py records them): the test, and seconds from QEMU's start to the node's first
# ready line (None: it never printed one, as a boot that must fail)
_BOOTS: list[tuple[str, float | None]] = []


def record_build(label: str, seconds: float) -> None:
    _BUILDS[label].append(seconds)


def record_boot(test: str) -> int:
    """A QEMU boot began in `test`; returns its index for record_ready."""
    _BOOTS.append((test, None))
    return len(_BOOTS) - 1


def record_ready(index: int, seconds: float) -> None:
    _BOOTS[index] = (_BOOTS[index][0], seconds)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _TIMES[report.nodeid.split("::", 1)[0]][report.when] += report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TIMES:
        return
    folders: dict[str, dict[str, float]] = defaultdict(lambda: {"setup": 0.0, "call": 0.0, "teardown": 0.0})
    for path, phases in _TIMES.items():
        for phase, seconds in phases.items():
            folders[str(Path(path).parent)][phase] += seconds
    write = terminalreporter.write_line
    terminalreporter.section("time by phase (s): setup = fixtures (image builds, boots, servers)")
    write(f"{'where':<48} {'setup':>8} {'call':>8} {'teardown':>9} {'total':>8}")
    rows = sorted(_TIMES.items(), key=lambda item: -sum(item[1].values()))
    for name, phases in [*sorted(folders.items()), ("-" * 20, {}), *rows[:30]]:
        if not phases:
            write(name)
            continue
        write(f"{name:<48} {phases['setup']:>8.1f} {phases['call']:>8.1f} {phases['teardown']:>9.1f} "
              f"{sum(phases.values()):>8.1f}")
    if _BUILDS:
        terminalreporter.section("image builds (s): every `builder build` and `builder pxe build` a test ran")
        write(f"{'command':<72} {'runs':>5} {'total':>8} {'longest':>8}")
        for label, runs in sorted(_BUILDS.items(), key=lambda item: -sum(item[1])):
            write(f"{label[:72]:<72} {len(runs):>5} {sum(runs):>8.1f} {max(runs):>8.1f}")
        write(f"{'all of them':<72} {sum(len(r) for r in _BUILDS.values()):>5} "
              f"{sum(sum(r) for r in _BUILDS.values()):>8.1f}")
    if _BOOTS:
        ready = [seconds for _, seconds in _BOOTS if seconds is not None]
        terminalreporter.section(f"QEMU boots: {len(_BOOTS)}, {len(ready)} of them to a ready line "
                                 f"({sum(ready):.0f} s from QEMU's start to the first ready line, all together)")
        for test, seconds in _BOOTS:
            write(f"{test[:100]:<100} {'no ready line' if seconds is None else f'{seconds:.1f}':>13}")
    out = os.environ.get("BUILDER_TEST_TIMES")
    if out:
        Path(out).write_text(json.dumps({"folders": folders, "files": _TIMES, "builds": _BUILDS,
                                         "boots": _BOOTS}, indent=1, sort_keys=True))
