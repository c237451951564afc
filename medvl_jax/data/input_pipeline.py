"""tfds -> tf.data input pipeline: several sources of three kinds, random access, per host.

Sources. `config.data.sources` lists {'name', 'builder_config', 'split', 'kind' (paired |
image | text), 'weight' > 0, optionally 'augment' (a chain of augment.CHAINS)}; empty or
absent, it is the one paired source `data.name`/`data.builder_config`/`data.train_split`.
`check_sources` validates every entry (name, builder config, kind from the builder's features,
weight, split present and non-empty) before any record is read.

Reads. Each split is read by random access from an ArrayRecord copy of its tfds shards
(`<builder data_dir>/random_access/<split>.array_record`, written once, atomically, by
`prepare`; an ArrayRecord-prepared builder is read directly). Which record fills which row of
global batch b is pure index arithmetic (medvl_jax/data/mixing.py): per-source streams with their
own epoch counters, each epoch a full permutation seeded by (seed, source, epoch), rows per
source from closed-form cumulative targets of the weights. Host p reads only the records of
its rows [p * B / P, (p + 1) * B / P) of each global batch, so `start_step=k` costs O(B) reads
and batch b is a function of (config.seed, b) only, whatever the number of hosts.

Processing (tf.data, parallel, deterministic): parse + decode, the source's augmentation chain
(`config.data.augment_chain`, default ConVIRT's) seeded by (seed, source, epoch, position),
one sentence drawn per example per epoch (`data.text_mode='sentence'`) or the whole report
('report'), then tokenisation. Batches follow the agreed layout: image, input_ids,
attention_mask, has_image, has_text, source (+ eval mask). Text-only rows carry a zero image,
image-only rows an all-padding text (attention_mask all 0). With one source the stream is the
landed pipeline's, example for example, for splits of up to 10,000 records (its
`shuffle_buffer` block, which then held the whole split); larger splits, which the landed code
only shuffled within 10k windows, are now fully permuted.

Eval stream: one pass over `data.name`'s `data.eval_split` in file order, centre crop, a fixed
sentence per example, the last batch padded with `mask == False` rows so every host yields the
same number of batches; each host reads only its rows.
"""

import atexit
from collections.abc import Iterator
import dataclasses
import math
import os
import pathlib
from typing import Any
import weakref

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

try:  # The input pipeline must not grab accelerator memory that JAX needs.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # Devices already initialised by an earlier import.
  pass

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
from tensorflow_datasets.core import example_parser  # pylint: disable=g-import-not-at-top

from medvl_jax.data import augment, corpora, mixing, records
from medvl_jax.data.records import RecordStore  # pylint: disable=g-import-not-at-top
from medvl_jax.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_SAMPLE_DIR = REPO_ROOT.parent / "shared" / "data"
SAMPLE_DIR_ENV = "MEDVL_SAMPLE_DIR"
# Salts that keep the random streams of different uses apart.
_EVAL_SALT, _IMAGE, _TEXT = 0xE7A1, 1, 2
KINDS = ("paired", "image", "text")
TEXT_MODES = {"sentence": "sentences", "report": "text"}  # text_mode -> tfds feature.

Batch = dict[str, np.ndarray]
# Live iterators: closed at exit, since a tf.data generator thread still running at interpreter
# shutdown can hang it.
_LIVE: "weakref.WeakSet[Iterator[Batch]]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for iterator in list(_LIVE):
    iterator.close()


def _corpus(name: str, where: str = "config.data.name") -> corpora.Corpus:
  """The registry entry of `name` (medvl_jax.data.corpora, the one dataset registry)."""
  return corpora.get(name, key=where)


def _check_config(config: ml_collections.ConfigDict) -> None:
  if config.data.image_size > config.data.resize:
    raise ConfigError(
      f"config.data.image_size={config.data.image_size} is larger than "
      f"config.data.resize={config.data.resize}"
    )
  if config.data.text_mode not in TEXT_MODES:
    raise ConfigError(
      f"config.data.text_mode={config.data.text_mode!r} is unknown; valid: {', '.join(TEXT_MODES)}"
    )
  if config.data.augment_chain not in augment.CHAINS:
    raise ConfigError(
      f"config.data.augment_chain={config.data.augment_chain!r} is unknown; "
      f"valid: {', '.join(augment.CHAINS)}"
    )


@dataclasses.dataclass(frozen=True)
class Source:
  """One resolved entry of config.data.sources."""

  where: str  # 'config.data.sources[i]', for error messages.
  name: str
  builder_config: str
  split: str
  kind: str
  weight: float
  chain: str


def sources(config: ml_collections.ConfigDict) -> list[Source]:
  """config.data.sources resolved (the one-source shorthand when empty)."""
  entries = config.data.sources
  if not entries:
    return [
      Source(
        "config.data",
        config.data.name,
        config.data.builder_config,
        config.data.train_split,
        "paired",
        1.0,
        config.data.augment_chain,
      )
    ]
  out = []
  for i, entry in enumerate(entries):
    where = f"config.data.sources[{i}]"
    entry = dict(entry)
    unknown = set(entry) - {"name", "builder_config", "split", "kind", "weight", "augment"}
    missing = {"name", "builder_config", "split", "kind", "weight"} - set(entry)
    if unknown or missing:
      raise ConfigError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    if entry["kind"] not in KINDS:
      raise ConfigError(f"{where}.kind={entry['kind']!r} is unknown; valid: {', '.join(KINDS)}")
    chain = entry.get("augment") or config.data.augment_chain
    if chain not in augment.CHAINS:
      raise ConfigError(f"{where}.augment={chain!r} is unknown; valid: {', '.join(augment.CHAINS)}")
    out.append(
      Source(
        where,
        entry["name"],
        entry["builder_config"],
        entry["split"],
        entry["kind"],
        float(entry["weight"]),
        chain,
      )
    )
  return out


def _builder_for(name: str, builder_config: str, data_dir: str, where: str):
  spec = _corpus(name, f"{where}.name" if where != "config.data" else "config.data.name")
  cls = corpora.builder_cls(name)
  names = [c.name for c in cls.BUILDER_CONFIGS]
  if builder_config not in names:
    raise ConfigError(
      f"{where}.builder_config={builder_config!r} is not a config of "
      f"{spec.tfds_name}; valid: {', '.join(names)}"
    )
  return spec, cls(config=builder_config, data_dir=data_dir or None)


def _features(builder, spec: corpora.Corpus, kind: str, text_mode: str) -> tuple[str, str]:
  """(image feature, text feature) a `kind` row reads ('' = none); ConfigError if missing."""
  features = builder.info.features
  image_key = spec.image_key if spec.image_key in features else ""
  text_key = TEXT_MODES[text_mode] if spec.text_key and TEXT_MODES[text_mode] in features else ""
  need_image, need_text = kind in ("paired", "image"), kind in ("paired", "text")
  if (need_image and not image_key) or (need_text and not text_key):
    serves = [k for k in KINDS if (k == "text" or image_key) and (k == "image" or text_key)]
    raise ConfigError(
      f"kind {kind!r} cannot be served by {builder.name}/"
      f"{builder.builder_config.name} (text_mode={text_mode!r}); it serves: "
      f"{', '.join(serves) or 'nothing'}"
    )
  return (image_key if need_image else ""), (text_key if need_text else "")


def _check_split(builder, split: str, where: str) -> int:
  """The number of examples of `split` (ConfigError if unknown, DataError if empty)."""
  _, first, end = records.split_range(builder, split, where)
  if end <= first:
    raise DataError(
      f"{where}: split {split!r} of {builder.name}/{builder.builder_config.name} is empty"
    )
  return end - first


def check_sources(config: ml_collections.ConfigDict) -> list[Source]:
  """Validates config.data (+ sources) without reading any record; returns the sources.

  Splits are checked where the dataset is prepared (an auto-prepared sample is checked once
  `prepare` has built it).
  """
  _check_config(config)
  resolved = sources(config)
  mixing.check_weights([s.weight for s in resolved], config.batch_size)
  for source in resolved:
    try:
      spec, builder = _builder_for(
        source.name, source.builder_config, config.data.data_dir, source.where
      )
      _features(builder, spec, source.kind, config.data.text_mode)
    except ConfigError as e:
      raise ConfigError(
        f"{source.where}: {e}" if not str(e).startswith("config.") else str(e)
      ) from None
    if builder.is_prepared():
      _check_split(builder, source.split, source.where)
    elif not spec.auto_prepare:
      raise DataError(
        f"{builder.data_dir}: dataset {spec.tfds_name}/{source.builder_config} "
        f"({source.where}) is not prepared; run `python -m data_pipelines.prepare "
        f"{spec.tfds_name} --manual_dir=...`"
      )
  return resolved


def resolve_sample_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  """config.data.sample_dir, else $MEDVL_SAMPLE_DIR, else <repo>/../shared/data."""
  if config.data.sample_dir:
    where, value = "config.data.sample_dir", config.data.sample_dir
  else:
    where, value = f"${SAMPLE_DIR_ENV}", os.environ.get(SAMPLE_DIR_ENV, "")
  path = pathlib.Path(value).expanduser() if value else DEFAULT_SAMPLE_DIR
  if path.is_dir():
    return path
  looked = (
    f"{where}={value!r}" if value else f"config.data.sample_dir and ${SAMPLE_DIR_ENV} (both unset)"
  )
  raise DataError(
    f"sample data not found: looked at {looked} and at the default "
    f"{DEFAULT_SAMPLE_DIR} (exists: {DEFAULT_SAMPLE_DIR.is_dir()}); point one of "
    "them at the folder holding covid_cxr_notes/ and iu_reports/"
  )


def _prepared(config, name: str, builder_config: str, where: str = "config.data"):
  spec, builder = _builder_for(name, builder_config, config.data.data_dir, where)
  if builder.is_prepared():
    corpora.warn_if_source_changed(name, builder)  # One warning line if the source changed.
    return builder
  if not spec.auto_prepare:
    raise DataError(
      f"{builder.data_dir}: dataset {spec.tfds_name}/{builder_config} is not "
      f"prepared; run `python -m data_pipelines.prepare {spec.tfds_name} "
      "--manual_dir=...`"
    )
  sample_dir = resolve_sample_dir(config)
  logging.info(
    "Preparing %s/%s from %s into %s (once).",
    spec.tfds_name,
    builder_config,
    sample_dir,
    builder.data_dir,
  )
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(sample_dir), try_download_gcs=False
    )
  )
  return builder


def prepare(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Prepares data.name (and every train source); returns data.name's tfds builder.

  The bundled sample is built on first use; each train split also gets its random-access
  ArrayRecord copy here (once).
  """
  builder = _prepared(config, config.data.name, config.data.builder_config)
  if "data" in config and "train_split" in config.data:  # Full configs (not prepare-only).
    for source in sources(config):
      b = _prepared(config, source.name, source.builder_config, source.where)
      _check_split(b, source.split, source.where)
      RecordStore.open(b, source.split)
  return builder


def _open_store(builder, split: str) -> records.RecordStore:
  """Every record read of the pipeline goes through the store returned here."""
  return RecordStore.open(builder, split)


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
  """A local Hugging Face fast tokenizer (never downloads)."""
  import transformers  # pylint: disable=g-import-not-at-top

  if not path or not pathlib.Path(path).is_dir():
    raise DataError(f"tokenizer directory not found: {str(path)!r}")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot load a tokenizer ({e})") from e
  if not tokenizer.is_fast:
    raise DataError(f"{path}: not a fast tokenizer (tokenizer.json missing?)")
  return tokenizer


def split_sizes(config: ml_collections.ConfigDict, resolved: list[Source]) -> list[int]:
  """Examples in each source's split, from the prepared datasets' metadata (no record read)."""
  return [
    _check_split(_prepared(config, s.name, s.builder_config, s.where), s.split, s.where)
    for s in resolved
  ]


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  return _check_split(prepare(config), split, "config.data")


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


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  image = tf.io.decode_image(encoded, channels=1, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 1])


@dataclasses.dataclass
class _Reader:
  """A prepared source: its records and a parser of the features its kind reads."""

  source: Source
  store: RecordStore
  parser: Any  # Parses the image (still encoded) and text features only.
  image_key: str
  text_key: str

  def parse(self, raw: tf.Tensor) -> dict[str, tf.Tensor]:
    return self.parser.parse_example(raw)


def _readers(config, resolved: list[Source]) -> list[_Reader]:
  out = []
  for source in resolved:
    builder = _prepared(config, source.name, source.builder_config, source.where)
    spec = _corpus(source.name)
    _check_split(builder, source.split, source.where)
    image_key, text_key = _features(builder, spec, source.kind, config.data.text_mode)
    info = builder.info.features.get_serialized_info()
    keys = [k for k in (image_key, text_key) if k]
    # The image stays encoded (decoded in _decode); text features need no decoding.
    out.append(
      _Reader(
        source,
        _open_store(builder, source.split),
        example_parser.ExampleParser({k: info[k] for k in keys}),
        image_key,
        text_key,
      )
    )
  return out


def _text(reader: _Reader, ex, seed) -> tf.Tensor:
  if not reader.text_key:
    return tf.constant("")
  if reader.text_key == "sentences":
    return _pick_sentence(ex["sentences"], seed)
  return ex[reader.text_key]


def train_records(
  config,
  readers: list[_Reader],
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


def _train_dataset(
  config: ml_collections.ConfigDict, start_step: int, process_index: int, process_count: int
) -> tf.data.Dataset:
  """Per-host batches of the layout (with 'text' and 'index' before tokenisation)."""
  per_host = _per_host(config, process_count)
  readers = _readers(config, sources(config))
  plan = mixing.Plan(
    config.seed,
    config.batch_size,
    tuple(len(r.store) for r in readers),
    tuple(r.source.weight for r in readers),
  )
  aug_cfg = dict(config.data.augment)
  size, resize = config.data.image_size, config.data.resize

  def branch(s: int, reader: _Reader, raw, e, p):
    ex = reader.parse(raw)
    ex_key = mixing.fold(mixing.source_key(config.seed, s), e, p)
    if reader.image_key:
      chain = augment.CHAINS[reader.source.chain]
      image = chain(
        _decode(ex[reader.image_key]),
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
  iterator = _tokenize(batches, tokenizer, max_length)
  _LIVE.add(iterator)
  return iterator


def _tokenize(batches: Iterator[dict[str, Any]], tokenizer, max_length: int) -> Iterator[Batch]:
  """Replaces 'text' by 'input_ids' and 'attention_mask' (int32); rows without text get an
  all-padding text."""
  for batch in batches:
    texts = [t.decode("utf-8") for t in batch.pop("text")]
    del batch["index"]  # Record index in the split: for tests and debugging only.
    tokens = tokenizer(
      texts,
      padding="max_length",
      truncation=True,
      max_length=max_length,
      return_attention_mask=True,
      return_tensors="np",
    )
    ids = tokens["input_ids"].astype(np.int32)
    mask = tokens["attention_mask"].astype(np.int32)
    none = ~batch["has_text"]
    ids[none], mask[none] = tokenizer.pad_token_id, 0
    batch["input_ids"], batch["attention_mask"] = ids, mask
    yield batch


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
  check_sources(config)
  _check_hosts(config, process_index, process_count)
  prepare(config)
  ds = _train_dataset(config, start_step, process_index, process_count)
  return _tokenized(ds.as_numpy_iterator(), tokenizer, config.data.max_length)


def eval_records(
  reader: _Reader, n: int, global_batch: int, process_index: int, process_count: int
) -> Iterator[tuple]:
  """(serialized record or b'', index) of this host's rows of the padded file-order pass."""
  per_host = global_batch // process_count
  for start in range(0, math.ceil(n / global_batch) * global_batch, global_batch):
    rows = range(start + process_index * per_host, start + (process_index + 1) * per_host)
    real = [i for i in rows if i < n]
    records = reader.store.read(real) if real else []
    yield from zip(records + [b""] * (len(rows) - len(real)), rows)


def _eval_dataset(
  config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> tf.data.Dataset:
  """Per-host padded batches of the layout + 'mask' (with 'text', 'index')."""
  per_host = _per_host(config, process_count)
  builder = _prepared(config, config.data.name, config.data.builder_config)
  spec = _corpus(config.data.name)
  kind = "paired" if spec.image_key and spec.text_key else ("image" if spec.image_key else "text")
  source = Source(
    "config.data",
    config.data.name,
    config.data.builder_config,
    split,
    kind,
    1.0,
    config.data.augment_chain,
  )
  (reader,) = _readers(config, [source])
  n = len(reader.store)
  size, resize = config.data.image_size, config.data.resize
  key = tf.constant([0, _EVAL_SALT], tf.int64)  # Fixed: same sentences whatever the seed.
  del builder

  @tf.autograph.experimental.do_not_convert
  def process(raw, i):
    mask = i < n

    def real():
      ex = reader.parse(raw)
      image = (
        augment.to_uint8(augment.center_crop(_decode(ex[reader.image_key]), size, resize))
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
  _check_config(config)
  _check_hosts(config, process_index, process_count)
  ds = _eval_dataset(config, split, process_index, process_count)
  return _tokenized(ds.as_numpy_iterator(), tokenizer, config.data.max_length)
