"""Kill/restart fault injection through the real CLI (issue 14, deliver 6; marker `slow`).

The smoke config, shortened to TOTAL_STEPS steps with a checkpoint (and an evaluation) every 2,
is SIGKILLed at seeded random moments (start-up, a step, an async save in progress) and
restarted until it finishes; its final checkpoint must equal an uninterrupted run's bit for bit.
The same harness must report a mismatch when resume is broken on purpose. Longer campaigns:
`PYTHONPATH=. python -m tests.faults --kills=20 --seed=1 --out=/tmp/faults` (docs/RELIABILITY).

FAULTS_KILLS and FAULTS_SEED (environment) change the number of kills and the seed here.
"""

import json
import os
import pathlib

import pytest

from tests import faults, privacy

KILLS = int(os.environ.get("FAULTS_KILLS", "10"))
SEED = int(os.environ.get("FAULTS_SEED", "0"))
# A kill advances the run by ~2 steps on average: room for all kills on a fast machine too.
TOTAL_STEPS = max(30, 3 * KILLS)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tfds_dir, sample_data_dir):
  """The uninterrupted run: (workdir, seconds until its first step, its log)."""
  out = tmp_path_factory.mktemp("faults_reference")
  workdir, log = out / "run", out / "run.log"
  rc, seconds, startup_s = faults.run_uninterrupted(
    workdir, faults.smoke_args(workdir, tfds_dir, TOTAL_STEPS), log
  )
  assert rc == 0, log.read_text()[-3000:]
  assert faults.latest_step(workdir) == TOTAL_STEPS
  return workdir, startup_s, log


def test_random_kills_resume_bit_identical(reference, tfds_dir, sample_data_dir, tmp_path):
  ref, startup_s, ref_log = reference
  workdir = tmp_path / "killed"
  report = faults.run_with_kills(
    workdir,
    faults.smoke_args(workdir, tfds_dir, TOTAL_STEPS),
    kills=KILLS,
    seed=SEED,
    total_steps=TOTAL_STEPS,
    startup_s=startup_s,
    logs=tmp_path / "logs",
  )
  faults.check(report, ref, workdir, TOTAL_STEPS)
  summary = report.summary()
  print(json.dumps(summary))  # the figures, with `pytest -s`
  assert report.ok, json.dumps(summary, indent=2)
  assert report.kills == KILLS, summary
  assert report.kills_in_save >= 1, summary  # at least one save interrupted mid-write
  resumed = [l for l in report.launches if "resumed from checkpoint step" in _read(l.log)]
  assert resumed, "no launch resumed from a checkpoint"
  # The logs of every launch (all at DEBUG) and the run's files leak no report text or id.
  logs = {l.log: _read(l.log) for l in report.launches}
  logs[str(ref_log)] = _read(str(ref_log))
  assert "Finished tracing" in logs[report.launches[0].log], "the launches did not log at DEBUG"
  leaks = privacy.check_run(workdir, logs, sample_data_dir)
  assert not leaks, "\n".join(leaks[:20])


def _read(path: str) -> str:
  return pathlib.Path(path).read_text(errors="replace")


@pytest.mark.parametrize("breakage", ["data_from_start", "position_off_by_one"])
def test_harness_reports_broken_resume(reference, tfds_dir, tmp_path, breakage):
  """Restarts go through tests/faults_broken_resume.py, which breaks resume by monkeypatch:
  the harness must report a mismatch, not success."""
  ref, startup_s, _ = reference
  workdir = tmp_path / "broken"
  report = faults.run_with_kills(
    workdir,
    faults.smoke_args(workdir, tfds_dir, TOTAL_STEPS),
    kills=1,
    seed=SEED,
    total_steps=TOTAL_STEPS,
    startup_s=startup_s,
    logs=tmp_path / "logs",
    modes=("step",),
    step_window=(5, 8),  # past the checkpoint at step 2 or 4, so the restart resumes
    restart_module="tests.faults_broken_resume",
    env={"FAULTS_BREAK_RESUME": breakage},
  )
  restart = _read(report.launches[-1].log)
  assert "resumed from checkpoint step" in restart, restart[-3000:]
  assert f"FAULTS_BREAK_RESUME={breakage} applied" in restart, (
    "the breakage did not reach the trainer: update tests/faults_broken_resume.py"
  )
  assert report.final_step == TOTAL_STEPS and not report.failures, report.summary()
  faults.check(report, ref, workdir, TOTAL_STEPS)
  print(json.dumps(dict(report.summary(), breakage=breakage)))
  assert not report.ok and report.mismatches, report.summary()
