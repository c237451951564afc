"""Evaluation suite end to end: a real smoke run, the real CLI, the real 8x200 CSVs with
stand-in images (real sample PNGs) at their relative paths, and the linear probe on the sample."""

import csv
import json
import pathlib
import shutil
import subprocess

import numpy as np
from PIL import Image
import pytest
from sklearn.linear_model import LogisticRegression

from medvl_jax.errors import DataError
from medvl_jax.evaluate import features, linear_probe, retrieval, runs
from tests.conftest import SHORT_STEPS, run_eval

STEPS = SHORT_STEPS
FAST = ["--cfg=n_boot=100"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def run_dir(short_run) -> pathlib.Path:
  return short_run


@pytest.fixture(scope="module")
def chexpert_dir(tmp_path_factory, sample_data_dir) -> pathlib.Path:
  """Every image path of the 8x200 CSVs, as a symlink to a real sample PNG (cycled)."""
  root = tmp_path_factory.mktemp("chexpert")
  pngs = sorted((sample_data_dir / "covid_cxr_notes" / "images").glob("*.png"))
  paths = set()
  for f in ("image-retrieval/query.csv", "image-retrieval/candidate.csv"):
    with open(sample_data_dir / "convirt_8x200" / f, newline="") as fh:
      paths.update(r["Path"] for r in csv.DictReader(fh))
  for i, p in enumerate(sorted(paths)):
    dst = root / p
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(pngs[i % len(pngs)])
  return root


def candidate_labels(sample_data_dir) -> np.ndarray:
  with open(sample_data_dir / "convirt_8x200" / "image-retrieval" / "candidate.csv") as f:
    rows = list(csv.DictReader(f))
  return np.array([[float(r[c]) == 1.0 for c in retrieval.CATEGORIES] for r in rows])


def query_cats(sample_data_dir, which: str) -> list[str]:
  with open(sample_data_dir / "convirt_8x200" / which / "query.csv") as f:
    return [r["Variable"] for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------- no model
def test_oracle_embedding_scores_one(sample_data_dir):
  labels = candidate_labels(sample_data_dir)
  cand = labels.astype(float)  # Label-derived embedding.
  for which in ("image-retrieval", "text-retrieval"):
    cats = query_cats(sample_data_dir, which)
    query = np.eye(len(retrieval.CATEGORIES))[[retrieval.CATEGORIES.index(c) for c in cats]]
    for k in (5, 10, 50):
      p = retrieval.category_precision(query, cats, cand, labels, k)
      np.testing.assert_allclose(p, 1.0)


def test_random_embedding_scores_prevalence(sample_data_dir):
  """Random embeddings: mean Precision@k within +-0.04 of the category prevalence (0.125)."""
  labels = candidate_labels(sample_data_dir)
  prevalence = labels.mean(0)
  np.testing.assert_allclose(prevalence, 0.125)  # 200 of 1,600 per category.
  cats = query_cats(sample_data_dir, "image-retrieval")
  rng = np.random.default_rng(0)
  for k in (10, 50):
    p = np.mean(
      [
        retrieval.category_precision(
          rng.normal(size=(len(cats), 32)), cats, rng.normal(size=(len(labels), 32)), labels, k
        )
        for _ in range(5)
      ]
    )
    assert abs(p - 0.125) < 0.04, (k, p)


def test_logistic_regression_equals_sklearn():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(80, 6))
  y = (x[:, 0] + 0.5 * rng.normal(size=80) > 0).astype(int)
  w, b = linear_probe.fit_logistic(x, y, c=0.5)
  ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(x, y)
  np.testing.assert_allclose(w, ref.coef_[0], atol=1e-5)
  assert b == pytest.approx(ref.intercept_[0], abs=1e-5)


def test_reader_errors(tmp_path, sample_data_dir, chexpert_dir):
  src = sample_data_dir / "convirt_8x200"
  dst = tmp_path / "r"
  shutil.copytree(src, dst)
  retrieval.read_8x200(dst, chexpert_dir)  # Complete: no error.
  with pytest.raises(DataError, match="image not found"):
    retrieval.read_8x200(dst, tmp_path)
  with open(dst / "image-retrieval" / "candidate.csv") as f:
    rows = list(csv.DictReader(f))
  with open(dst / "image-retrieval" / "candidate.csv", "w", newline="") as f:
    w = csv.DictWriter(f, [c for c in rows[0] if c != "Edema"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  with pytest.raises(DataError, match="missing column.*'Edema'"):
    retrieval.read_8x200(dst, chexpert_dir)


# ----------------------------------------------------------------------------- CLI end to end
def test_cli_retrieval(run_dir, chexpert_dir, tmp_path):
  out = tmp_path / "retrieval"
  proc = run_eval(
    f"--workdir={run_dir}",
    "--task=retrieval",
    f"--out={out}",
    *FAST,
    f"--cfg=chexpert_dir={chexpert_dir}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "metrics.json").read_text())
  assert result["step"] == STEPS and result["task"] == "retrieval"
  m = result["metrics"]
  for k in (5, 10, 50):
    for kind in ("i2i", "t2i"):
      v = m[f"retrieval/{kind}_P@{k}"]
      assert 0 <= m[f"retrieval/{kind}_P@{k}_ci_lo"] <= v <= m[f"retrieval/{kind}_P@{k}_ci_hi"]
  for k in (1, 5, 10):
    assert 0 <= m[f"retrieval/t2i_R@{k}"] <= 1 and 0 <= m[f"retrieval/i2t_R@{k}"] <= 1
  with Image.open(out / "retrieval_sheet.png") as im:
    im.load()
    assert im.size[0] > 300 and im.size[1] > 300
  assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "retrieval_sheet.png"]


@pytest.fixture(scope="module")
def probe_out(run_dir, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("probe") / "lp"
  proc = run_eval(f"--workdir={run_dir}", "--task=linear_probe", f"--out={out}", *FAST)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def test_cli_linear_probe(probe_out):
  m = json.loads((probe_out / "metrics.json").read_text())["metrics"]
  for tag in ("1pct", "10pct", "100pct"):
    assert 0 <= m[f"linear_probe/auc_{tag}"] <= 1 and m[f"linear_probe/auc_{tag}_std"] >= 0
    assert m[f"linear_probe/auc_{tag}_ci_lo"] <= m[f"linear_probe/auc_{tag}_ci_hi"]
  assert m["linear_probe/n_train"] > 50 and m["linear_probe/n_test"] > 10
  with Image.open(probe_out / "linear_probe_roc.png") as im:
    im.load()


def test_cli_numbers_match_in_process_evaluator(run_dir, probe_out):
  """The evaluator as training calls it (Encoders + state) gives the CLI's numbers."""
  config, encoders, state, _ = runs.load_run(run_dir, None)
  ev = linear_probe.Evaluator(encoders, n_boot=100)
  got = dict(ev.run(state))
  want = json.loads((probe_out / "metrics.json").read_text())["metrics"]
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-6), k
  assert isinstance(encoders, features.Encoders) and config.model.name == "convirt"


def test_compare_table(probe_out, tmp_path):
  md = tmp_path / "cmp.md"
  proc = run_eval("--compare", str(probe_out), str(probe_out), f"--out={md}")
  assert proc.returncode == 0, proc.stderr
  lines = md.read_text().splitlines()
  assert lines[0].count("|") == 4 and "linear_probe/auc_1pct" in md.read_text()
  assert proc.stdout == md.read_text()
  with Image.open(tmp_path / "cmp.png") as im:  # The chart beside the table.
    im.load()
  with Image.open(tmp_path / "cmp_losses.png") as im:  # The runs' loss curves.
    im.load()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.md", "cmp.png", "cmp_losses.png"]


def test_compare_loss_curves_come_from_the_runs_tensorboard(short_run):
  from medvl_jax.evaluate import plots
  from tests.conftest import SHORT_STEPS, read_scalars

  curves = runs.training_curves(short_run / "tensorboard")
  want = read_scalars(short_run / "tensorboard")
  assert curves["train_loss"][0] == list(range(1, SHORT_STEPS + 1))
  assert curves["train_loss"][1] == pytest.approx(
    [want["train_loss"][s] for s in curves["train_loss"][0]]
  )
  assert curves["val_loss"][0] == [SHORT_STEPS]
  fig = plots.training_curves_figure({"a": curves, "b": curves})
  axes = fig.get_axes()
  assert [ax.get_title() for ax in axes] == ["train_loss", "val_loss"]
  assert [len(ax.get_lines()) for ax in axes] == [2, 2]
  assert axes[0].get_xlabel() == "step" and axes[0].get_legend() is not None


# ----------------------------------------------------------------------------- bad input
def _bad(proc: subprocess.CompletedProcess, out: pathlib.Path, pattern: str):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and pattern in lines[0], proc.stderr[-2000:]
  assert not out.exists()
  assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name)]


@pytest.mark.slow
def test_bad_inputs(run_dir, chexpert_dir, sample_data_dir, tmp_path):
  out = tmp_path / "out" / "e"
  out.parent.mkdir()
  _bad(
    run_eval(f"--workdir={run_dir}", "--task=nope", f"--out={out}"),
    out,
    "unknown evaluation task 'nope'",
  )
  # An image path that does not exist: the CSVs point at an empty CheXpert directory.
  _bad(
    run_eval(
      f"--workdir={run_dir}", "--task=retrieval", f"--out={out}", f"--cfg=chexpert_dir={tmp_path}"
    ),
    out,
    "image not found",
  )
  # A CSV missing a column.
  rdir = tmp_path / "r"
  shutil.copytree(sample_data_dir / "convirt_8x200", rdir)
  q = rdir / "text-retrieval" / "query.csv"
  q.write_text("Variable,Sentence\nEdema,x\n")
  _bad(
    run_eval(
      f"--workdir={run_dir}",
      "--task=retrieval",
      f"--out={out}",
      f"--cfg=chexpert_dir={chexpert_dir}",
      f"--cfg=retrieval_dir={rdir}",
    ),
    out,
    "missing column(s) 'Text'",
  )
