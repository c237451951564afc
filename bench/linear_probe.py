r"""Time per linear probe at the real feature width (2,048): old Newton solver vs scikit-learn.

  python bench/linear_probe.py [--ref_fits=3] [--threads=1]

A probe = every (label fraction x seed x label) logistic fit of `linear_probe.probe_labels`:
fractions 1%/10%/100%, seeds 0/1/2, 14 labels (NIH-style prevalences) = up to 126 fits (a class
whose sampled rows lack positives is skipped, as in the probe). Features: standardised ReLU
features of low-rank structure plus noise (like pooled CNN features), labels that depend on
them. Cases: 600 train / 300 test rows, and the NIH-sample size (362 train / 156 test rows, the
split of the bundled 621 NIH images).

Compared, in one run:
  old     the removed hand-written Newton solver (a 2,049 x 2,049 solve per step; copied below
          as it was): exact, the reference for the probability differences;
  sklearn scikit-learn LogisticRegression(C=1, lbfgs, tol=linear_probe.TOL) on all 2,048
          features (old and sklearn: timed on `--ref_fits` fits at 100% labels, scaled to the
          probe's fit count);
  new     linear_probe.one_vs_rest_scores: the same scikit-learn fit on the rows' coordinates in
          an orthonormal basis of a space holding them (one QR per fraction and seed, shared by
          the labels), every fit of the probe timed.
Prints seconds per probe and the largest test-probability difference to the old solver.
"""

import argparse
import os
import sys
import time

import numpy as np


def old_fit_logistic(x, y, c=1.0, iters=100):
  """The removed solver (medvl_jax/evaluate/linear_probe.py before scikit-learn), unchanged."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  reg = np.full(xb.shape[1], 1.0 / c)
  reg[-1] = 0.0
  w = np.zeros(xb.shape[1])
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-(xb @ w)))
    grad = xb.T @ (p - y) + reg * w
    hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg) + 1e-10 * np.eye(len(w))
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.max(np.abs(step)) < 1e-10:
      break
  return w[:-1], float(w[-1])


PREVALENCE = [
  0.10,
  0.025,
  0.12,
  0.18,
  0.05,
  0.056,
  0.013,
  0.047,
  0.04,
  0.02,
  0.022,
  0.015,
  0.03,
  0.004,
]  # The 14 NIH labels, roughly as in ChestX-ray14.


def make_data(n_train, n_test, d=2048, seed=0):
  rng = np.random.default_rng(seed)
  n = n_train + n_test
  z = rng.normal(size=(n, 64))
  h = np.maximum(z @ rng.normal(size=(64, d)) / 8 + 0.5 * rng.normal(size=(n, d)), 0)
  x = (h - h[:n_train].mean(0)) / (h[:n_train].std(0) + 1e-6)
  logits = z[:, :14] + 0.7 * rng.normal(size=(n, 14))
  cut = [np.quantile(logits[:, k], 1 - p) for k, p in enumerate(PREVALENCE)]
  y = (logits > np.array(cut)).astype(np.int32)
  return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def fit_sets(y_train, fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2)):
  """[(train rows, [labels with both classes among them])] of one probe."""
  from medvl_jax.evaluate import metrics  # pylint: disable=g-import-not-at-top

  out = []
  for frac in fractions:
    for seed in seeds:
      idx = metrics.stratified_fraction(y_train, frac, seed)
      yk = y_train[idx]
      out.append((idx, [k for k in range(yk.shape[1]) if 0 < yk[:, k].sum() < len(idx)]))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument(
    "--ref_fits", type=int, default=3, help="Fits timed for old and sklearn full (old: ~6 s each)."
  )
  ap.add_argument(
    "--threads", type=int, default=0, help="BLAS threads (threadpoolctl); 0 = the library default."
  )
  args = ap.parse_args()
  if args.threads:
    import threadpoolctl  # pylint: disable=g-import-not-at-top

    threadpoolctl.threadpool_limits(args.threads)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top

  from medvl_jax.evaluate import linear_probe  # pylint: disable=g-import-not-at-top

  print(
    f"cpus: {os.cpu_count()}, BLAS threads: {args.threads or 'default'}, "
    f"numpy {np.__version__}, load average {os.getloadavg()[0]:.1f}"
  )
  for name, n_train, n_test in (("600 rows", 600, 300), ("NIH sample", 362, 156)):
    x_tr, y_tr, x_te, _ = make_data(n_train, n_test)
    sets = fit_sets(y_tr)
    n_fits = sum(len(ks) for _, ks in sets)

    t = time.perf_counter()
    new = []
    for idx, _ in sets:
      new.append(linear_probe.one_vs_rest_scores(x_tr[idx], y_tr[idx], x_te, 1.0))
    t_new = time.perf_counter() - t

    # Old and sklearn-full: the largest fraction's fits (the slowest), first `ref_fits` of
    # them, scaled to the probe's fit count. Differences are to the old (exact Newton) fit.
    idx, ks = sets[-1]
    ks = ks[: args.ref_fits]
    t_old = t_sk = diff_new = diff_sk = 0.0
    for k in ks:
      t = time.perf_counter()
      w, b = old_fit_logistic(x_tr[idx], y_tr[idx, k])
      t_old += time.perf_counter() - t
      p_old = 1 / (1 + np.exp(-(x_te @ w + b)))
      t = time.perf_counter()
      m = LogisticRegression(C=1.0, tol=linear_probe.TOL, max_iter=linear_probe.MAX_ITER)
      p_sk = m.fit(x_tr[idx], y_tr[idx, k]).predict_proba(x_te)[:, 1]
      t_sk += time.perf_counter() - t
      diff_sk = max(diff_sk, float(np.abs(p_sk - p_old).max()))
      diff_new = max(diff_new, float(np.abs(p_old - 1 / (1 + np.exp(-new[-1][k]))).max()))
    t_old, t_sk = t_old / len(ks) * n_fits, t_sk / len(ks) * n_fits

    print(
      f"{name}: {n_train} train x 2048 features, {n_test} test rows, 14 labels, "
      f"{n_fits} fits per probe"
    )
    print(f"  old Newton   {t_old:7.1f} s/probe ({t_old / n_fits:.2f} s/fit, from {len(ks)} fits)")
    print(
      f"  sklearn full {t_sk:7.1f} s/probe ({t_sk / n_fits:.2f} s/fit, from {len(ks)} fits)"
      f"   max |p - p_old| {diff_sk:.1e}"
    )
    print(
      f"  new          {t_new:7.1f} s/probe ({t_new / n_fits:.2f} s/fit, all fits)"
      f"   max |p - p_old| {diff_new:.1e}"
    )
    print(f"  new is {t_old / t_new:.0f}x faster than old, {t_sk / t_new:.0f}x than sklearn full")


if __name__ == "__main__":
  main()
