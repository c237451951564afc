"""scikit-learn's AUC / ROC and the linear probe against independent computations: a NumPy
Mann-Whitney count over all positive-negative pairs, and scipy's L-BFGS on the L2-regularised
log-loss written out here."""

import numpy as np
import pytest
from scipy import optimize
from sklearn.linear_model import LogisticRegression

from medvl_jax.evaluate import linear_probe, metrics


def mann_whitney_auc(y: np.ndarray, s: np.ndarray) -> float:
  """P(score of a positive > score of a negative) + P(tie) / 2, over every pair."""
  pos, neg = s[y == 1], s[y == 0]
  diff = pos[:, None] - neg[None, :]
  return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_mann_whitney_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(20, 300))
  y = rng.integers(0, 2, n)
  s = np.round(rng.normal(size=n) + 0.8 * y, 1)  # Rounding makes many ties.
  assert len(np.unique(s)) < n  # Ties present.
  assert metrics.roc_auc(y, s) == pytest.approx(mann_whitney_auc(y, s), abs=1e-9)


def test_auc_all_tied_is_half_and_undefined_is_none():
  assert metrics.roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5, abs=1e-12)
  assert metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
  assert metrics.roc_curve([0, 0], [0.1, 0.2]) is None
  assert metrics.accuracy([], []) is None


def test_roc_curve_points_are_the_thresholded_rates():
  """Every (fpr, tpr) point is the rates at some threshold, computed here by counting."""
  rng = np.random.default_rng(4)
  y = rng.integers(0, 2, 120)
  s = np.round(rng.normal(size=120) + y, 1)
  fpr, tpr = metrics.roc_curve(y, s)
  counted = {(0.0, 0.0)} | {
    (float((s[y == 0] >= t).mean()), float((s[y == 1] >= t).mean())) for t in np.unique(s)
  }
  for point in zip(fpr, tpr):
    assert min(abs(point[0] - a) + abs(point[1] - b) for a, b in counted) < 1e-12
  assert np.trapezoid(tpr, fpr) == pytest.approx(mann_whitney_auc(y, s), abs=1e-9)


def _features(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Standardised ReLU features with low-rank structure (like pooled CNN features) and a label
  that depends on them."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, 32))
  h = np.maximum(z @ rng.normal(size=(32, d)) + 0.5 * rng.normal(size=(n, d)), 0)
  x = (h - h.mean(0)) / (h.std(0) + 1e-6)
  y = (z[:, 0] + 0.7 * rng.normal(size=n) > 0.8).astype(int)
  return x, y


def scipy_logistic(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
  """argmin_w,b sum_i [log(1 + exp(s_i)) - y_i s_i] + ||w||^2 / (2c), s = x w + b."""
  xb = np.concatenate([x, np.ones((len(x), 1))], 1)

  def loss(v):
    s = xb @ v
    p = 1 / (1 + np.exp(-s))
    grad = xb.T @ (p - y)
    grad[:-1] += v[:-1] / c
    return float(np.sum(np.logaddexp(0, s) - y * s) + v[:-1] @ v[:-1] / (2 * c)), grad

  res = optimize.minimize(
    loss,
    np.zeros(xb.shape[1]),
    jac=True,
    method="L-BFGS-B",
    options=dict(maxiter=50_000, gtol=1e-10, ftol=1e-16),
  )
  return res.x[:-1], float(res.x[-1])


def _prob(x, w, b):
  return 1 / (1 + np.exp(-(x @ w + b)))


@pytest.mark.parametrize("n,d,c", [(150, 2048, 1.0), (60, 2048, 0.1), (400, 30, 0.5)])
def test_probe_probabilities_equal_an_independent_solve(n, d, c):
  """Wide (rows < features: fitted in the rows' span) and tall cases, train and test rows."""
  x, y = _features(n + 100, d, seed=n)
  x_tr, y_tr, x_te = x[:n], y[:n], x[n:]
  w, b = linear_probe.fit_logistic(x_tr, y_tr, c)
  w_ref, b_ref = scipy_logistic(x_tr, y_tr, c)
  for rows in (x_tr, x_te):
    np.testing.assert_allclose(_prob(rows, w, b), _prob(rows, w_ref, b_ref), atol=1e-3)
  # And scikit-learn on all 2,048 features directly (no row basis), tight tolerance.
  ref = LogisticRegression(C=c, tol=1e-8, max_iter=20_000).fit(x_tr, y_tr)
  np.testing.assert_allclose(_prob(x_te, w, b), ref.predict_proba(x_te)[:, 1], atol=1e-3)


def test_one_vs_rest_masks_uncertain_rows_and_shares_the_basis():
  x, _ = _features(220, 2048, seed=7)
  rng = np.random.default_rng(7)
  y = (x[:, :3] + rng.normal(size=(220, 3)) > 0.5).astype(int)
  y[rng.random((220, 3)) < 0.1] = -1  # Uncertain: left out of that class's fit only.
  y[:, 2] = np.where(y[:, 2] == -1, -1, 0)  # No positives: no fit, None.
  scores = linear_probe.one_vs_rest_scores(x[:120], y[:120], x[120:], c=1.0)
  assert scores[2] is None
  for k in (0, 1):
    known = y[:120, k] >= 0
    w_ref, b_ref = scipy_logistic(x[:120][known], y[:120, k][known], 1.0)
    np.testing.assert_allclose(
      1 / (1 + np.exp(-scores[k])), _prob(x[120:], w_ref, b_ref), atol=1e-3
    )


def test_sample_probe_end_to_end_equals_independent_solve(short_run):
  """On the real sample's features of a smoke checkpoint, per fraction (seed 0): the probe's test
  probabilities equal an independent scipy fit's (1e-3), and the evaluator's AUC equals a
  Mann-Whitney count over the probe's test scores (1e-9)."""
  from medvl_jax.evaluate import features, runs  # pylint: disable=g-import-not-at-top

  _, encoders, state, _ = runs.load_run(short_run, None)
  ev = linear_probe.Evaluator(encoders, n_boot=20, seeds=(0,))
  got = dict(ev.run(state))
  data = ev._load()  # pylint: disable=protected-access
  variables = features.variables_of(state)
  h_tr, _ = encoders.images(variables, data["train"]["image"])
  h_te, _ = encoders.images(variables, data["test"]["image"])
  mean, std = h_tr.mean(0), h_tr.std(0) + 1e-6
  x_tr, x_te = (h_tr - mean) / std, (h_te - mean) / std
  y_tr, y_te = data["train"]["label"], data["test"]["label"]
  for frac in (0.01, 0.1, 1.0):
    idx = metrics.stratified_fraction(y_tr, frac, 0)
    w, b = linear_probe.fit_logistic(x_tr[idx], y_tr[idx])
    w_ref, b_ref = scipy_logistic(x_tr[idx], y_tr[idx], 1.0)
    np.testing.assert_allclose(_prob(x_te, w, b), _prob(x_te, w_ref, b_ref), atol=1e-3)
    want = mann_whitney_auc(y_te, x_te @ w + b)
    assert got[f"linear_probe/auc_{round(frac * 100):g}pct"] == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_fast_bootstrap_auc_equals_sklearn(seed):
  """The rank-based AUC of bootstrap replicates (metrics.roc_auc(fast=True)) is sklearn's."""
  rng = np.random.default_rng(10 + seed)
  y = rng.integers(0, 2, 200)
  s = np.round(rng.normal(size=200) + y, 1)
  assert metrics.roc_auc(y, s, fast=True) == pytest.approx(metrics.roc_auc(y, s), abs=1e-12)
  assert metrics.roc_auc(y, s, fast=True) == pytest.approx(mann_whitney_auc(y, s), abs=1e-9)
  assert metrics.roc_auc(np.ones(5), s[:5], fast=True) is None
