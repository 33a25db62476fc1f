"""The in-process runner the bad-input suites use gives what a real `python -m builder` gives, and leaves this
process as it found it. The few cases here are the real processes the runner stands in for."""

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import run_cli, run_cli_inproc


def _bad_recipe(folder: Path) -> str:
    path = folder / "bad.yaml"
    path.write_text("target: cpu\nvariants: [1, 2\n")
    return str(path)


CASES = {
    "version": lambda folder: ["--version"],
    "usage-error": lambda folder: ["no-such-verb"],
    "missing-recipe": lambda folder: ["plan", "--recipe", str(folder / "nope.yaml")],
    "broken-yaml": lambda folder: ["plan", "--recipe", _bad_recipe(folder)],
    "debug-traceback": lambda folder: ["--debug", "plan", "--recipe", str(folder / "nope.yaml")],
    "schema": lambda folder: ["schema"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_process_is_what_a_real_process_gives(case: str, tmp_path: Path) -> None:
    args = CASES[case](tmp_path)
    real, inproc = run_cli(*args), run_cli_inproc(*args)
    assert (inproc.returncode, inproc.stdout, inproc.stderr) == (real.returncode, real.stdout, real.stderr)


def test_in_process_leaves_the_process_as_it_was(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = (dict(os.environ), os.getcwd(), root.handlers[:], root.level, signal.getsignal(signal.SIGINT),
              signal.getsignal(signal.SIGTERM), sys.stdout, sys.stderr, sys.stdin)
    proc = run_cli_inproc("--debug", "plan", "--recipe", str(tmp_path / "nope.yaml"), cwd=tmp_path,
                          env={"BUILDER_TEST_MARK": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert (dict(os.environ), os.getcwd(), root.handlers, root.level, signal.getsignal(signal.SIGINT),
            signal.getsignal(signal.SIGTERM), sys.stdout, sys.stderr, sys.stdin) == before


def test_other_threads_output_is_not_the_clis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A test's own server thread writing to stderr while the CLI runs (as socketserver does on an error)."""
    stop = threading.Event()

    def noise() -> None:
        while not stop.is_set():
            print("server thread noise", file=sys.stderr)
            time.sleep(0.001)

    thread = threading.Thread(target=noise)
    thread.start()
    try:
        proc = run_cli_inproc("plan", "--recipe", str(tmp_path / "nope.yaml"))
    finally:
        stop.set()
        thread.join()
    assert proc.returncode == 2 and "noise" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "server thread noise" in capsys.readouterr().err
