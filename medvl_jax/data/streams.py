"""The train and eval streams: per-host batches of the layout (medvl_jax/data/batch.py).

Reads. Each split is read by random access from its RecordStore (medvl_jax/data/records.py),
a host batch's records of a source in one parallel read.
Which record fills which row of global batch b is pure index arithmetic
(medvl_jax/data/mixing.py): per-source streams with their own epoch counters, each epoch a full
permutation seeded by (seed, source, epoch), rows per source from closed-form cumulative targets
of the weights. Host p reads only the records of its rows [p * B / P, (p + 1) * B / P) of each
global batch, so `start_step=k` costs O(B) reads and batch b is a function of (config.seed, b)
only, whatever the number of hosts.

Processing (tf.data, parallel, deterministic): parse + decode, the source's augmentation chain
(`config.data.augment_chain`, default ConVIRT's) seeded by (seed, source, epoch, position),
one sentence drawn per example per epoch (`data.text_mode='sentence'`) or the whole report
('report'), then tokenisation (medvl_jax/data/tokenizer.py). Text-only rows carry a zero image,
image-only rows an all-padding text (attention_mask all 0).

Eval stream: one pass over `data.name`'s `data.eval_split` in file order, centre crop, a fixed
sentence per example, the last batch padded with `mask == False` rows so every host yields the
same number of batches; each host reads only its rows.
"""

import atexit
from collections.abc import Iterator
import dataclasses
import math
from typing import Any
import weakref

import ml_collections
import numpy as np
import tensorflow as tf
from tensorflow_datasets.core import example_parser

from medvl_jax.data import augment, corpora, mixing, sources
from medvl_jax.data import tokenizer as tokenizer_lib
from medvl_jax.data.records import RecordStore
from medvl_jax.errors import ConfigError

# Salts that keep the random streams of different uses apart.
_EVAL_SALT, _IMAGE, _TEXT = 0xE7A1, 1, 2

Batch = dict[str, np.ndarray]
# Live iterators: closed at exit, since a tf.data generator thread still running at interpreter
# shutdown can hang it.
_LIVE: "weakref.WeakSet[Iterator[Batch]]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for iterator in list(_LIVE):
    iterator.close()


def _open_store(builder, split: str) -> RecordStore:
  """Every record read of the streams goes through the store returned here."""
  return RecordStore.open(builder, split)


def _per_host(config: ml_collections.ConfigDict, process_count: int) -> int:
  if config.batch_size <= 0 or config.batch_size % process_count:
    raise ConfigError(
      f"config.batch_size={config.batch_size} must be a positive multiple "
      f"of the process count {process_count}"
    )
  return config.batch_size // process_count


def _pick_sentence(sentences: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """One sentence drawn uniformly ('' if there are none)."""
  count = tf.shape(sentences)[0]
  idx = tf.random.stateless_uniform([], seed, minval=0, maxval=tf.maximum(count, 1), dtype=tf.int32)
  return tf.gather(tf.concat([sentences, [""]], 0), idx)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """An encoded image (PNG, JPEG, ...) as uint8 [H, W, 1]."""
  image = tf.io.decode_image(encoded, channels=1, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 1])


@dataclasses.dataclass
class Reader:
  """A prepared source: its records and a parser of the features its kind reads."""

  source: sources.Source
  store: RecordStore
  parser: Any  # Parses the image (still encoded) and text features only.
  image_key: str
  text_key: str

  def parse(self, raw: tf.Tensor) -> dict[str, tf.Tensor]:
    return self.parser.parse_example(raw)


def open_readers(
  config: ml_collections.ConfigDict, resolved: list[sources.Source], process_count: int = 1
) -> list[Reader]:
  """A Reader of each source (the bundled sample prepared first on a single host)."""
  out = []
  for source in resolved:
    builder = sources.prepared_builder(
      config, source.name, source.builder_config, source.where, process_count=process_count
    )
    spec = corpora.get(source.name, key="config.data.name")
    sources.split_size(builder, source.split, source.where)
    image_key, text_key = sources.feature_keys(builder, spec, source.kind, config.data.text_mode)
    info = builder.info.features.get_serialized_info()
    keys = [k for k in (image_key, text_key) if k]
    # The image stays encoded (decoded in decode_image); text features need no decoding.
    out.append(
      Reader(
        source,
        _open_store(builder, source.split),
        example_parser.ExampleParser({k: info[k] for k in keys}),
        image_key,
        text_key,
      )
    )
  return out


def _text(reader: Reader, ex, seed) -> tf.Tensor:
  if not reader.text_key:
    return tf.constant("")
  if reader.text_key == "sentences":
    return _pick_sentence(ex["sentences"], seed)
  return ex[reader.text_key]


def train_records(
  config,
  readers: list[Reader],
  plan: mixing.Plan,
  start_step: int,
  process_index: int,
  process_count: int,
) -> Iterator[tuple]:
  """Per global batch from `start_step` on, this host's rows: (serialized records, source,
  epoch, position, record index), each an array over the rows."""
  del config  # The plan holds everything.
  b = start_step
  while True:
    src, epochs, positions, index = plan.host_rows(b, process_index, process_count)
    raw = np.empty(len(src), object)
    for s in np.unique(src):
      rows = np.flatnonzero(src == s)
      raw[rows] = readers[s].store.read(index[rows].tolist())
    yield raw, src, epochs, positions, index
    b += 1


def train_dataset(
  config: ml_collections.ConfigDict, start_step: int, process_index: int, process_count: int
) -> tf.data.Dataset:
  """Per-host train batches before tokenisation: the layout's image, has_image, has_text and
  source, plus 'text' (bytes) and 'index' (the record's index in its split)."""
  per_host = _per_host(config, process_count)
  readers = open_readers(config, sources.sources(config), process_count)
  plan = mixing.Plan(
    config.seed,
    config.batch_size,
    tuple(len(r.store) for r in readers),
    tuple(r.source.weight for r in readers),
  )
  aug_cfg = dict(config.data.augment)
  size, resize = config.data.image_size, config.data.resize

  def branch(s: int, reader: Reader, raw, e, p):
    ex = reader.parse(raw)
    ex_key = mixing.fold(mixing.source_key(config.seed, s), e, p)
    if reader.image_key:
      chain = augment.CHAINS[reader.source.chain]
      image = chain(
        decode_image(ex[reader.image_key]),
        mixing.fold(ex_key, _IMAGE),
        aug_cfg,
        size=size,
        resize=resize,
      )
    else:
      image = tf.zeros([size, size, 1], tf.uint8)
    return {
      "image": image,
      "text": _text(reader, ex, mixing.fold(ex_key, _TEXT)),
      "has_image": tf.constant(bool(reader.image_key)),
      "has_text": tf.constant(bool(reader.text_key)),
    }

  @tf.autograph.experimental.do_not_convert
  def process(raw, s, e, p, index):
    if len(readers) == 1:
      out = branch(0, readers[0], raw, e, p)
    else:
      out = tf.switch_case(
        tf.cast(s, tf.int32),
        [(lambda i=i, r=r: branch(i, r, raw, e, p)) for i, r in enumerate(readers)],
      )
    return dict(out, source=tf.cast(s, tf.int32), index=index)

  signature = (tf.TensorSpec([per_host], tf.string),) + (tf.TensorSpec([per_host], tf.int64),) * 4
  ds = tf.data.Dataset.from_generator(  # One Python call per host batch.
    lambda: train_records(config, readers, plan, start_step, process_index, process_count),
    output_signature=signature,
  ).unbatch()
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(per_host, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _tokenized(batches: Iterator[dict[str, Any]], tokenizer, max_length: int) -> Iterator[Batch]:
  iterator = _finish(batches, tokenizer, max_length)
  _LIVE.add(iterator)
  return iterator


def _finish(batches: Iterator[dict[str, Any]], tokenizer, max_length: int) -> Iterator[Batch]:
  """The batches in the layout: 'index' dropped, 'text' tokenised."""
  for batch in batches:
    del batch["index"]  # Record index in the split: for tests and debugging only.
    yield tokenizer_lib.tokenize(batch, tokenizer, max_length)


def _check_hosts(config, process_index: int, process_count: int) -> None:
  _per_host(config, process_count)
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} not in [0, {process_count})")


def create_train_iterator(
  config: ml_collections.ConfigDict,
  tokenizer,
  *,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """Infinite per-host train batches; batch k is global batch `start_step + k`.

  Yields {'image': uint8 [B/P, S, S, 1], 'input_ids': int32 [B/P, L],
  'attention_mask': int32 [B/P, L], 'has_image': bool [B/P], 'has_text': bool [B/P],
  'source': int32 [B/P] (index into the sources)} with B = config.batch_size,
  P = process_count, S = config.data.image_size, L = config.data.max_length.
  """
  sources.check_sources(config)
  _check_hosts(config, process_index, process_count)
  sources.prepare(config, process_count=process_count)
  ds = train_dataset(config, start_step, process_index, process_count)
  return _tokenized(ds.as_numpy_iterator(), tokenizer, config.data.max_length)


def eval_records(
  reader: Reader, n: int, global_batch: int, process_index: int, process_count: int
) -> Iterator[tuple]:
  """(serialized record or b'', index) of this host's rows of the padded file-order pass."""
  per_host = global_batch // process_count
  for start in range(0, math.ceil(n / global_batch) * global_batch, global_batch):
    rows = range(start + process_index * per_host, start + (process_index + 1) * per_host)
    real = [i for i in rows if i < n]
    records = reader.store.read(real) if real else []
    yield from zip(records + [b""] * (len(rows) - len(real)), rows)


def eval_dataset(
  config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> tf.data.Dataset:
  """Per-host padded eval batches before tokenisation: as `train_dataset`, plus 'mask'."""
  per_host = _per_host(config, process_count)
  spec = corpora.get(config.data.name, key="config.data.name")
  kind = "paired" if spec.image_key and spec.text_key else ("image" if spec.image_key else "text")
  source = sources.Source(
    "config.data",
    config.data.name,
    config.data.builder_config,
    split,
    kind,
    1.0,
    config.data.augment_chain,
  )
  (reader,) = open_readers(config, [source], process_count)
  n = len(reader.store)
  size, resize = config.data.image_size, config.data.resize
  key = tf.constant([0, _EVAL_SALT], tf.int64)  # Fixed: same sentences whatever the seed.

  @tf.autograph.experimental.do_not_convert
  def process(raw, i):
    mask = i < n

    def real():
      ex = reader.parse(raw)
      image = (
        augment.to_uint8(augment.center_crop(decode_image(ex[reader.image_key]), size, resize))
        if reader.image_key
        else tf.zeros([size, size, 1], tf.uint8)
      )
      return image, _text(reader, ex, mixing.fold(key, i))

    image, text = tf.cond(
      mask, real, lambda: (tf.zeros([size, size, 1], tf.uint8), tf.constant(""))
    )
    return {
      "image": image,
      "text": text,
      "mask": mask,
      "has_image": tf.logical_and(mask, bool(reader.image_key)),
      "has_text": tf.logical_and(mask, bool(reader.text_key)),
      "source": tf.constant(0, tf.int32),
      "index": i,
    }

  ds = tf.data.Dataset.from_generator(
    lambda: eval_records(reader, n, config.batch_size, process_index, process_count),
    output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64)),
  )
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(per_host, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def create_eval_iterator(
  config: ml_collections.ConfigDict,
  tokenizer,
  split: str,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """One pass over `split` of data.name in file order, centre-cropped, padded to whole batches.

  Yields the train keys plus 'mask': bool [B/P], False for padding rows (zero image,
  all-padding text). Every host yields ceil(N / B) batches; host i gets rows
  [i * B / P, (i + 1) * B / P) of each global batch and reads only those records.
  """
  sources.check_config(config)
  _check_hosts(config, process_index, process_count)
  ds = eval_dataset(config, split, process_index, process_count)
  return _tokenized(ds.as_numpy_iterator(), tokenizer, config.data.max_length)
