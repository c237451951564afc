"""Linear probe: frozen pooled image features h_v, L2-regularised logistic regression.

Task on the bundled sample (real data): COVID-19 vs other findings on frontal views of the
paired sample's `covid_cxr_notes` images; train on `train_split`, test on `test_splits` (patient
disjoint by construction). Rows whose finding is in `exclude` ('todo': unlabelled upstream) are
dropped. Features are computed once per `run` and reused for every fraction and seed; each
label fraction (stratified, >= 1 positive and 1 negative) is fitted with several seeds and
reported as mean and std of the test AUC / accuracy; the seed-0 fit carries a 95% bootstrap CI
over test patients.
"""
import pathlib
from typing import Any, Iterator

import numpy as np

from medvl_jax.errors import DataError
from medvl_jax.evaluate import features
from medvl_jax.evaluate import metrics
from medvl_jax.evaluate import plots


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0, iters: int = 100
                 ) -> tuple[np.ndarray, float]:
  """Binary logistic regression by Newton's method: minimises
  sum_i log-loss_i + ||w||^2 / (2c) (the bias is not penalised), as scikit-learn's
  `LogisticRegression(C=c)`. Returns (w, b)."""
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


class Evaluator:
  """`Evaluator(encoders, **cfg).run(state)` yields ('linear_probe/<metric>', value)."""

  def __init__(self, encoders: features.Encoders, *, positive: str = "COVID-19",
               exclude=("todo",), frontal_only: bool = True, train_split: str = "train",
               test_splits=("validation", "test"), fractions=(0.01, 0.1, 1.0),
               seeds=(0, 1, 2), c: float = 1.0, n_boot: int = 1000):
    self.enc, self.positive, self.exclude = encoders, positive, tuple(exclude)
    self.frontal_only, self.train_split, self.test_splits = frontal_only, train_split, test_splits
    self.fractions, self.seeds, self.c, self.n_boot = tuple(fractions), tuple(seeds), c, n_boot
    self._data = None
    self.details: dict[str, Any] = {}

  def _load(self) -> dict[str, dict[str, np.ndarray]]:
    if self._data is None:
      cfg = self.enc.config
      parts = {"train": [features.load_sample_split(cfg, self.train_split, self.frontal_only)],
               "test": [features.load_sample_split(cfg, s, self.frontal_only)
                        for s in self.test_splits]}
      data = {}
      for name, splits in parts.items():
        d = {k: np.concatenate([s[k] for s in splits]) for k in splits[0]}
        keep = ~np.isin(d["finding"], self.exclude)
        d = {k: v[keep] for k, v in d.items()}
        d["label"] = np.char.startswith(d["finding"].astype(str), self.positive).astype(int)
        if len(np.unique(d["label"])) < 2:
          raise DataError(f"linear_probe: the {name} split(s) need both {self.positive!r} and "
                          f"other findings; got {len(d['label'])} rows, "
                          f"{int(d['label'].sum())} positive")
        data[name] = d
      self._data = data
    return self._data

  def run(self, state: Any) -> Iterator[tuple[str, float]]:
    data = self._load()
    variables = features.variables_of(state)
    h_train, _ = self.enc.images(variables, data["train"]["image"])  # Cached for all fits.
    h_test, _ = self.enc.images(variables, data["test"]["image"])
    mean, std = h_train.mean(0), h_train.std(0) + 1e-6
    x_train, x_test = (h_train - mean) / std, (h_test - mean) / std
    y_train, y_test = data["train"]["label"], data["test"]["label"]
    patients = data["test"]["patient_id"]
    self.details = {"curves": {}}
    for frac in self.fractions:
      aucs, accs = [], []
      tag = f"{round(frac * 100):g}pct"
      for seed in self.seeds:
        idx = metrics.stratified_fraction(y_train, frac, seed)
        w, b = fit_logistic(x_train[idx], y_train[idx], self.c)
        score = x_test @ w + b
        aucs.append(metrics.roc_auc(y_test, score))
        accs.append(metrics.accuracy(y_test, (score > 0).astype(int)))
        if seed == self.seeds[0]:
          ci = metrics.bootstrap_ci(lambda r, s=score: metrics.roc_auc(y_test[r], s[r]),
                                    patients, n_boot=self.n_boot, seed=seed)
          curve = metrics.roc_curve(y_test, score)
          if curve is not None:
            self.details["curves"][f"{tag} labels (n={len(idx)})"] = (*curve, aucs[-1])
      auc, acc = metrics.mean_std(aucs), metrics.mean_std(accs)
      yield f"linear_probe/auc_{tag}", auc["mean"]
      yield f"linear_probe/auc_{tag}_std", auc["std"]
      yield f"linear_probe/auc_{tag}_ci_lo", ci["lo"]
      yield f"linear_probe/auc_{tag}_ci_hi", ci["hi"]
      yield f"linear_probe/acc_{tag}", acc["mean"]
      yield f"linear_probe/acc_{tag}_std", acc["std"]
    yield "linear_probe/n_train", float(len(y_train))
    yield "linear_probe/n_test", float(len(y_test))
    yield "linear_probe/test_prevalence", float(y_test.mean())

  def write_plots(self, out: pathlib.Path) -> list[str]:
    plots.roc_curves(out / "linear_probe_roc.png", self.details["curves"],
                     f"linear probe: {self.positive} vs other (test split, seed "
                     f"{self.seeds[0]})")
    return ["linear_probe_roc.png"]
