"""The train sources of a run: config.data.sources resolved, checked and prepared.

`config.data.sources` lists {'name', 'builder_config', 'split', 'kind' (paired | image | text),
'weight' > 0, optionally 'augment' (a chain of augment.CHAINS)}; empty or absent, it is the one
paired source `data.name`/`data.builder_config`/`data.train_split`. `check_sources` validates
every entry (name, builder config, kind from the builder's features, weight, split present and
non-empty) before any record is read.

Prepare once, read everywhere: a corpus and the random-access copies of its splits
(medvl_jax/data/records.py) are built by `python -m data_pipelines.prepare`, on one machine;
training hosts only read them. `prepare` checks that every source is prepared and has its
copies, else one DataError line with the prepare command. The one exception is the bundled
sample (`cxr_sample`): a single-host run on a local data dir builds it and its copies from the
sample directory on first use; several hosts (or a bucket) get the prepare command instead.
"""

import dataclasses
import os
import pathlib

from absl import logging
import ml_collections
import tensorflow as tf

try:  # The input pipeline must not grab accelerator memory that JAX needs.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # Devices already initialised by an earlier import.
  pass

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from medvl_jax import paths  # pylint: disable=g-import-not-at-top
from medvl_jax.data import augment, corpora, mixing, records  # pylint: disable=g-import-not-at-top
from medvl_jax.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_SAMPLE_DIR = REPO_ROOT.parent / "shared" / "data"
SAMPLE_DIR_ENV = "MEDVL_SAMPLE_DIR"
TEXT_MODES = {"sentence": "sentences", "report": "text"}  # text_mode -> tfds feature.


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError (one line naming the key) unless config.data has an image size within the
  resize, a known text mode and a known augmentation chain (that every key exists is
  `config_check`'s schema, checked first)."""
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
    if entry["kind"] not in corpora.KINDS:
      raise ConfigError(
        f"{where}.kind={entry['kind']!r} is unknown; valid: {', '.join(corpora.KINDS)}"
      )
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
  spec = corpora.get(name, key=f"{where}.name" if where != "config.data" else "config.data.name")
  cls = corpora.builder_cls(name)
  names = [c.name for c in cls.BUILDER_CONFIGS]
  if builder_config not in names:
    raise ConfigError(
      f"{where}.builder_config={builder_config!r} is not a config of "
      f"{spec.tfds_name}; valid: {', '.join(names)}"
    )
  return spec, cls(config=builder_config, data_dir=data_dir or None)


def feature_keys(builder, spec: corpora.Corpus, kind: str, text_mode: str) -> tuple[str, str]:
  """(image feature, text feature) a `kind` row reads ('' = none); ConfigError if missing."""
  features = builder.info.features
  image_key = spec.image_key if spec.image_key in features else ""
  text_key = TEXT_MODES[text_mode] if spec.text_key and TEXT_MODES[text_mode] in features else ""
  need_image, need_text = kind in ("paired", "image"), kind in ("paired", "text")
  if (need_image and not image_key) or (need_text and not text_key):
    serves = [k for k in corpora.KINDS if (k == "text" or image_key) and (k == "image" or text_key)]
    raise ConfigError(
      f"kind {kind!r} cannot be served by {builder.name}/"
      f"{builder.builder_config.name} (text_mode={text_mode!r}); it serves: "
      f"{', '.join(serves) or 'nothing'}"
    )
  return (image_key if need_image else ""), (text_key if need_text else "")


def split_size(builder, split: str, where: str) -> int:
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
  check_config(config)
  paths.check_reachable(config.data.data_dir)  # One line now, not the clients' retries later.
  resolved = sources(config)
  mixing.check_weights([s.weight for s in resolved], config.batch_size)
  # A data dir in a bucket: one line within seconds if it cannot be reached (the builders'
  # reads below would otherwise retry for minutes).
  paths.check_reachable(config.data.data_dir)
  for source in resolved:
    try:
      spec, builder = _builder_for(
        source.name, source.builder_config, config.data.data_dir, source.where
      )
      feature_keys(builder, spec, source.kind, config.data.text_mode)
    except ConfigError as e:
      raise ConfigError(
        f"{source.where}: {e}" if not str(e).startswith("config.") else str(e)
      ) from None
    if builder.is_prepared():
      split_size(builder, source.split, source.where)
    elif not spec.auto_prepare:
      raise _not_prepared(builder, source.where)
  return resolved


def _not_prepared(builder, where: str, manual_dir: str | None = None) -> DataError:
  return DataError(
    f"{builder.data_dir}: dataset {builder.name}/{builder.builder_config.name} ({where}) is "
    f"not prepared; prepare it once, on one machine: "
    f"{corpora.prepare_command(builder, manual_dir)}"
  )


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


def _sample_dir_if_any(config: ml_collections.ConfigDict) -> str | None:
  try:
    return os.fspath(resolve_sample_dir(config))
  except DataError:  # Not on this host: the command names a placeholder.
    return None


def prepared_builder(
  config: ml_collections.ConfigDict,
  name: str,
  builder_config: str,
  where: str = "config.data",
  *,
  process_count: int = 1,
) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of corpus `name`, with the random-access copies of its splits.

  The bundled sample is built (with its copies) on first use when `process_count` is 1 and the
  data dir is local; otherwise a dataset that is not prepared is a DataError naming the
  command that prepares it. Copies are checked where a split is opened (RecordStore.open).
  """
  spec, builder = _builder_for(name, builder_config, config.data.data_dir, where)
  auto = spec.auto_prepare and process_count == 1 and not paths.is_url(builder.data_dir)
  if builder.is_prepared():
    corpora.warn_if_source_changed(name, builder)  # One warning line if the source changed.
    if auto and not records.has_copies(builder):
      records.write_copies(builder)
    return builder
  if not auto:
    raise _not_prepared(builder, where, _sample_dir_if_any(config) if spec.auto_prepare else None)
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
  records.write_copies(builder)
  return builder


def prepare(
  config: ml_collections.ConfigDict, *, process_count: int = 1
) -> tfds.core.DatasetBuilder:
  """Checks that data.name and every train source are prepared, with the random-access copies
  the run reads (train splits, and data.eval_split of data.name); returns data.name's builder.

  Reads only, except for the bundled sample on a single host (`prepared_builder`). A data dir
  in a bucket is probed first (one line if it cannot be reached).
  """
  paths.check_reachable(config.data.data_dir)
  builder = prepared_builder(
    config, config.data.name, config.data.builder_config, process_count=process_count
  )
  if "data" in config and "train_split" in config.data:  # Full configs (not prepare-only).
    for source in sources(config):
      b = prepared_builder(
        config, source.name, source.builder_config, source.where, process_count=process_count
      )
      split_size(b, source.split, source.where)
      records.RecordStore.open(b, source.split)
    if config.data.eval_split:
      records.RecordStore.open(builder, config.data.eval_split)
  return builder


def split_sizes(config: ml_collections.ConfigDict, resolved: list[Source]) -> list[int]:
  """Examples in each source's split, from the prepared datasets' metadata (no record read)."""
  return [
    split_size(prepared_builder(config, s.name, s.builder_config, s.where), s.split, s.where)
    for s in resolved
  ]


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  """Examples in `split` of data.name (prepared first if need be)."""
  return split_size(prepare(config), split, "config.data")
