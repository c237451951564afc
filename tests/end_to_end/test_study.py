"""experiments/study.py: docs/RESULTS.md is generated from saved metrics; the quick study runs
every arm end to end and resumes without redoing finished arms."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import results

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_results_md_is_generated_from_the_saved_metrics():
  """Every number in docs/RESULTS.md comes from the published metrics file via render()."""
  metrics = json.loads((REPO / "docs" / "study" / "study_metrics_small.json").read_text())
  assert metrics["meta"]["mode"] == "small"
  assert results.render(metrics, "study") == (REPO / "docs" / "RESULTS.md").read_text()


def test_published_study_meets_its_design():
  """Every published trained arm: >= 2,000 steps, >= 3 seeds, a learning curve per seed (the
  arms not finished yet are named as such); claim 0's verdict is the document's first
  section."""
  metrics = json.loads((REPO / "docs" / "study" / "study_metrics_small.json").read_text())
  trained = {n: a for n, a in metrics["arms"].items() if a["trained"]}
  assert set(trained) | set(metrics["meta"]["arms_not_finished"]) >= {"b", "c", "d", "e"}
  assert trained, "no trained arm published"
  for a in trained.values():
    assert a["steps"] >= 2000 and len(a["seeds"]) >= 3
    assert set(a["curves"]["per_seed"]) == {str(k) for k in a["seeds"]}
    for k, curve in a["curves"]["per_seed"].items():
      assert [s for s, _ in curve["val_loss"]][-1] == a["steps"]
      # The evaluated checkpoint (pre-specified): the seed's lowest validation loss.
      chosen = a["selected_steps"][a["seeds"].index(int(k))]
      assert chosen == min(curve["val_loss"], key=lambda sv: sv[1])[0]
  # The validation patients choose the checkpoint: the claims' held-out rows are the test pairs.
  assert metrics["meta"]["settings"]["retrieval_n"] == 15
  doc = (REPO / "docs" / "RESULTS.md").read_text()
  assert doc.split("\n## ")[1].startswith("Claim 0: training learns")


def test_published_scores_leave_out_unfinished_trainings(tmp_path):
  """--publish copies score files and the TensorBoard events of finished trainings only: a run
  still training is redone from scratch in a seeded OUT, so its partial events must not go."""
  from experiments import report

  out = tmp_path / "out"
  for arm, stages in (("b", {"train": {"steps": 4}, "nih": {}}), ("c", {})):
    (out / "arms" / arm / "seed0").mkdir(parents=True)
    (out / "arms" / arm / "seed0" / "state.json").write_text(json.dumps({"stages": stages}))
    tb = out / "runs" / arm / "seed0" / "tensorboard"
    tb.mkdir(parents=True)
    (tb / "events.out.tfevents.1").write_bytes(b"events")
  (out / "arms" / "b" / "seed0" / "nih.npz").write_bytes(b"scores")
  dest = tmp_path / "docs" / "scores_small"
  assert report.copy_scores(out, dest) == 4
  copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
  assert copied == [
    "arms/b/seed0/nih.npz",
    "arms/b/seed0/state.json",
    "arms/c/seed0/state.json",
    "runs/b/seed0/tensorboard/events.out.tfevents.1",
  ]


def test_verdict_rule():
  assert results.verdict(0.01, 0.2) == "supported"
  assert results.verdict(-0.3, -0.01) == "not supported"
  assert results.verdict(-0.1, 0.1) == "inconclusive"
  assert results.verdict(0.0, 0.1) == "inconclusive"  # 0 inside the closed interval
  assert results.verdict(None, None) == "inconclusive"
  # A loss: a gain is a negative difference.
  assert results.verdict(-0.3, -0.01, "lower") == "supported"
  assert results.verdict(0.01, 0.2, "lower") == "not supported"


def test_seed_pooled_difference_and_its_bootstrap(tmp_path):
  """The pooled difference is the seed-mean of per-seed differences on the same rows; its CI
  is the bootstrap of that mean over patients (checked against a NumPy loop)."""
  import numpy as np

  from experiments import report
  from medvl_jax.evaluate import metrics

  rng = np.random.default_rng(0)
  groups = np.repeat(np.arange(30), 2).astype(str)
  a = [rng.normal(1.0, 1, 60) for _ in range(3)]
  b = [rng.normal(0.5, 1, 60) for _ in range(3)]
  fns = [lambda r, x=x, y=y: float(x[r].mean() - y[r].mean()) for x, y in zip(a, b)]
  m = report._pooled(fns, groups, n_boot=200)
  per_seed = [float(x.mean() - y.mean()) for x, y in zip(a, b)]
  assert m["seeds"] == per_seed
  assert m["value"] == pytest.approx(np.mean(per_seed), abs=1e-12)
  assert m["seed_sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
  ci = metrics.bootstrap_ci(
    lambda r: float(np.mean([f(r) for f in fns])), groups, n_boot=200, seed=0
  )
  assert (m["lo"], m["hi"]) == (ci["lo"], ci["hi"])
  assert m["lo"] < m["value"] < m["hi"]


def test_where_a_curve_flattens():
  from experiments import report

  steps = [250, 500, 750, 1000, 1250]
  f = report._flattens(steps, [3.0, 2.0, 1.25, 1.05, 1.0], lower_is_better=True)
  assert f == {"flat_from": 1000, "best_step": 1250, "ends_worse": False}
  f = report._flattens(steps, [3.0, 1.0, 1.4, 1.6, 1.8], lower_is_better=True)
  assert f == {"flat_from": 500, "best_step": 500, "ends_worse": True}
  f = report._flattens(steps, [0.1, 0.3, 0.5, 0.5, 0.5], lower_is_better=False)
  assert f["flat_from"] == 750 and f["best_step"] == 750


def test_held_out_contrastive_loss_equals_the_training_loss():
  """The per-pair held-out loss (float64 NumPy) averages to the library's InfoNCE (JAX,
  itself checked against open_clip) on the same embeddings: rtol 1e-5 (float32 vs 64)."""
  import jax.numpy as jnp
  import numpy as np

  from experiments import evaluations
  from medvl_jax.losses import contrastive

  rng = np.random.default_rng(1)
  z_u, z_v = rng.normal(size=(2, 24, 16)).astype(np.float32)
  z_u /= np.linalg.norm(z_u, axis=1, keepdims=True)
  z_v /= np.linalg.norm(z_v, axis=1, keepdims=True)
  per_pair = evaluations.contrastive_loss_per_pair(z_u, z_v, lam=0.75, tau=0.1)
  ref, _ = contrastive.infonce(jnp.asarray(z_v), jnp.asarray(z_u), lam=0.75, temperature=0.1)
  assert per_pair.shape == (24,)
  np.testing.assert_allclose(per_pair.mean(), float(ref), rtol=1e-5)


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
  from medvl_jax.ckpt import checkpoint  # pylint: disable=g-import-not-at-top

  out = tmp_path / "study"
  # First invocation: one trained arm only (an interrupted study, as far as the rest goes).
  r = _study(out, "--arms=b")
  assert r.returncode == 0, r.stderr[-3000:]
  for k in (0, 1):
    state = json.loads((out / "arms" / "b" / f"seed{k}" / "state.json").read_text())
    assert set(state["stages"]) == {"train", "nih", "covid", "retrieval", "heldout"}
  before = {"arm": _snapshot(out / "arms" / "b"), "run": _snapshot(out / "runs" / "b")}
  # Second invocation: the whole study; arm b is not redone (not one of its files rewritten).
  r = _study(out)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "b/seed0 (b) ConVIRT, paired: train" not in r.stderr
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
  for name, a in metrics["arms"].items():
    assert a["seeds"] == [0, 1]
    m = a["metrics"]["nih_auc_100pct"]
    assert 0 <= m["lo"] <= m["value"] <= m["hi"] <= 1 and len(m["seeds"]) == 2
    assert len(a["nih_per_label"]["100pct"]) == 14
    assert ("mlm_acc" in a["metrics"]) == (name not in ("a_resnet", "b"))
    assert ("psnr_gain" in a["metrics"]) == (name not in ("a_resnet", "b"))
    if a["trained"]:  # a learning curve per seed, from the run's own evaluations
      for curve in a["curves"]["per_seed"].values():
        assert curve["val_loss"][-1][0] == a["steps"] and "retrieval/t2i_R@5" in curve
      # Each seed's evaluated checkpoint is the one the trainer kept as best by validation loss.
      assert a["selected_steps"] == [
        checkpoint.best_step(out / "runs" / name / f"seed{k}") for k in a["seeds"]
      ]
  # No leakage: the NIH probe reads the evaluation half, which no arm pretrained on.
  probe = np.load(out / "arms" / "d" / "seed0" / "nih.npz")
  assert metrics["meta"]["settings"]["nih_n"] == len(probe["image_id"]) == 310
  # Paired difference = the seed-mean of per-seed differences on the same rows.
  d = {(c["arm"], c["baseline"]): c["metrics"] for c in metrics["comparisons"]}
  for key in ("nih_auc_10pct", "covid_auc_100pct", "t2i_R@5", "heldout_loss", "mlm_acc"):
    diff = d[("d", "c")][key]
    per_seed = [
      x - y
      for x, y in zip(
        metrics["arms"]["d"]["metrics"][key]["seeds"],
        metrics["arms"]["c"]["metrics"][key]["seeds"],
      )
    ]
    assert diff["seeds"] == pytest.approx(per_seed, abs=1e-12)
    assert diff["value"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert diff["lo"] <= diff["value"] <= diff["hi"]
  # The document is regenerated from the saved metrics alone, identically; claim 0 first.
  doc = (out / "RESULTS.md").read_text()
  assert results.render(metrics, "plots") == doc
  assert doc.split("\n## ")[1].startswith("Claim 0: training learns")
  assert (out / "plots" / "auc.png").stat().st_size > 0
  assert (out / "plots" / "curves.png").stat().st_size > 0
  # A rerun of one arm and seed from scratch reproduces its saved scores bit for bit.
  r = _study(out, "--check=d:1")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "d/seed1: the rerun's saved scores equal the study's, bit for bit" in r.stderr
  # The diagnosis tool: held-out figures at step 0 (= the untrained arm's) and each kept step.
  r = subprocess.run(
    [sys.executable, "-m", "experiments.by_step", f"--out={out}", "--run=b/seed0", "--size=quick"],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  table = [line.split() for line in r.stdout.splitlines()[1:]]
  untrained = np.load(out / "arms" / "a_resnet" / "seed0" / "heldout.npz")["contrastive_loss"]
  assert table[0][0] == "0" and float(table[0][1]) == pytest.approx(untrained.mean(), abs=1e-4)
  assert table[-1][0] == "4" and len(table) >= 2
  # A third invocation does no arm work at all, and mixing modes is refused in one line.
  r = _study(out)
  assert r.returncode == 0 and "0 stage(s) to run" in r.stderr
  # The published scores (no checkpoints) seed a fresh OUT that reports the same figures and
  # redoes no stage: how a later session continues the published study.
  from experiments import report

  report.publish(out, tmp_path / "docs")
  scores = tmp_path / "docs" / "study" / f"scores_{metrics['meta']['mode']}"
  assert not list(scores.rglob("*checkpoint*")) and list(scores.rglob("events.out.tfevents.*"))
  seeded = tmp_path / "seeded"
  shutil.copytree(scores, seeded)
  r = _study(seeded)
  assert r.returncode == 0 and "0 stage(s) to run" in r.stderr, r.stderr[-3000:]
  again = json.loads((seeded / "study_metrics.json").read_text())
  assert again["arms"] == metrics["arms"] and again["comparisons"] == metrics["comparisons"]
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
