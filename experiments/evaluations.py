"""The study's evaluations of an arm's image and text encoders, each returning per-row scores
(saved, so the report's bootstrap CIs and paired differences can be recomputed at any time):
NIH-14 linear probes under patient-level k-fold, the COVID-19 probe, text-to-image retrieval,
and masked-image regeneration (mixed arms)."""

import functools
import importlib
import pathlib
import types
from typing import Any

import numpy as np

from experiments import design


def untrained(config) -> tuple[Any, Any]:
  """(model, state) at the training's own initialisation (seed, pretrained text tower)."""
  import jax  # pylint: disable=g-import-not-at-top

  from medvl_jax import families  # pylint: disable=g-import-not-at-top
  from medvl_jax.interop import pretrained  # pylint: disable=g-import-not-at-top
  from medvl_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  family = families.get(config.model.name)
  model = family.build(config.model)
  init_rng, _ = step_lib.rngs(config)
  variables = jax.jit(functools.partial(families.init_variables, model, config))(init_rng)
  variables = jax.device_get(variables)
  if pretrained.configured(config.model):
    variables = pretrained.init_from_pretrained(variables, config.model)
  state = types.SimpleNamespace(
    params=variables["params"], batch_stats=variables.get("batch_stats", {})
  )
  return model, state


def encoders_and_state(arm: str, config, workdir: pathlib.Path):
  from medvl_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from medvl_jax.evaluate import features, runs  # pylint: disable=g-import-not-at-top

  if design.ARMS[arm]["train"]:
    config, encoders, state, _ = runs.load_run(workdir, None)
    return config, encoders, state
  model, state = untrained(config)
  tokenizer = tokenizer_lib.from_config(config)
  return config, features.Encoders(model, config, tokenizer), state


def load_nih(config) -> dict[str, np.ndarray]:
  """All of `nih14_sample` (every split of cxr_sample/image_only), eval transform."""
  from medvl_jax.data import sources  # pylint: disable=g-import-not-at-top
  from medvl_jax.evaluate import datasets  # pylint: disable=g-import-not-at-top

  # The bundled sample, built with its random-access copies (which the evaluators read) once.
  sources.prepared_builder(config, "cxr_sample", "image_only")
  kw = dict(
    builder_config="image_only",
    data_dir=config.data.data_dir,
    image_size=int(config.data.image_size),
    resize=int(config.data.resize),
  )
  parts = [datasets.load_split("cxr_sample", s, **kw) for s in ("train",) + design.HELD_OUT]
  data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.argsort(data["image_id"], kind="stable")  # The same row order for every arm.
  data = {k: v[order] for k, v in data.items()}
  # The order of the builder's `labels` feature (not the nih14 corpus's registry order).
  names = importlib.import_module("data_pipelines.cxr_sample.cxr_sample_dataset_builder").NIH_LABELS
  keep = [i for i, n in enumerate(names) if n != "No Finding"]
  data["labels"] = data["labels"][:, keep]
  data["names"] = np.asarray([names[i] for i in keep])
  return data


def patient_folds(patients: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Fold id per row; every patient's rows in one fold (patients shuffled, dealt round-robin)."""
  unique = np.unique(patients)
  rng = np.random.default_rng(seed)
  fold_of = {p: i % k for i, p in enumerate(rng.permutation(unique))}
  return np.array([fold_of[p] for p in patients])


def eval_nih(encoders, state, config, s: dict) -> dict[str, np.ndarray]:
  from medvl_jax.evaluate import features, linear_probe, metrics  # pylint: disable=g-import-not-at-top

  data = load_nih(config)
  h, _ = encoders.images(features.variables_of(state), data["image"])
  y = data["labels"]
  folds = patient_folds(data["patient_id"], s["folds"], design.SEED)
  out = {k: data[k] for k in ("image_id", "patient_id", "labels", "names")}
  for frac in design.FRACTIONS:
    oof = np.full(y.shape, np.nan)
    for k in range(s["folds"]):
      tr, te = folds != k, folds == k
      mean, std = h[tr].mean(0), h[tr].std(0) + 1e-6
      x_tr, x_te = (h[tr] - mean) / std, (h[te] - mean) / std
      idx = metrics.stratified_fraction(y[tr], frac, seed=k)
      scores = linear_probe.one_vs_rest_scores(x_tr[idx], y[tr][idx], x_te)
      for c, sc in enumerate(scores):
        if sc is not None:
          oof[te, c] = sc
    out[f"scores_{round(frac * 100)}pct"] = oof
  return out


def eval_covid(encoders, state, config, s: dict) -> dict[str, np.ndarray]:
  del s
  from medvl_jax.evaluate import features, linear_probe, metrics  # pylint: disable=g-import-not-at-top

  data = features.load_sample_task(
    config, "COVID-19", ("todo",), True, "train", design.HELD_OUT, "study"
  )
  variables = features.variables_of(state)
  h_tr, _ = encoders.images(variables, data["train"]["image"])
  h_te, _ = encoders.images(variables, data["test"]["image"])
  mean, std = h_tr.mean(0), h_tr.std(0) + 1e-6
  x_tr, x_te = (h_tr - mean) / std, (h_te - mean) / std
  y_tr = data["train"]["label"]
  out = {
    "image_id": data["test"]["image_id"].astype(str),
    "patient_id": data["test"]["patient_id"].astype(str),
    "labels": data["test"]["label"],
    "n_train": np.asarray(len(y_tr)),
  }
  for frac in design.FRACTIONS:
    idx = metrics.stratified_fraction(y_tr, frac, seed=design.SEED)
    w, b = linear_probe.fit_logistic(x_tr[idx], y_tr[idx])
    out[f"scores_{round(frac * 100)}pct"] = x_te @ w + b
  return out


def eval_retrieval(encoders, state, config, s: dict) -> dict[str, np.ndarray]:
  del s
  from medvl_jax.evaluate import features, metrics  # pylint: disable=g-import-not-at-top

  parts = [features.load_sample_split(config, split) for split in design.HELD_OUT]
  data = {
    k: np.concatenate([p[k] for p in parts]) for k in ("image", "text", "patient_id", "image_id")
  }
  variables = features.variables_of(state)
  _, z_v = encoders.images(variables, data["image"])
  z_u = encoders.texts(variables, [str(t) for t in data["text"]])
  scores = features.l2_normalize(z_u) @ features.l2_normalize(z_v).T  # [note, image]
  patients = data["patient_id"].astype(str)
  relevant = patients[:, None] == patients[None, :]
  out = {"image_id": data["image_id"].astype(str), "patient_id": patients}
  for k in design.RECALL_KS:
    out[f"hits_{k}"] = metrics.hit_at_k(scores, relevant, k)
  return out


def eval_regeneration(encoders, state, config, s: dict) -> dict[str, float]:
  del config
  from medvl_jax.evaluate import regeneration  # pylint: disable=g-import-not-at-top

  ev = regeneration.Evaluator(
    encoders, dataset="paired", splits=design.HELD_OUT, n_boot=s["n_boot"]
  )
  return {k: v for k, v in ev.run(state)}


EVALS = {
  "nih": eval_nih,
  "covid": eval_covid,
  "retrieval": eval_retrieval,
  "regeneration": eval_regeneration,
}
