"""Labelled image corpora for the evaluators, by registry name (`medvl_jax.data.corpora`).

`load_split('chexpert', 'test', builder_config='u_ignore_64', data_dir=...)` reads a prepared
tfds corpus (`python -m data_pipelines.prepare NAME ...`) through the random-access copies of its
splits (medvl_jax/data/records.py: the same reads as training, so a gs:// data dir is read
through ArrayRecord's GCS client, never TensorFlow's) and returns
{'image': uint8 [N, S, S, 1] (the eval transform of training: shorter side to `resize`, central
S x S crop), 'labels': int32 [N, C], 'patient_id', 'image_id', 'view': str [N]}.

Labels are each builder's `labels` feature: multi-hot over the corpus's findings (CheXpert-style
corpora may hold -1 = uncertain under the `u_ignore` policy: the probe masks those), one-hot for
COVIDx's 3 classes, one column for RSNA Pneumonia. The registry (`corpora.label_names`,
`corpora.task_type`) gives each corpus's column names and its natural task.
"""

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from medvl_jax.data import augment, corpora, records
from medvl_jax.errors import ConfigError, DataError

LATERAL_VIEWS = frozenset({"L", "LL", "RL", "LATERAL", "LAT"})


def label_names(name: str) -> tuple[str, ...] | None:
  return corpora.label_names(name)


def default_task_type(name: str) -> str:
  """The corpus's task type; 'multilabel' for a corpus that declares none."""
  return corpora.task_type(name) or "multilabel"


def builder(
  name: str, builder_config: str | None = None, data_dir: str | None = None
) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of registry `name`; one clear ConfigError/DataError otherwise."""
  b = corpora.builder(name, builder_config, data_dir)
  if not b.is_prepared():
    raise DataError(
      f"{b.data_dir}: dataset {b.name}/{b.builder_config.name} is not prepared; prepare it "
      f"once, on one machine: {corpora.prepare_command(b)}"
    )
  return b


def load_split(
  name: str,
  split: str,
  *,
  builder_config: str | None = None,
  data_dir: str | None = None,
  image_size: int = 224,
  resize: int = 256,
  frontal_only: bool = False,
) -> dict[str, np.ndarray]:
  """One split of a labelled corpus, centre-cropped; see the module docstring."""
  b = builder(name, builder_config, data_dir)
  keys = ("labels", "patient_id", "image_id", "view")
  missing = [k for k in ("image",) + keys if k not in b.info.features]
  if missing:
    raise DataError(
      f"{b.name}/{b.builder_config.name}: no {missing} features (a labelled "
      "corpus is needed: "
      + ", ".join(n for n in corpora.names() if corpora.get(n).label_names)
      + ")"
    )
  if split not in b.info.splits:
    raise ConfigError(
      f"split {split!r} not in {b.name}/{b.builder_config.name}: {', '.join(b.info.splits)}"
    )
  ds = records.decoded_split(b, split).map(
    lambda ex: dict(
      {k: ex[k] for k in keys},
      image=augment.to_uint8(augment.center_crop(ex["image"], image_size, resize)),
    )
  )
  rows: dict[str, list[Any]] = {k: [] for k in ("image",) + keys}
  for ex in ds.as_numpy_iterator():
    for k in rows:
      v = ex[k]
      rows[k].append(v.decode("utf-8") if isinstance(v, bytes) else v)
  n_labels = b.info.features["labels"].shape[0]
  out = {
    "image": (
      np.stack(rows["image"])
      if rows["image"]
      else np.zeros((0, image_size, image_size, 1), np.uint8)
    ),
    "labels": (
      np.stack(rows["labels"]).astype(np.int32)
      if rows["labels"]
      else np.zeros((0, n_labels), np.int32)
    ),
    **{k: np.asarray(rows[k], dtype=str) for k in ("patient_id", "image_id", "view")},
  }
  if frontal_only:  # Unknown ('') views are kept: COVIDx publishes none.
    keep = np.array([v.strip().upper() not in LATERAL_VIEWS for v in out["view"]], bool)
    out = {k: v[keep] for k, v in out.items()}
  return out
