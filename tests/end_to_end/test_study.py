"""experiments/study.py: docs/RESULTS.md is generated from saved metrics; the quick study runs
every arm end to end and resumes without redoing finished arms."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import results

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_results_md_is_generated_from_the_saved_metrics():
  """Every number in docs/RESULTS.md comes from docs/study/study_metrics.json via render()."""
  metrics = json.loads((REPO / "docs" / "study" / "study_metrics.json").read_text())
  assert results.render(metrics, "study") == (REPO / "docs" / "RESULTS.md").read_text()


def test_verdict_rule():
  assert results.verdict(0.01, 0.2) == "supported"
  assert results.verdict(-0.3, -0.01) == "not supported"
  assert results.verdict(-0.1, 0.1) == "inconclusive"
  assert results.verdict(0.0, 0.1) == "inconclusive"  # 0 inside the closed interval
  assert results.verdict(None, None) == "inconclusive"


def test_patient_folds_keep_patients_together():
  import numpy as np

  from experiments import evaluations

  patients = np.array(["p1", "p2", "p1", "p3", "p4", "p2", "p5"])
  folds = evaluations.patient_folds(patients, 3, seed=0)
  for p in set(patients):
    assert len(set(folds[patients == p])) == 1
  assert set(folds) == {0, 1, 2}
  assert (evaluations.patient_folds(patients, 3, seed=0) == folds).all()


def _study(out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1", PYTHONPATH=str(REPO))
  return subprocess.run(
    [sys.executable, "-m", "experiments.study", "--quick", f"--out={out}", *extra],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )


def _snapshot(d: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_quick_study_runs_every_arm_and_resumes(tmp_path):
  out = tmp_path / "study"
  # First invocation: one trained arm only (an interrupted study, as far as the rest goes).
  r = _study(out, "--arms=b")
  assert r.returncode == 0, r.stderr[-3000:]
  state = json.loads((out / "arms" / "b" / "state.json").read_text())
  assert set(state["stages"]) == {"train", "nih", "covid", "retrieval"}
  before = {
    "arm": _snapshot(out / "arms" / "b"),
    "run": _snapshot(out / "runs" / "b"),
  }
  # Second invocation: the whole study; arm b is not redone (not one of its files rewritten).
  r = _study(out)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "arm b (b) ConVIRT, paired: train" not in r.stderr
  assert _snapshot(out / "arms" / "b") == before["arm"]
  assert _snapshot(out / "runs" / "b") == before["run"]
  metrics = json.loads((out / "study_metrics.json").read_text())
  assert list(metrics["arms"]) == ["a_resnet", "a_vit", "b", "c", "d", "e"]
  assert metrics["meta"]["arms_not_finished"] == []
  assert [(c["arm"], c["baseline"]) for c in metrics["comparisons"]] == [
    ("b", "a_resnet"),
    ("c", "a_vit"),
    ("d", "a_vit"),
    ("e", "a_vit"),
    ("d", "c"),
  ]
  for a in metrics["arms"].values():
    m = a["metrics"]["nih_auc_100pct"]
    assert 0 <= m["lo"] <= m["value"] <= m["hi"] <= 1
    assert len(a["nih_per_label"]["100pct"]) == 14
  for arm in ("c", "d", "e", "a_vit"):
    assert metrics["arms"][arm]["regeneration"]
  # Paired difference = difference of the arms' values (same rows), CI around it.
  d = {(c["arm"], c["baseline"]): c["metrics"] for c in metrics["comparisons"]}
  for key in ("nih_auc_10pct", "covid_auc_100pct", "t2i_R@5"):
    diff = d[("d", "c")][key]
    expected = (
      metrics["arms"]["d"]["metrics"][key]["value"] - metrics["arms"]["c"]["metrics"][key]["value"]
    )
    assert diff["value"] == pytest.approx(expected, abs=1e-12)
    assert diff["lo"] <= diff["value"] <= diff["hi"]
  # The document is regenerated from the saved metrics alone, identically.
  assert results.render(metrics, "plots") == (out / "RESULTS.md").read_text()
  assert (out / "plots" / "auc.png").stat().st_size > 0
  assert (out / "plots" / "losses.png").stat().st_size > 0
  for arm in ("b", "c", "d", "e"):
    assert list((out / "runs" / arm / "tensorboard").rglob("events.out.tfevents.*"))
  # A third invocation does no arm work at all, and mixing modes is refused in one line.
  r = _study(out)
  assert r.returncode == 0 and "0 stage(s) to run" in r.stderr
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  r = subprocess.run(
    [sys.executable, "-m", "experiments.study", f"--out={out}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
