"""What every evaluator needs: jitted encoders of a model, and images/texts to feed them.

`Encoders` is the `predict_fn` of the evaluator contract: it is built once from the model and
the run's config, and its methods take `variables = {'params', 'batch_stats'}` (a TrainState's
fields), so the same object serves the training loop and the CLI, and both compute the same
numbers. Passes over many images (>= progress.MIN_IMAGES) show a progress bar on stderr.
"""

import functools
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from medvl_jax import families, progress
from medvl_jax.data import augment, records, sources
from medvl_jax.errors import DataError

FRONTAL_VIEWS = ("PA", "AP", "AP Supine")


def variables_of(state: Any) -> dict[str, Any]:
  return {"params": state.params, "batch_stats": state.batch_stats}


class Encoders:
  """Batched, jitted, padded (fixed shapes: one compile per function) encoders of a model
  family (its pure `Family.encode_image` / `Family.encode_text`)."""

  def __init__(
    self, model: Any, config: ml_collections.ConfigDict, tokenizer: Any, batch_size: int = 64
  ):
    self.model, self.config, self.tokenizer = model, config, tokenizer
    self.batch_size = batch_size
    self.image_size, self.resize = int(config.data.image_size), int(config.data.resize)
    self.max_length = int(config.data.max_length)

    family = families.get(config.model.name)
    self._image_fn = jax.jit(functools.partial(family.encode_image, model))
    self._text_fn = jax.jit(functools.partial(family.encode_text, model))

  def _batched(self, fn, arrays: list[np.ndarray], desc: str) -> Any:
    n, b = len(arrays[0]), self.batch_size
    outs = []
    bar = progress.bar(n, desc)  # Shown for passes over >= progress.MIN_IMAGES rows.
    for i in range(0, n, b):
      chunk = [a[i : i + b] for a in arrays]
      pad = b - len(chunk[0])
      chunk = [np.concatenate([c, np.zeros((pad,) + c.shape[1:], c.dtype)]) for c in chunk]
      out = jax.device_get(fn(*chunk))
      outs.append(jax.tree.map(lambda x: np.asarray(x[: b - pad], np.float32), out))  # noqa: B023
      bar.update(b - pad)
    bar.close()
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def images(self, variables: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, S, S, 1] -> (pooled features h_v [N, D_v], embeddings z_v [N, d])."""
    return self._batched(lambda x: self._image_fn(variables, x), [images], "image features")

  def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (input_ids, attention_mask), int32 [N, data.max_length], padded/truncated."""
    tok = self.tokenizer(
      list(texts),
      padding="max_length",
      truncation=True,
      max_length=self.max_length,
      return_tensors="np",
    )
    return tok["input_ids"].astype(np.int32), tok["attention_mask"].astype(np.int32)

  def texts(self, variables: Any, texts: list[str]) -> np.ndarray:
    """Strings -> embeddings z_u [N, d] (truncated to data.max_length tokens)."""
    ids, mask = self.tokenize(texts)
    return self._batched(
      lambda i, m: self._text_fn(variables, i, m), [ids, mask], "text embeddings"
    )

  # ------------------------------------------------------------------- pixels
  def load_image_files(self, paths: list[pathlib.Path]) -> np.ndarray:
    """Image files -> uint8 [N, S, S, 1] with the eval transform of training (centre crop)."""
    size, resize = self.image_size, self.resize
    crop = tf.function(
      lambda x: augment.to_uint8(augment.center_crop(x, size, resize)), reduce_retracing=True
    )
    out = np.empty((len(paths), size, size, 1), np.uint8)
    for i, p in enumerate(progress.iterate(paths, len(paths), "loading images")):
      try:
        with Image.open(p) as im:
          pixels = np.asarray(im.convert("L"))[..., None]
      except (OSError, ValueError) as e:
        raise DataError(f"{p}: cannot read the image: {e}") from e
      out[i] = crop(tf.constant(pixels)).numpy()
    return out


def load_sample_split(
  config: ml_collections.ConfigDict, split: str, frontal_only: bool = False
) -> dict[str, np.ndarray]:
  """A split of the run's paired tfds dataset: centre-cropped images and their metadata.

  Returns {'image': uint8 [N, S, S, 1], 'text', 'finding', 'patient_id', 'view', 'image_id'}.
  """
  builder = sources.prepare(config)
  size, resize = int(config.data.image_size), int(config.data.resize)
  keys = ("text", "finding", "patient_id", "view", "image_id")
  missing = [k for k in ("image",) + keys if k not in builder.info.features]
  if missing:
    raise DataError(
      f"{builder.name}/{builder.builder_config.name}: no {missing} features "
      "(the paired sample is needed)"
    )
  # Through the split's random-access copy, not `as_dataset`: one read path for local disk and
  # buckets (TensorFlow's own GCS client cannot be pointed at a test emulator).
  ds = records.decoded_split(builder, split).map(
    lambda ex: dict(
      {k: ex[k] for k in keys},
      image=augment.to_uint8(augment.center_crop(ex["image"], size, resize)),
    )
  )
  rows: dict[str, list] = {k: [] for k in ("image",) + keys}
  total = builder.info.splits[split].num_examples
  for ex in progress.iterate(ds.as_numpy_iterator(), total, f"loading {split} images"):
    for k in rows:
      v = ex[k]
      rows[k].append(v.decode("utf-8") if isinstance(v, bytes) else v)
  out = {k: np.asarray(v) for k, v in rows.items()}
  if not len(out["image"]):
    out["image"] = np.zeros((0, size, size, 1), np.uint8)
  if frontal_only:
    keep = np.isin(out["view"], FRONTAL_VIEWS)
    out = {k: v[keep] for k, v in out.items()}
  return out


def load_sample_task(
  config: Any,
  positive: str,
  exclude: tuple,
  frontal_only: bool,
  train_split: str,
  test_splits: tuple,
  task: str,
) -> dict[str, dict[str, np.ndarray]]:
  """{'train', 'test'}: sample rows with a binary 'label' (finding starts with `positive`);
  rows whose finding is in `exclude` dropped. Shared by the probe and fine-tuning tasks."""
  parts = {
    "train": [load_sample_split(config, train_split, frontal_only)],
    "test": [load_sample_split(config, s, frontal_only) for s in test_splits],
  }
  data = {}
  for name, splits in parts.items():
    d = {k: np.concatenate([s[k] for s in splits]) for k in splits[0]}
    keep = ~np.isin(d["finding"], exclude)
    d = {k: v[keep] for k, v in d.items()}
    d["label"] = np.char.startswith(d["finding"].astype(str), positive).astype(int)
    if len(np.unique(d["label"])) < 2:
      raise DataError(
        f"{task}: the {name} split(s) need both {positive!r} and other findings; "
        f"got {len(d['label'])} rows, {int(d['label'].sum())} positive"
      )
    data[name] = d
  return data


def l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
