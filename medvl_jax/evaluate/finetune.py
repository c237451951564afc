"""Fine-tuning: the image tower trained end to end with a linear head on a labelled task.

Same task, rows, label fractions, seeds and metrics as `linear_probe` (COVID-19 vs other
findings, frontal views of the bundled sample; train on `train_split`, test on `test_splits`,
patient-disjoint): for every fraction (stratified, >= 1 positive and 1 negative) and seed, the
run's image tower (params and BatchNorm statistics) and a fresh linear head on the pooled
features h_v are trained with optax Adam (`lr`, `epochs`, `batch_size`) on sigmoid
cross-entropy, without augmentation (the eval centre crop), then scored on the test rows (BatchNorm
in inference mode). Reported: test AUC / accuracy mean and std over seeds, the first seed's
AUC with a 95% bootstrap CI over test patients. The checkpoint itself is never modified.

Cost: epochs * ceil(n / batch_size) steps per fit, one compile per evaluator (fixed batch
shape: a batch is filled by cycling a per-epoch permutation of the fraction's rows).
"""

from collections.abc import Iterator
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medvl_jax.evaluate import features, metrics, plots


class FineTuner:
  """Jitted train/predict functions of an image tower + linear head (one compile each)."""

  def __init__(self, model: Any, lr: float, batch_size: int, weight_decay: float = 0.0):
    self.batch_size = batch_size
    self.tx = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)

    def logits_fn(params, batch_stats, images, train):
      variables = {"params": params["model"], "batch_stats": batch_stats}
      if train:
        h, upd = model.apply(
          variables, images, True, method=type(model).encode_image, mutable=["batch_stats"]
        )
        batch_stats = upd["batch_stats"]
      else:
        h = model.apply(variables, images, False, method=type(model).encode_image)
      return h @ params["head"]["w"] + params["head"]["b"], batch_stats

    def loss_fn(params, batch_stats, images, labels):
      logits, batch_stats = logits_fn(params, batch_stats, images, True)
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), batch_stats

    def train_step(params, batch_stats, opt_state, images, labels):
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images, labels
      )
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    self._train_step = jax.jit(train_step)
    self._logits = jax.jit(lambda p, bs, x: logits_fn(p, bs, x, False)[0])

  def init(self, variables: dict[str, Any], feature_dim: int, seed: int) -> dict[str, Any]:
    """Trainable params: the image tower (copied) and a small random linear head."""
    w = 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (feature_dim,), jnp.float32)
    params = {
      "model": {"image": variables["params"]["image"]},
      "head": {"w": w, "b": jnp.zeros((), jnp.float32)},
    }
    return {"params": params, "batch_stats": variables["batch_stats"]}

  def fit(
    self, start: dict[str, Any], images: np.ndarray, labels: np.ndarray, epochs: int, seed: int
  ) -> tuple[dict[str, Any], list[float]]:
    """Adam for `epochs` passes over (images, labels); returns (trained state, step losses)."""
    params, batch_stats = start["params"], start["batch_stats"]
    opt_state = self.tx.init(params)
    rng = np.random.default_rng(seed)
    n, b = len(labels), self.batch_size
    losses = []
    for _ in range(epochs):
      order = rng.permutation(n)
      order = np.resize(order, math.ceil(n / b) * b)  # Cycles: fixed batch shape.
      for i in range(0, len(order), b):
        idx = order[i : i + b]
        params, batch_stats, opt_state, loss = self._train_step(
          params, batch_stats, opt_state, images[idx], labels[idx].astype(np.float32)
        )
        losses.append(float(loss))
    return dict(start, params=params, batch_stats=batch_stats), losses

  def logits(self, state: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Inference-mode logits [N], in padded batches of the training batch size."""
    n, b = len(images), self.batch_size
    out = []
    for i in range(0, n, b):
      chunk = images[i : i + b]
      pad = b - len(chunk)
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(self._logits(state["params"], state["batch_stats"], chunk))[: b - pad])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def loss(self, state: dict[str, Any], images: np.ndarray, labels: np.ndarray) -> float:
    """Mean sigmoid cross-entropy in inference mode over a whole set."""
    z = self.logits(state, images)
    return float(np.mean(optax.sigmoid_binary_cross_entropy(z, labels.astype(np.float32))))


class Evaluator:
  """`Evaluator(encoders, **cfg).run(state)` yields ('finetune/<metric>', value)."""

  def __init__(
    self,
    encoders: features.Encoders,
    *,
    positive: str = "COVID-19",
    exclude=("todo",),
    frontal_only: bool = True,
    train_split: str = "train",
    test_splits=("validation", "test"),
    fractions=(0.01, 0.1, 1.0),
    seeds=(0, 1, 2),
    lr: float = 1e-4,
    epochs: int = 3,
    batch_size: int = 16,
    weight_decay: float = 0.0,
    n_boot: int = 1000,
  ):
    self.enc, self.positive, self.exclude = encoders, positive, tuple(exclude)
    self.frontal_only, self.train_split, self.test_splits = frontal_only, train_split, test_splits
    self.fractions, self.seeds, self.n_boot = tuple(fractions), tuple(seeds), n_boot
    self.epochs = int(epochs)
    self.tuner = FineTuner(encoders.model, float(lr), int(batch_size), float(weight_decay))
    self._data = None
    self.details: dict[str, Any] = {}

  def _load(self) -> dict[str, dict[str, np.ndarray]]:
    if self._data is None:
      self._data = features.load_sample_task(
        self.enc.config,
        self.positive,
        self.exclude,
        self.frontal_only,
        self.train_split,
        tuple(self.test_splits),
        "finetune",
      )
    return self._data

  def run(self, state: Any) -> Iterator[tuple[str, float]]:
    data = self._load()
    variables = features.variables_of(state)
    x_train, y_train = data["train"]["image"], data["train"]["label"]
    x_test, y_test = data["test"]["image"], data["test"]["label"]
    patients = data["test"]["patient_id"]
    dim = self.enc.images(variables, x_train[:1])[0].shape[1]
    self.details = {"curves": {}}

    def fit_score(rows, seed):
      tuned, _ = self.tuner.fit(
        self.tuner.init(variables, dim, seed), x_train[rows], y_train[rows], self.epochs, seed
      )
      return self.tuner.logits(tuned, x_test)

    yield from metrics.binary_fraction_sweep(
      "finetune",
      fit_score,
      y_train,
      y_test,
      patients,
      fractions=self.fractions,
      seeds=self.seeds,
      n_boot=self.n_boot,
      curves=self.details["curves"],
    )
    yield "finetune/n_train", float(len(y_train))
    yield "finetune/n_test", float(len(y_test))
    yield "finetune/test_prevalence", float(y_test.mean())

  def write_plots(self, out: pathlib.Path) -> list[str]:
    plots.roc_curves(
      out / "finetune_roc.png",
      self.details["curves"],
      f"fine-tune ({self.epochs} epochs): {self.positive} vs other (test split, "
      f"seed {self.seeds[0]})",
    )
    return ["finetune_roc.png"]
