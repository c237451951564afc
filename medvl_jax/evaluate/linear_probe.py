"""Linear probe: frozen pooled image features h_v, L2-regularised logistic regression.

Task on the bundled sample (real data): COVID-19 vs other findings on frontal views of the
paired sample's `covid_cxr_notes` images; train on `train_split`, test on `test_splits` (patient
disjoint by construction). Rows whose finding is in `exclude` ('todo': unlabelled upstream) are
dropped. The classifier is scikit-learn's `LogisticRegression` (lbfgs, `C=c`; see
`fit_logistic`). Features are computed once per `run` and reused for every fraction and seed;
each label fraction (stratified, >= 1 positive and 1 negative) is fitted with several seeds and
reported as mean and std of the test AUC / accuracy; the seed-0 fit carries a 95% bootstrap CI
over test patients.

Any registered labelled corpus, by name (`dataset='chexpert'`, with its `builder_config` and
`data_dir`; see `datasets.py`): train on `train_split`, test on `test_splits` (default 'test').
`task_type='multilabel'` (default; every corpus but COVIDx): one-vs-rest logistic regression per
class, AUC per class (`linear_probe/auc_<frac>/<class>`, None where the test rows of the class
lack positives or negatives, or the sampled train rows do) and their macro mean
(`linear_probe/auc_<frac>`, over defined classes, with std over seeds and a patient-bootstrap
CI); uncertain labels (-1, CheXpert `u_ignore`) are masked per class. `task_type='multiclass'`
(COVIDx): one-vs-rest scores, the argmax is the prediction, accuracy `linear_probe/acc_<frac>`
(mean, std, CI), plus the one-vs-rest AUCs as above.
Label fractions are stratified as for the sample (`metrics.stratified_fraction`).
"""

from collections.abc import Iterator
import pathlib
import re
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from medvl_jax.errors import ConfigError, DataError
from medvl_jax.evaluate import datasets, features, metrics, plots

# lbfgs stopping tolerance: scikit-learn's default (1e-4) leaves test probabilities up to ~3e-3
# from the optimum at 2,048 features, 1e-6 up to ~1e-3; 1e-8 brings them within ~1e-5 of an
# exact Newton solve (bench/linear_probe.py) at little cost in the rows' span (see fit_logistic).
TOL, MAX_ITER = 1e-8, 5000


def row_basis(x: np.ndarray) -> np.ndarray | None:
  """Orthonormal basis [D, N] of a space holding the rows of x [N, D] (QR of x^T; the span of
  the rows if they are independent), or None if N >= D (no narrower space)."""
  if len(x) >= x.shape[1]:
    return None
  q, _ = np.linalg.qr(np.asarray(x, np.float64).T)
  return q


def fit_logistic(
  x: np.ndarray, y: np.ndarray, c: float = 1.0, basis: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
  """Binary L2 logistic regression, scikit-learn's `LogisticRegression(C=c)` (lbfgs): minimises
  sum_i log-loss_i + ||w||^2 / (2c), the bias not penalised. Returns (w, b).

  With fewer rows than features (a probe on 2,048 features), the optimal w lies in the span of
  the rows (any component orthogonal to them raises the penalty and changes no logit), so the
  fit runs on the rows' coordinates in `basis` (default: `row_basis(x)`; any orthonormal basis
  of a space containing the rows gives the same optimum) and w is mapped back: the same
  objective and minimiser, one probe in seconds where the full width took minutes
  (bench/linear_probe.py; figures in bench/RESULTS.md).
  """
  x = np.asarray(x, np.float64)
  if basis is None:
    basis = row_basis(x)
  z = x if basis is None else x @ basis
  model = LogisticRegression(C=c, tol=TOL, max_iter=MAX_ITER).fit(z, np.asarray(y))
  w = model.coef_[0] if basis is None else basis @ model.coef_[0]
  return w, float(model.intercept_[0])


def slug(name: str) -> str:
  """A class name as a metric-name part: 'No Finding' -> 'no_finding'."""
  return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_") or "class"


def masked_auc(y: np.ndarray, score: np.ndarray | None, fast: bool = False) -> float | None:
  """AUC of one class over its rows with a known label (y >= 0); None if undefined."""
  if score is None:
    return None
  known = y >= 0
  return metrics.roc_auc(y[known] == 1, score[known], fast)


def one_vs_rest_scores(
  x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, c: float = 1.0
) -> list[np.ndarray | None]:
  """Per class k, the test scores of a logistic fit of column k (rows with y >= 0 only);
  None for a class whose train rows lack positives or negatives."""
  out = []
  basis = row_basis(np.asarray(x_train, np.float64))  # One SVD, shared by every class.
  for k in range(y_train.shape[1]):
    known = y_train[:, k] >= 0
    yk = y_train[known, k]
    if not len(yk) or yk.min() == yk.max():
      out.append(None)
      continue
    w, b = fit_logistic(x_train[known], yk, c, basis)
    out.append(x_test @ w + b)
  return out


def macro_masked_auc(
  y: np.ndarray, scores: list[np.ndarray | None], fast: bool = False
) -> float | None:
  defined = [
    a for a in (masked_auc(y[:, k], s, fast) for k, s in enumerate(scores)) if a is not None
  ]
  return float(np.mean(defined)) if defined else None


def probe_labels(
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  patients: np.ndarray,
  *,
  task_type: str = "multilabel",
  names=(),
  fractions=(0.01, 0.1, 1.0),
  seeds=(0, 1, 2),
  c: float = 1.0,
  n_boot: int = 1000,
) -> tuple[list[tuple[str, float | None]], dict]:
  """Linear probe on [N, C] labels: `train` and `test` are (features, labels) pairs, the
  features already standardised, `patients` the test rows' patient ids; returns
  (metrics as (name, value), {'curves': {legend: (fpr, tpr, auc)}} of the largest fraction,
  first seed). See the module docstring for the metric names."""
  (x_train, y_train), (x_test, y_test) = train, test
  y_train, y_test = np.asarray(y_train), np.asarray(y_test)
  n_classes = y_train.shape[1]
  names = list(names) or [str(k) for k in range(n_classes)]
  multiclass = task_type == "multiclass"
  if multiclass:  # One-hot -> class ids; stratify on the ids.
    ids_train, ids_test = y_train.argmax(1), y_test.argmax(1)
  out: list[tuple[str, float | None]] = []
  curves: dict[str, tuple] = {}
  for frac in fractions:
    tag = f"{round(frac * 100):g}pct"
    macro, per_class, accs, ci = [], [[] for _ in range(n_classes)], [], {}
    for seed in seeds:
      idx = metrics.stratified_fraction(ids_train if multiclass else y_train, frac, seed)
      scores = one_vs_rest_scores(x_train[idx], y_train[idx], x_test, c)
      aucs = [masked_auc(y_test[:, k], s) for k, s in enumerate(scores)]
      for k, a in enumerate(aucs):
        per_class[k].append(a)
      defined = [a for a in aucs if a is not None]
      macro.append(float(np.mean(defined)) if defined else None)
      if multiclass:
        stacked = np.stack(
          [s if s is not None else np.full(len(x_test), -np.inf) for s in scores], 1
        )
        pred = stacked.argmax(1)
        accs.append(metrics.accuracy(ids_test, pred))
      if seed == seeds[0]:
        if multiclass:
          ci = metrics.bootstrap_ci(
            lambda r, p=pred: metrics.accuracy(ids_test[r], p[r]),
            patients,
            n_boot=n_boot,
            seed=seed,
          )
        else:
          ci = metrics.bootstrap_ci(
            lambda r, s=scores: macro_masked_auc(
              y_test[r], [None if x is None else x[r] for x in s], fast=True
            ),
            patients,
            n_boot=n_boot,
            seed=seed,
          )
        if frac == max(fractions):
          for k, s in enumerate(scores):
            known = y_test[:, k] >= 0
            curve = None if s is None else metrics.roc_curve(y_test[known, k], s[known])
            if curve is not None:
              curves[names[k]] = (*curve, aucs[k])
    if multiclass:
      acc = metrics.mean_std(accs)
      out += [
        (f"linear_probe/acc_{tag}", acc["mean"]),
        (f"linear_probe/acc_{tag}_std", acc["std"]),
        (f"linear_probe/acc_{tag}_ci_lo", ci["lo"]),
        (f"linear_probe/acc_{tag}_ci_hi", ci["hi"]),
      ]
    auc = metrics.mean_std(macro)
    out += [(f"linear_probe/auc_{tag}", auc["mean"]), (f"linear_probe/auc_{tag}_std", auc["std"])]
    if not multiclass:
      out += [
        (f"linear_probe/auc_{tag}_ci_lo", ci["lo"]),
        (f"linear_probe/auc_{tag}_ci_hi", ci["hi"]),
      ]
    out += [
      (f"linear_probe/auc_{tag}/{slug(n)}", metrics.mean_std(v)["mean"])
      for n, v in zip(names, per_class)
    ]
  out += [
    ("linear_probe/n_train", float(len(y_train))),
    ("linear_probe/n_test", float(len(y_test))),
  ]
  return out, {"curves": curves}


class Evaluator:
  """`Evaluator(encoders, **cfg).run(state)` yields ('linear_probe/<metric>', value)."""

  def __init__(
    self,
    encoders: features.Encoders,
    *,
    positive: str = "COVID-19",
    exclude=("todo",),
    frontal_only: bool = True,
    train_split: str = "train",
    test_splits=None,
    fractions=(0.01, 0.1, 1.0),
    seeds=(0, 1, 2),
    c: float = 1.0,
    n_boot: int = 1000,
    dataset: str | None = None,
    builder_config: str | None = None,
    data_dir: str | None = None,
    label_names=None,
    task_type: str | None = None,
  ):
    self.enc, self.positive, self.exclude = encoders, positive, tuple(exclude)
    self.frontal_only, self.train_split = frontal_only, train_split
    if isinstance(test_splits, str):
      test_splits = (test_splits,)
    self.fractions, self.seeds, self.c, self.n_boot = tuple(fractions), tuple(seeds), c, n_boot
    self.dataset, self.builder_config, self.data_dir = dataset or None, builder_config, data_dir
    if self.dataset is None:
      self.test_splits = tuple(test_splits or ("validation", "test"))
    else:
      datasets.builder(self.dataset, builder_config, data_dir)  # Fail early: name, prepared.
      self.test_splits = tuple(test_splits or ("test",))
      self.task_type = task_type or datasets.default_task_type(self.dataset)
      if self.task_type not in ("multilabel", "multiclass"):
        raise ConfigError(
          f"linear_probe: task_type={self.task_type!r}; valid: 'multilabel', 'multiclass'"
        )
      names = label_names or datasets.label_names(self.dataset)
      self.label_names = tuple(names) if names else None
    self._data = None
    self.details: dict[str, Any] = {}

  def _load_dataset(self) -> dict[str, dict[str, np.ndarray]]:
    kw = dict(
      builder_config=self.builder_config,
      data_dir=self.data_dir,
      image_size=self.enc.image_size,
      resize=self.enc.resize,
      frontal_only=self.frontal_only,
    )
    parts = {
      "train": [datasets.load_split(self.dataset, self.train_split, **kw)],
      "test": [datasets.load_split(self.dataset, s, **kw) for s in self.test_splits],
    }
    data = {}
    for name, splits in parts.items():
      d = {k: np.concatenate([s[k] for s in splits]) for k in splits[0]}
      d["label"] = d.pop("labels")
      if not len(d["label"]):
        raise DataError(f"linear_probe: {self.dataset} {name} split(s) hold no rows")
      data[name] = d
    n_classes = data["train"]["label"].shape[1]
    if self.label_names is None:
      self.label_names = tuple(str(k) for k in range(n_classes))
    if len(self.label_names) != n_classes:
      raise ConfigError(
        f"linear_probe: label_names has {len(self.label_names)} names, "
        f"{self.dataset} has {n_classes} label columns"
      )
    y = data["train"]["label"]
    if self.task_type == "multiclass":
      if len(np.unique(y.argmax(1))) < 2:
        raise DataError(f"linear_probe: the {self.dataset} train split needs >= 2 classes")
    elif not any((y[:, k] == 1).any() and (y[:, k] == 0).any() for k in range(n_classes)):
      raise DataError(
        f"linear_probe: no class of {self.dataset}'s train split has both "
        "positive and negative rows"
      )
    return data

  def _load(self) -> dict[str, dict[str, np.ndarray]]:
    if self._data is None and self.dataset is not None:
      self._data = self._load_dataset()
    if self._data is None:
      self._data = features.load_sample_task(
        self.enc.config,
        self.positive,
        self.exclude,
        self.frontal_only,
        self.train_split,
        tuple(self.test_splits),
        "linear_probe",
      )
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
    if self.dataset is not None:
      values, self.details = probe_labels(
        (x_train, y_train),
        (x_test, y_test),
        patients,
        task_type=self.task_type,
        names=self.label_names,
        fractions=self.fractions,
        seeds=self.seeds,
        c=self.c,
        n_boot=self.n_boot,
      )
      yield from values
      return
    self.details = {"curves": {}}

    def fit_score(rows, seed):  # pylint: disable=unused-argument
      w, b = fit_logistic(x_train[rows], y_train[rows], self.c)
      return x_test @ w + b

    yield from metrics.binary_fraction_sweep(
      "linear_probe",
      fit_score,
      y_train,
      y_test,
      patients,
      fractions=self.fractions,
      seeds=self.seeds,
      n_boot=self.n_boot,
      curves=self.details["curves"],
    )
    yield "linear_probe/n_train", float(len(y_train))
    yield "linear_probe/n_test", float(len(y_test))
    yield "linear_probe/test_prevalence", float(y_test.mean())

  def write_plots(self, out: pathlib.Path) -> list[str]:
    if self.dataset is not None:
      plots.roc_curves(
        out / "linear_probe_roc.png",
        self.details["curves"],
        f"linear probe: {self.dataset} {self.task_type}, "
        f"{round(max(self.fractions) * 100):g}% labels (seed {self.seeds[0]})",
      )
      return ["linear_probe_roc.png"]
    plots.roc_curves(
      out / "linear_probe_roc.png",
      self.details["curves"],
      f"linear probe: {self.positive} vs other (test split, seed {self.seeds[0]})",
    )
    return ["linear_probe_roc.png"]
