"""`pytest --time-budget` (tests/conftest.py), with which .ci/run caps the slow marker: tests not
started once the budget is spent are skipped and listed, the ones that ran keep their result."""

import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import time

def test_a_runs_past_the_budget():
  time.sleep(1.5)

def test_b_starts_after_it():
  pass
"""


def _run(tmp_path, *args):
  path = tmp_path / "test_budget_probe.py"
  path.write_text(PROBE)
  return subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "tests.conftest", str(path), *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_tests_after_the_budget_are_skipped(tmp_path):
  proc = _run(tmp_path, "--time-budget=1")
  assert proc.returncode == 0, proc.stdout[-2000:]
  assert "1 passed, 1 skipped" in proc.stdout
  assert "time budget of 1 s spent" in proc.stdout


def test_no_budget_runs_everything(tmp_path):
  proc = _run(tmp_path)
  assert proc.returncode == 0, proc.stdout[-2000:]
  assert "2 passed" in proc.stdout
