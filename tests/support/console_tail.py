"""A pytest plugin for tests that share a booted QEMU node (a test module names it in `pytest_plugins`): when such
a test fails, the last lines of the node's console go into its report, under the failure.

A fixture value with a `console` attribute (a Path) counts as a node: the module-scoped cluster of
tests/qemu/test_netboot_shared_qemu.py is one. A boot that fails inside a fixture already shows the console's
tail (qemu.wait_for); this covers the checks that run later, against a node that is up.
"""

from pathlib import Path

import pytest

TAIL_LINES = 60


def tail(console: Path, lines: int = TAIL_LINES) -> str:
    if not console.exists():
        return f"(no console file at {console})"
    return "\n".join(console.read_text(errors="replace").splitlines()[-lines:])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    if report.failed:
        for name, value in getattr(item, "funcargs", {}).items():
            console = getattr(value, "console", None)
            if isinstance(console, Path):
                report.sections.append((f"console of {name}, last {TAIL_LINES} lines", tail(console)))
    return report
