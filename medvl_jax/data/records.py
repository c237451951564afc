"""Random access to the records of a tfds split: an ArrayRecord copy of its tfrecord shards.

tfds reads ArrayRecord-prepared data by index (`as_data_source`) but not through `as_dataset`,
which the evaluators use; so the corpora stay prepared as tfrecord and each train split gets a
one-file ArrayRecord copy (`<builder data_dir>/random_access/<split>.array_record`), written
once, atomically, with the serialized examples in file order. A builder prepared as
ArrayRecord is read directly. The data dir may be a gs:// URL: ArrayRecord reads it with its
own GCS client, and a copy is written locally, then uploaded (`medvl_jax.paths`).
"""

import os
import pathlib
import tempfile

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from medvl_jax import paths as paths_lib
from medvl_jax.errors import ConfigError, DataError


def split_range(builder, split: str, where: str) -> tuple[str, int, int]:
  """(split name, first, end) of a split or one tfds slice of it ('train', 'train[:10%]')."""
  try:
    (inst,) = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  except (KeyError, ValueError, AssertionError) as e:
    valid = ", ".join(builder.info.splits)
    raise ConfigError(
      f"{where}: split {split!r} not in {builder.name}/"
      f"{builder.builder_config.name} ({valid}; one split or a slice of one: "
      f"{str(e).splitlines()[0] if str(e) else type(e).__name__})"
    ) from None
  n = builder.info.splits[inst.splitname].num_examples
  first = 0 if inst.from_ is None else inst.from_
  end = n if inst.to is None else inst.to
  return inst.splitname, first, end


class RecordStore:
  """Random access to the serialized tf.train.Examples of one split (or slice), file order."""

  def __init__(self, paths: list[str], size: int, first: int = 0):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top

    self._source = array_record_data_source.ArrayRecordDataSource(paths)
    self._first, self._size = first, size
    if len(self._source) < first + size:
      raise DataError(f"{paths[0]}: {len(self._source)} records, the split needs {first + size}")

  def __len__(self) -> int:
    return self._size

  def read(self, indices: list[int]) -> list[bytes]:
    # One by one in the caller's thread: __getitems__ fans out to a thread pool, which is
    # slower for a host's few rows and fails once the interpreter shuts down.
    return [self._source[self._first + i] for i in indices]

  @classmethod
  def open(cls, builder, split: str) -> "RecordStore":
    """The split's records; writes the ArrayRecord copy of tfrecord shards on first use."""
    name, first, end = split_range(builder, split, "split")
    info = builder.info.splits[name]
    data_dir = os.fspath(builder.data_dir)
    shards = [paths_lib.join(data_dir, f) for f in info.filenames]
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
      return cls(shards, end - first, first)
    path = paths_lib.join(data_dir, "random_access", f"{name}.array_record")
    if not paths_lib.exists(path):
      if paths_lib.is_url(path):  # written locally, then uploaded: one object, atomic
        with tempfile.TemporaryDirectory(prefix="medvl-records-") as local:
          _write_array_record(pathlib.Path(local, f"{name}.array_record"), shards)
          paths_lib.copy(pathlib.Path(local, f"{name}.array_record"), path)
      else:
        _write_array_record(pathlib.Path(path), shards)
    return cls([path], end - first, first)


def _write_array_record(path: pathlib.Path, shards: list[str]) -> None:
  """Copies tfrecord shards (in order) into one local ArrayRecord file, atomically."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
  count = 0
  for record in tf.data.TFRecordDataset(shards).as_numpy_iterator():
    writer.write(record)
    count += 1
  writer.close()
  os.replace(tmp, path)
  logging.info("Wrote the random-access copy %s (%d records).", path, count)
