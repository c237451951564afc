"""tfds -> tf.data input pipeline for ConVIRT: deterministic, index-keyed and per host.

Train stream. Examples are keyed by (epoch e, position p in the epoch); the global example
counter is g = e * N + p and global batch b holds g in [b * B, (b + 1) * B). The order of
epoch e is a stateless shuffle seeded by (config.seed, e): the split, read in its fixed file
order, is cut into blocks of `config.data.shuffle_buffer` records and each block is permuted
(for the sample the block is the whole split, so each epoch is a full permutation). The
augmentation seed and the one sentence drawn per example come from (config.seed, e, p). So
batch b is a function of (config.seed, b) only: independent of process_count, of when the
iterator was created, and of `tf.random.set_seed`. Host i keeps rows
[i * B / P, (i + 1) * B / P) of every global batch before anything is decoded, and
`start_step=k` skips k * B encoded records before decoding.

Eval stream: one pass in file order, centre crop, a fixed sentence per example, the last batch
padded with `mask == False` rows so every host yields the same number of batches.
"""
from collections.abc import Iterator
import dataclasses
import importlib
import math
import os
import pathlib
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

try:  # The input pipeline must not grab accelerator memory that JAX needs.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # Devices already initialised by an earlier import.
  pass

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from medvl_jax import augment  # pylint: disable=g-import-not-at-top
from medvl_jax.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE_DIR = REPO_ROOT.parent / "shared" / "data"
SAMPLE_DIR_ENV = "MEDVL_SAMPLE_DIR"
# Salts that keep the random streams of different uses apart.
_TRAIN_SALT, _EVAL_SALT, _IMAGE, _TEXT = 0x7A11, 0xE7A1, 1, 2
_MAX_EPOCHS = 2**40

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one registered dataset."""
  tfds_name: str
  module: str  # Importing it registers the tfds builder.
  image_key: str
  sentences_key: str
  auto_prepare: bool  # Built from the bundled sample when not prepared yet.


DATASETS: dict[str, DatasetSpec] = {
    "cxr_sample": DatasetSpec(tfds_name="cxr_sample", module="data_pipelines.cxr_sample",
                              image_key="image", sentences_key="sentences",
                              auto_prepare=True),
    # Corpora prepared with `python -m data_pipelines.prepare NAME --manual_dir=...`.
    "mimic_cxr": DatasetSpec(tfds_name="mimic_cxr", module="data_pipelines.mimic_cxr",
                             image_key="image", sentences_key="sentences",
                             auto_prepare=False),
    "openi": DatasetSpec(tfds_name="openi", module="data_pipelines.openi",
                         image_key="image", sentences_key="sentences", auto_prepare=False),
    # Image + label corpora (no text: sentences_key is empty; for probes and evaluators).
    "nih14": DatasetSpec(tfds_name="nih14", module="data_pipelines.nih14",
                         image_key="image", sentences_key="", auto_prepare=False),
    "chexpert": DatasetSpec(tfds_name="chexpert", module="data_pipelines.chexpert",
                            image_key="image", sentences_key="", auto_prepare=False),
    "rsna_pneumonia": DatasetSpec(tfds_name="rsna_pneumonia",
                                  module="data_pipelines.rsna_pneumonia", image_key="image",
                                  sentences_key="", auto_prepare=False),
    "covidx": DatasetSpec(tfds_name="covidx", module="data_pipelines.covidx",
                          image_key="image", sentences_key="", auto_prepare=False),
}

_REQUIRED_KEYS = (
    "seed", "batch_size", "data.name", "data.builder_config", "data.data_dir",
    "data.sample_dir", "data.train_split", "data.eval_split", "data.image_size",
    "data.resize", "data.max_length", "data.shuffle_buffer", "data.augment.crop_scale",
    "data.augment.flip_p", "data.augment.rotation", "data.augment.translate",
    "data.augment.affine_scale", "data.augment.brightness", "data.augment.contrast",
    "data.augment.blur_sigma",
)


def _check_config(config: ml_collections.ConfigDict) -> None:
  for key in _REQUIRED_KEYS:
    node = config
    for part in key.split("."):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        raise ConfigError(f"config.{key} is missing") from None
  if config.data.image_size > config.data.resize:
    raise ConfigError(f"config.data.image_size={config.data.image_size} is larger than "
                      f"config.data.resize={config.data.resize}")


def _spec(config: ml_collections.ConfigDict) -> DatasetSpec:
  name = config.data.name
  if name not in DATASETS:
    raise ConfigError(f"config.data.name={name!r} is not a known dataset; valid names: "
                      f"{', '.join(sorted(DATASETS))}")
  return DATASETS[name]


def resolve_sample_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  """config.data.sample_dir, else $MEDVL_SAMPLE_DIR, else <repo>/../shared/data."""
  if config.data.sample_dir:
    where, value = "config.data.sample_dir", config.data.sample_dir
  else:
    where, value = f"${SAMPLE_DIR_ENV}", os.environ.get(SAMPLE_DIR_ENV, "")
  path = pathlib.Path(value).expanduser() if value else DEFAULT_SAMPLE_DIR
  if path.is_dir():
    return path
  looked = (f"{where}={value!r}" if value
            else f"config.data.sample_dir and ${SAMPLE_DIR_ENV} (both unset)")
  raise DataError(f"sample data not found: looked at {looked} and at the default "
                  f"{DEFAULT_SAMPLE_DIR} (exists: {DEFAULT_SAMPLE_DIR.is_dir()}); point one of "
                  "them at the folder holding covid_cxr_notes/ and iu_reports/")


def _builder(config: ml_collections.ConfigDict, spec: DatasetSpec) -> tfds.core.DatasetBuilder:
  importlib.import_module(spec.module)
  cls = tfds.builder_cls(spec.tfds_name)
  names = [c.name for c in cls.BUILDER_CONFIGS]
  if config.data.builder_config not in names:
    raise ConfigError(f"config.data.builder_config={config.data.builder_config!r} is not a "
                      f"config of {spec.tfds_name}; valid: {', '.join(names)}")
  return cls(config=config.data.builder_config, data_dir=config.data.data_dir or None)


def prepare(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the tfds builder of config.data, building the bundled sample if needed."""
  spec = _spec(config)
  builder = _builder(config, spec)
  if builder.is_prepared():
    return builder
  if not spec.auto_prepare:
    raise DataError(f"{builder.data_dir}: dataset {spec.tfds_name}/"
                    f"{config.data.builder_config} is not prepared; run "
                    f"`python -m data_pipelines.prepare {spec.tfds_name} --manual_dir=...`")
  sample_dir = resolve_sample_dir(config)
  logging.info("Preparing %s/%s from %s into %s (once).", spec.tfds_name,
               config.data.builder_config, sample_dir, builder.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(sample_dir), try_download_gcs=False))
  return builder


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
  """A local Hugging Face fast tokenizer (never downloads)."""
  import transformers  # pylint: disable=g-import-not-at-top
  if not path or not pathlib.Path(path).is_dir():
    raise DataError(f"tokenizer directory not found: {str(path)!r}")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(path),
                                                           local_files_only=True)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot load a tokenizer ({e})") from e
  if not tokenizer.is_fast:
    raise DataError(f"{path}: not a fast tokenizer (tokenizer.json missing?)")
  return tokenizer


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  return _split_size(prepare(config), split)


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ConfigError(f"split {split!r} (config.data.train_split / eval_split) not in "
                      f"{builder.name}: {', '.join(builder.info.splits)}") from e


def _per_host(config: ml_collections.ConfigDict, process_count: int) -> int:
  if config.batch_size <= 0 or config.batch_size % process_count:
    raise ConfigError(f"config.batch_size={config.batch_size} must be a positive multiple "
                      f"of the process count {process_count}")
  return config.batch_size // process_count


def _records(builder, spec: DatasetSpec, split: str) -> tf.data.Dataset:
  """(index, (encoded image, sentences)) in the split's fixed file order."""
  if (spec.image_key not in builder.info.features
      or spec.sentences_key not in builder.info.features):
    raise ConfigError(f"config.data.name={builder.name!r} "
                      f"(builder_config={builder.builder_config.name!r}) has no "
                      f"{spec.image_key!r} + {spec.sentences_key or 'sentences'!r} features: "
                      f"image-text pairs are needed for pretraining")
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={spec.image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False))
  return ds.map(lambda ex: (ex[spec.image_key], ex[spec.sentences_key])).enumerate()


def _fold(seed: tf.Tensor, *data: tf.Tensor) -> tf.Tensor:
  for d in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
  return seed


def _pick_sentence(sentences: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """One sentence drawn uniformly ('' if there are none)."""
  count = tf.shape(sentences)[0]
  idx = tf.random.stateless_uniform([], seed, minval=0, maxval=tf.maximum(count, 1),
                                    dtype=tf.int32)
  return tf.gather(tf.concat([sentences, [""]], 0), idx)


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  image = tf.io.decode_image(encoded, channels=1, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 1])


def _epoch_order(records: tf.data.Dataset, key: tf.Tensor, epoch: tf.Tensor,
                 block: int) -> tf.data.Dataset:
  """The records of one epoch, each block of `block` consecutive records permuted."""

  def permute(j, block_records):
    index, (images, sentences) = block_records
    perm = tf.argsort(tf.random.stateless_uniform(tf.shape(index), _fold(key, epoch, j)))
    return tf.gather(index, perm), (tf.gather(images, perm), tf.gather(sentences, perm))

  return records.ragged_batch(block).enumerate().map(permute).unbatch()


def _train_dataset(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                   spec: DatasetSpec, start_step: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
  """Per-host batches of {'image', 'text', 'index'} (before tokenisation)."""
  per_host = _per_host(config, process_count)
  global_batch = config.batch_size
  n = _split_size(builder, config.data.train_split)
  if n == 0:
    raise DataError(f"{builder.data_dir}: split {config.data.train_split!r} is empty")
  first = start_step * global_batch
  e0, p0 = first // n, first % n
  lo, hi = process_index * per_host, (process_index + 1) * per_host
  key = tf.constant([config.seed, _TRAIN_SALT], tf.int64)
  block = max(1, min(int(config.data.shuffle_buffer), n))
  records = _records(builder, spec, config.data.train_split)
  aug_cfg = dict(config.data.augment)
  size, resize = config.data.image_size, config.data.resize

  def epoch(e):
    ds = _epoch_order(records, key, e, block).enumerate()
    ds = ds.skip(tf.where(tf.equal(e, e0), tf.constant(p0, tf.int64), 0))
    # Host slice of each global batch, before any decoding.
    return ds.filter(lambda p, _: tf.logical_and((e * n + p) % global_batch >= lo,
                                                 (e * n + p) % global_batch < hi)
                     ).map(lambda p, rec: (e, p, rec))

  def process(e, p, record):
    index, (encoded, sentences) = record
    ex_key = _fold(key, e, p)
    image = augment.convirt_train_augment(_decode(encoded), _fold(ex_key, _IMAGE), aug_cfg,
                                          size=size, resize=resize)
    return {"image": image, "text": _pick_sentence(sentences, _fold(ex_key, _TEXT)),
            "index": index}

  ds = tf.data.Dataset.range(e0, _MAX_EPOCHS).flat_map(epoch)
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(per_host, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _tokenized(batches: Iterator[dict[str, Any]], tokenizer, max_length: int
               ) -> Iterator[Batch]:
  """Replaces 'text' by padded/truncated 'input_ids' and 'attention_mask' (int32)."""
  for batch in batches:
    texts = [t.decode("utf-8") for t in batch.pop("text")]
    del batch["index"]  # Record index in the split: for tests and debugging only.
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                       return_attention_mask=True, return_tensors="np")
    batch["input_ids"] = tokens["input_ids"].astype(np.int32)
    batch["attention_mask"] = tokens["attention_mask"].astype(np.int32)
    yield batch


def _checked_source(config: ml_collections.ConfigDict, process_index: int,
                    process_count: int) -> tuple[DatasetSpec, Any]:
  """Validates the config and host layout; returns the dataset spec and its (prepared) builder."""
  _check_config(config)
  spec = _spec(config)
  _per_host(config, process_count)
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} not in [0, {process_count})")
  return spec, prepare(config)


def create_train_iterator(config: ml_collections.ConfigDict, tokenizer, *, start_step: int = 0,
                          process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Infinite per-host train batches; batch k is global batch `start_step + k`.

  Yields {'image': uint8 [B/P, S, S, 1], 'input_ids': int32 [B/P, L],
  'attention_mask': int32 [B/P, L]} with B = config.batch_size, P = process_count,
  S = config.data.image_size, L = config.data.max_length.
  """
  spec, builder = _checked_source(config, process_index, process_count)
  ds = _train_dataset(config, builder, spec, start_step, process_index, process_count)
  return _tokenized(ds.as_numpy_iterator(), tokenizer, config.data.max_length)


def _eval_dataset(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                  spec: DatasetSpec, split: str, process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """Per-host padded batches of {'image', 'text', 'mask', 'index'} (before tokenisation)."""
  per_host = _per_host(config, process_count)
  n = _split_size(builder, split)
  global_batch = config.batch_size
  total = math.ceil(n / global_batch) * global_batch
  lo, hi = process_index * per_host, (process_index + 1) * per_host
  size, resize = config.data.image_size, config.data.resize
  key = tf.constant([0, _EVAL_SALT], tf.int64)  # Fixed: same sentences whatever the seed.

  padding = tf.data.Dataset.range(n, total).map(
      lambda i: (i, (tf.constant(b""), tf.constant([""])[:0])))
  ds = _records(builder, spec, split).concatenate(padding).filter(
      lambda i, _: tf.logical_and(i % global_batch >= lo, i % global_batch < hi))

  def process(i, record):
    encoded, sentences = record
    mask = i < n
    image = tf.cond(
        mask, lambda: augment.to_uint8(augment.center_crop(_decode(encoded), size, resize)),
        lambda: tf.zeros([size, size, 1], tf.uint8))
    return {"image": image, "text": _pick_sentence(sentences, _fold(key, i)), "mask": mask,
            "index": i}

  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(per_host, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def create_eval_iterator(config: ml_collections.ConfigDict, tokenizer, split: str, *,
                         process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """One pass over `split` in file order, centre-cropped, padded to whole global batches.

  Yields the train keys plus 'mask': bool [B/P], False for padding rows (zero image, empty
  text). Every host yields ceil(N / B) batches; host i gets rows [i * B / P, (i + 1) * B / P)
  of each global batch.
  """
  spec, builder = _checked_source(config, process_index, process_count)
  ds = _eval_dataset(config, builder, spec, split, process_index, process_count)
  return _tokenized(ds.as_numpy_iterator(), tokenizer, config.data.max_length)
