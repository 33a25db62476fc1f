"""Where the minutes went: setup (fixtures: image builds, boots, servers), call and teardown time per test
file and per test folder, printed at the end of every run and kept in .ci/times.json when CI runs."""

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

_TIMES: dict[str, dict[str, float]] = defaultdict(lambda: {"setup": 0.0, "call": 0.0, "teardown": 0.0})


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
    out = os.environ.get("BUILDER_TEST_TIMES")
    if out:
        Path(out).write_text(json.dumps({"folders": folders, "files": _TIMES}, indent=1, sort_keys=True))
