"""Evaluation metrics against independent computations (scikit-learn, hand-built cases)."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medvl_jax.evaluate import metrics


# ----------------------------------------------------------------------------- Precision@k
def test_precision_at_k_hand_built():
  scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
  relevant = np.array([[1, 0, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
  np.testing.assert_allclose(metrics.precision_at_k(scores, relevant, 1), [1.0, 0.0])
  np.testing.assert_allclose(metrics.precision_at_k(scores, relevant, 2), [0.5, 0.0])
  np.testing.assert_allclose(metrics.precision_at_k(scores, relevant, 3), [2 / 3, 0.0])
  np.testing.assert_allclose(metrics.precision_at_k(scores, relevant, 5), [0.4, 0.4])


def _brute_force_expected(score_row, rel_row, k, fn):
  """Mean of `fn(top-k relevance)` over every order of the candidates consistent with scores."""
  vals = []
  for perm in itertools.permutations(range(len(score_row))):
    keys = [(-score_row[i], pos) for pos, i in enumerate(perm)]
    order = [perm[pos] for _, pos in sorted(keys)]
    vals.append(fn(rel_row[order[:k]]))
  return np.mean(vals)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_ties_equal_the_mean_over_tie_breaks(k):
  scores = np.array(
    [[0.5, 0.5, 0.5, 0.9, 0.1, 0.5], [0.2, 0.2, 0.2, 0.2, 0.2, 0.2], [0.7, 0.3, 0.3, 0.7, 0.3, 0.0]]
  )
  relevant = np.array([[1, 0, 0, 0, 1, 1], [0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1]], bool)
  p = metrics.precision_at_k(scores, relevant, k)
  h = metrics.hit_at_k(scores, relevant, k)
  for q in range(3):
    assert p[q] == pytest.approx(
      _brute_force_expected(scores[q], relevant[q], k, lambda r: r.mean())
    )
    assert h[q] == pytest.approx(
      _brute_force_expected(scores[q], relevant[q], k, lambda r: float(r.any()))
    )
  # Hand-worked: all six tied, one relevant -> P@k = 1/6 whatever k, hit@k = k/6.
  assert p[1] == pytest.approx(1 / 6) and h[1] == pytest.approx(k / 6)


def test_precision_no_relevant_is_zero_and_bad_k_raises():
  s = np.random.default_rng(0).normal(size=(2, 5))
  assert np.all(metrics.precision_at_k(s, np.zeros((2, 5), bool), 3) == 0)
  with pytest.raises(ValueError):
    metrics.precision_at_k(s, np.zeros((2, 5), bool), 6)


def test_hit_at_k_paired_identity():
  sim = np.eye(4) + 0.01 * np.arange(4)[None, :]
  np.testing.assert_allclose(metrics.hit_at_k(sim, np.eye(4, dtype=bool), 1), 1.0)


# ----------------------------------------------------------------------------- AUC
@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 60)
  s = np.round(rng.normal(size=60) + y, 1)  # Rounding makes many ties.
  assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_undefined_without_positives_or_negatives():
  assert metrics.roc_auc(np.zeros(5), np.arange(5)) is None
  assert metrics.roc_auc(np.ones(5), np.arange(5)) is None
  y = np.array([[0, 1], [0, 0], [0, 1], [0, 0]])
  s = np.array([[0.1, 0.9], [0.2, 0.2], [0.3, 0.7], [0.4, 0.1]])
  macro, per_class = metrics.macro_auc(y, s)
  assert per_class[0] is None and per_class[1] == pytest.approx(roc_auc_score(y[:, 1], s[:, 1]))
  assert macro == pytest.approx(1.0)


def test_roc_curve_area_matches_auc():
  rng = np.random.default_rng(3)
  y = rng.integers(0, 2, 80)
  s = np.round(rng.normal(size=80) + y, 1)
  fpr, tpr = metrics.roc_curve(y, s)
  assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
  assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s))


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_resamples_patients_and_is_seeded():
  # Two patients with 3 rows each of value 0, two with 1 row of value 1.
  values = np.array([0, 0, 0, 0, 0, 0, 1, 1], float)
  patients = ["a", "a", "a", "b", "b", "b", "c", "d"]
  seen_sizes = set()

  def mean_of(rows):
    seen_sizes.add(len(rows))
    return float(values[rows].mean())

  ci1 = metrics.bootstrap_ci(mean_of, patients, n_boot=200, seed=7)
  ci2 = metrics.bootstrap_ci(mean_of, patients, n_boot=200, seed=7)
  assert ci1 == ci2 and ci1["n_groups"] == 4 and ci1["n_boot"] == 200
  # Row counts are sums of whole patients' sizes (3 or 1), never e.g. 8 single rows drawn
  # independently: sizes in {4..12} made of 4 draws of 1 or 3.
  assert seen_sizes <= {4, 6, 8, 10, 12}
  assert 0 <= ci1["lo"] <= values.mean() <= ci1["hi"] <= 1


def test_bootstrap_skips_undefined_replicates():
  y = np.array([1, 0, 0, 0])
  s = np.array([0.9, 0.1, 0.2, 0.3])
  ci = metrics.bootstrap_ci(
    lambda r: metrics.roc_auc(y[r], s[r]), ["p", "q", "r", "t"], n_boot=100, seed=0
  )
  assert 0 < ci["n_boot"] < 100 and ci["lo"] == ci["hi"] == 1.0


# ----------------------------------------------------------------------------- fractions
def test_stratified_fraction_multiclass():
  labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
  idx = metrics.stratified_fraction(labels, 0.1, seed=0)
  counts = np.bincount(labels[idx], minlength=3)
  assert counts.tolist() == [9, 1, 1]
  np.testing.assert_array_equal(idx, metrics.stratified_fraction(labels, 0.1, seed=0))
  assert not np.array_equal(idx, metrics.stratified_fraction(labels, 0.1, seed=1))
  assert len(metrics.stratified_fraction(labels, 1.0, seed=0)) == 100


@pytest.mark.parametrize("seed", range(5))
def test_stratified_fraction_multilabel_never_empty(seed):
  rng = np.random.default_rng(100 + seed)
  labels = (rng.random((300, 6)) < [0.5, 0.2, 0.05, 0.01, 0.004, 0.0]).astype(int)
  idx = metrics.stratified_fraction(labels, 0.01, seed=seed)
  assert len(set(idx.tolist())) == len(idx)
  for c in range(6):
    if labels[:, c].any():
      assert labels[idx, c].sum() >= 1, c
    if (labels[:, c] == 0).any():
      assert (labels[idx, c] == 0).sum() >= 1, c
  assert len(idx) >= 3
  np.testing.assert_array_equal(idx, metrics.stratified_fraction(labels, 0.01, seed=seed))
  assert len(metrics.stratified_fraction(labels, 0.1, seed=seed)) == 30


def test_mean_std_skips_undefined():
  assert metrics.mean_std([1.0, None, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 2}
  assert metrics.mean_std([None]) == {"mean": None, "std": None, "n": 0}
