"""The study's evaluations of an arm's image and text encoders, each returning per-row scores
(saved, so the report's bootstrap CIs and paired differences can be recomputed at any time):
NIH-14 linear probes under patient-level k-fold on the NIH evaluation half, the COVID-19
probe, text-to-image retrieval, the held-out losses of claim 0 (contrastive loss per pair;
mixed arms: MLM accuracy per note) and masked-image regeneration (mixed arms)."""

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


def selected_step(workdir: pathlib.Path) -> int:
  """The trained run's checkpoint the study evaluates (pre-specified, docs/study.md): the one
  with the lowest validation loss, on the validation patients only (every evaluation is
  checkpointed, so it is the best evaluation of the run)."""
  from medvl_jax.ckpt import checkpoint  # pylint: disable=g-import-not-at-top

  step = checkpoint.best_step(workdir)
  if step is None:
    raise design.StudyError(f"{workdir}: no checkpoint with a validation loss to select")
  return step


def encoders_and_state(arm: str, config, workdir: pathlib.Path):
  from medvl_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from medvl_jax.evaluate import features, runs  # pylint: disable=g-import-not-at-top

  if design.ARMS[arm]["train"]:
    config, encoders, state, _ = runs.load_run(workdir, selected_step(workdir))
    return config, encoders, state
  model, state = untrained(config)
  tokenizer = tokenizer_lib.from_config(config)
  return config, features.Encoders(model, config, tokenizer), state


def load_nih(config) -> dict[str, np.ndarray]:
  """The evaluation half of `nih14_sample` (patients never in any arm's pretraining data),
  eval transform."""
  from medvl_jax.data import sources  # pylint: disable=g-import-not-at-top
  from medvl_jax.evaluate import datasets  # pylint: disable=g-import-not-at-top

  corpus, builder_config, split = design.NIH_PROBE
  # The bundled sample, built with its random-access copies (which the evaluators read) once.
  sources.prepared_builder(config, corpus, builder_config)
  data = datasets.load_split(
    corpus,
    split,
    builder_config=builder_config,
    data_dir=config.data.data_dir,
    image_size=int(config.data.image_size),
    resize=int(config.data.resize),
  )
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
  folds = patient_folds(data["patient_id"], s["folds"], design.FOLD_SEED)
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
    config, "COVID-19", ("todo",), True, "train", design.COVID_HELD_OUT, "study"
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
    idx = metrics.stratified_fraction(y_tr, frac, seed=design.FOLD_SEED)
    w, b = linear_probe.fit_logistic(x_tr[idx], y_tr[idx])
    out[f"scores_{round(frac * 100)}pct"] = x_te @ w + b
  return out


def held_out_pairs(config) -> dict[str, np.ndarray]:
  """The paired images of held-out patients with their notes (the same rows for every arm)."""
  from medvl_jax.evaluate import features  # pylint: disable=g-import-not-at-top

  parts = [features.load_sample_split(config, split) for split in design.HELD_OUT]
  keys = ("image", "text", "patient_id", "image_id")
  return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _embeddings(encoders, state, data) -> tuple[np.ndarray, np.ndarray]:
  """(z_u, z_v): L2-normalised note and image embeddings of the held-out pairs."""
  from medvl_jax.evaluate import features  # pylint: disable=g-import-not-at-top

  variables = features.variables_of(state)
  _, z_v = encoders.images(variables, data["image"])
  z_u = encoders.texts(variables, [str(t) for t in data["text"]])
  return features.l2_normalize(z_u), features.l2_normalize(z_v)


def eval_retrieval(encoders, state, config, s: dict) -> dict[str, np.ndarray]:
  del s
  from medvl_jax.evaluate import metrics  # pylint: disable=g-import-not-at-top

  data = held_out_pairs(config)
  z_u, z_v = _embeddings(encoders, state, data)
  scores = z_u @ z_v.T  # [note, image]
  patients = data["patient_id"].astype(str)
  relevant = patients[:, None] == patients[None, :]
  out = {"image_id": data["image_id"].astype(str), "patient_id": patients}
  for k in design.RECALL_KS:
    out[f"hits_{k}"] = metrics.hit_at_k(scores, relevant, k)
  return out


def contrastive_loss_per_pair(z_u: np.ndarray, z_v: np.ndarray, lam: float, tau: float):
  """ConVIRT's loss of each held-out pair i against all held-out pairs (float64 NumPy):
  lam * CE(image i -> its note among all notes) + (1 - lam) * CE(note i -> its image)."""
  logits = (z_v.astype(np.float64) @ z_u.astype(np.float64).T) / tau  # [image, note]

  def ce(x):  # -log softmax of the diagonal, per row
    m = x.max(axis=1, keepdims=True)
    return (np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]) - np.diag(x)

  return lam * ce(logits) + (1 - lam) * ce(logits.T)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([a, np.zeros((rows - len(a),) + a.shape[1:], a.dtype)])


def mlm_accuracy_per_note(encoders, state, texts: list[str], seed: int) -> np.ndarray:
  """Mixed model: the share of each note's masked tokens predicted exactly, text alone (no
  image), the model's own MLM masking drawn from a fixed key (the same masks for every arm,
  since the masks depend only on the tokens and the key); NaN for a note with no masked token."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from medvl_jax.evaluate import features  # pylint: disable=g-import-not-at-top

  model, b = encoders.model, encoders.batch_size
  size = encoders.image_size
  ids, mask = encoders.tokenize(texts)

  def per_row(variables, batch, key):
    out = model.apply(variables, batch, train=False, rngs={"masking": key})
    hit = (jnp.argmax(out["mlm_logits"], -1) == out["mlm_targets"]) & out["mlm_weights"]
    return hit.sum(1), out["mlm_weights"].sum(1)

  fn = jax.jit(per_row)
  variables = features.variables_of(state)
  hits, counts = [], []
  for i in range(0, len(ids), b):
    n = len(ids[i : i + b])
    batch = {
      "image": np.zeros((b, size, size, 1), np.uint8),
      "input_ids": _pad_rows(ids[i : i + b], b),
      "attention_mask": _pad_rows(mask[i : i + b], b),
      "has_image": np.zeros((b,), bool),
      "has_text": np.arange(b) < n,
    }
    h, c = jax.device_get(fn(variables, batch, jax.random.fold_in(jax.random.key(seed), i)))
    hits.append(np.asarray(h)[:n])
    counts.append(np.asarray(c)[:n])
  hits, counts = np.concatenate(hits), np.concatenate(counts)
  return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def eval_heldout(encoders, state, config, s: dict) -> dict[str, np.ndarray]:
  """Claim 0's per-row figures on held-out patients: the contrastive loss of each pair (the
  training loss's lam and temperature) and, for the mixed model, MLM accuracy per note."""
  del s
  data = held_out_pairs(config)
  z_u, z_v = _embeddings(encoders, state, data)
  out = {
    "image_id": data["image_id"].astype(str),
    "patient_id": data["patient_id"].astype(str),
    "contrastive_loss": contrastive_loss_per_pair(
      z_u, z_v, float(config.loss.lam), float(config.loss.temperature)
    ),
  }
  if hasattr(encoders.model, "regenerate"):  # the mixed family: an MLM head
    texts = [str(t) for t in data["text"]]
    out["mlm_acc"] = mlm_accuracy_per_note(encoders, state, texts, design.MASK_SEED)
  return out


def eval_regeneration(encoders, state, config, s: dict) -> dict[str, np.ndarray]:
  """Per held-out image and mask scale: the PSNR of the masked pixels and its gain over
  filling them with the visible mean (the evaluation suite's `regeneration` task)."""
  del config
  from medvl_jax.evaluate import regeneration  # pylint: disable=g-import-not-at-top

  ev = regeneration.Evaluator(
    encoders, dataset="paired", splits=design.HELD_OUT, n_boot=s["n_boot"]
  )
  dict(ev.run(state))  # the per-image figures are kept in ev.details
  out = {"patient_id": np.asarray(ev.details["patient_id"]).astype(str)}
  for scale, per_image in ev.details["per_image"].items():
    out[f"psnr_{scale}"] = per_image["psnr"]
    out[f"psnr_gain_{scale}"] = per_image["psnr_gain"]
  return out


EVALS = {
  "nih": eval_nih,
  "covid": eval_covid,
  "retrieval": eval_retrieval,
  "heldout": eval_heldout,
  "regeneration": eval_regeneration,
}
