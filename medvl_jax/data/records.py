"""Random access to the records of a tfds split: its ArrayRecord copy, read by index.

tfds reads ArrayRecord-prepared data by index (`as_data_source`) but not through `as_dataset`;
the corpora stay prepared as tfrecord (what tfds's generation writes) and every split gets a
one-file ArrayRecord copy, `<builder data_dir>/random_access/<split>.array_record`, holding the
serialized examples in file order. A builder prepared as ArrayRecord is read directly.

Prepare once, read everywhere. `write_copies` writes the copies, on one machine: through
`python -m data_pipelines.prepare` (every corpus), or a single-host run on the bundled sample
(medvl_jax/data/sources.py). `RecordStore.open` only reads: a split without its copy is one
DataError line naming the prepare command. A copy is written under a temporary name beside it
and renamed when whole, so a file at the final name is complete.

Reads: `RecordStore.read` hands all the indices of a call (a host batch) to ArrayRecord's
parallel read (its C++ thread pool, `MAX_IN_FLIGHT` requests at once from a bucket), in the
caller's order. Paths may be gs:// URLs: ArrayRecord reads them through its own GCS client
(medvl_jax/paths.py points it at an emulator in tests).
"""

import bisect
from collections.abc import Iterator, Sequence
import itertools
import os
import socket

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from medvl_jax import paths, progress
from medvl_jax.data import corpora
from medvl_jax.errors import ConfigError, DataError

COPY_DIR = "random_access"
# Requests in flight per read call on a bucket: from GCS each record is one ranged GET of tens
# of ms, so a host batch's reads must overlap (docs/corpora.md, "A data dir in a bucket").
MAX_IN_FLIGHT = 32
# Options of ArrayRecord's reader: no read-ahead (random access). Local files keep ArrayRecord's
# default parallelism, measured fastest on the sample (bench/record_reads.py).
_LOCAL_OPTIONS = "readahead_buffer_size:0"
_URL_OPTIONS = f"readahead_buffer_size:0,max_parallelism:{MAX_IN_FLIGHT}"
_READ_BUFFER = 32768  # Bytes; as ArrayRecord's own data source reads.


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


def copy_path(builder, split: str) -> str:
  """Where the random-access copy of `split` (a split name, not a slice) lives."""
  return paths.join(builder.data_dir, COPY_DIR, f"{split}.array_record")


def has_copies(builder) -> bool:
  """Whether every split of a prepared builder can be read by index (has its copy)."""
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    return True
  return all(paths.exists(copy_path(builder, s)) for s in builder.info.splits)


class RecordStore:
  """Random access to the serialized tf.train.Examples of one split (or slice), file order."""

  def __init__(self, files: list[str], size: int, first: int = 0):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    self._readers = [
      array_record_module.ArrayRecordReader(
        os.fspath(f),
        _URL_OPTIONS if paths.is_url(f) else _LOCAL_OPTIONS,
        file_reader_buffer_size=_READ_BUFFER,
      )
      for f in files
    ]
    self._ends = list(itertools.accumulate(r.num_records() for r in self._readers))
    self.total = self._ends[-1] if self._ends else 0  # Records in the files.
    self._first, self._size = first, size
    if self.total < first + size:
      raise DataError(f"{files[0]}: {self.total} records, the split needs {first + size}")

  def __len__(self) -> int:
    return self._size

  def read(self, indices: Sequence[int]) -> list[bytes]:
    """The records at `indices` (positions in the split or slice), in that order.

    Each file's share is one call of ArrayRecord's parallel read: the requests of a host batch
    are in flight together, not one after another.
    """
    keys = [self._first + int(i) for i in indices]
    if any(not self._first <= k < self._first + self._size for k in keys):
      raise IndexError(f"record index out of range [0, {self._size}): {list(indices)}")
    if len(self._readers) == 1:
      return list(self._readers[0].read(keys)) if keys else []
    by_file: dict[int, tuple[list[int], list[int]]] = {}
    for row, key in enumerate(keys):
      f = bisect.bisect_right(self._ends, key)
      rows, positions = by_file.setdefault(f, ([], []))
      rows.append(row)
      positions.append(key - (self._ends[f - 1] if f else 0))
    out = [b""] * len(keys)
    for f, (rows, positions) in by_file.items():
      for row, record in zip(rows, self._readers[f].read(positions)):
        out[row] = record
    return out

  @classmethod
  def open(cls, builder, split: str) -> "RecordStore":
    """The records of a split of a prepared builder; reads only, never writes.

    DataError (one line with the prepare command) when the split has no random-access copy, or
    one that does not hold the split's records.
    """
    name, first, end = split_range(builder, split, "split")
    info = builder.info.splits[name]
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
      files = [paths.join(builder.data_dir, f) for f in info.filenames]
    else:
      files = [copy_path(builder, name)]
    where = f"{builder.name}/{builder.builder_config.name}"
    # A missing object must be named here: ArrayRecord opens a missing gs:// object as empty.
    if missing := [f for f in files if not paths.exists(f)]:
      raise DataError(
        f"{missing[0]}: split {name!r} of {where} has no random-access copy; prepare it "
        f"once, on one machine: {corpora.prepare_command(builder)}"
      )
    store = cls(files, 0)
    if store.total != info.num_examples:
      raise DataError(
        f"{files[0]}: {store.total} records, split {name!r} of {where} has "
        f"{info.num_examples}; rebuild it: {corpora.prepare_command(builder)} --rebuild"
      )
    store._first, store._size = first, end - first  # pylint: disable=protected-access
    return store


def decoded_split(builder, split: str, chunk: int = 256) -> tf.data.Dataset:
  """The decoded examples of `split` in file order, read from its random-access copy.

  What `builder.as_dataset(split, shuffle_files=False)` yields, without TensorFlow's file
  system: a gs:// data dir is read through ArrayRecord's GCS client, `chunk` records a call.
  """
  store = RecordStore.open(builder, split)

  def records() -> Iterator[bytes]:
    for start in range(0, len(store), chunk):
      yield from store.read(range(start, min(start + chunk, len(store))))

  ds = tf.data.Dataset.from_generator(records, output_signature=tf.TensorSpec([], tf.string))
  return ds.map(
    builder.info.features.deserialize_example,
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )


def write_copies(builder, *, show_progress: bool = False) -> dict[str, int]:
  """Writes the random-access copy of every split of `builder` that has none; returns the
  records written per split.

  For a local data dir (a bucket gets the copies that `data_pipelines.prepare` wrote in its
  staging directory). Temporaries that a killed writer on this host left are removed first.
  """
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    return {}
  if paths.is_url(builder.data_dir):
    raise DataError(f"{builder.data_dir}: random-access copies are written locally, then uploaded")
  directory = os.path.join(builder.data_dir, COPY_DIR)
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):
    if _is_stale_temporary(name):
      logging.warning("removing %s (left by an interrupted copy)", os.path.join(directory, name))
      os.remove(os.path.join(directory, name))
  written = {}
  for split, info in builder.info.splits.items():
    path = copy_path(builder, split)
    if not os.path.exists(path):
      shards = [os.path.join(builder.data_dir, f) for f in info.filenames]
      written[split] = _write_array_record(path, shards, info.num_examples, show_progress)
  return written


def _temporary(path: str) -> str:
  # Host and pid in the name: only this host's dead writers' temporaries are stale.
  head, name = os.path.split(path)
  return os.path.join(head, f".{name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _is_stale_temporary(name: str) -> bool:
  parts = name.split(".")
  if not (name.startswith(".") and name.endswith(".tmp") and len(parts) >= 5):
    return False
  host, pid = ".".join(parts[3:-2]), parts[-2]
  if host != socket.gethostname() or not pid.isdigit():
    return False
  try:
    os.kill(int(pid), 0)  # Signal 0: does the process exist?
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False


def _write_array_record(path: str, shards: list[str], total: int, show_progress: bool) -> int:
  """Copies tfrecord shards (in order) into one ArrayRecord file, atomically."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  tmp = _temporary(path)
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  count = 0
  desc = f"random-access copy of {os.path.basename(path).split('.')[0]}"
  with progress.bar(total, desc, unit="rec", min_total=0 if show_progress else total + 1) as bar:
    for record in tf.data.TFRecordDataset(shards).as_numpy_iterator():
      writer.write(record)
      count += 1
      bar.update(1)
  writer.close()
  if count != total:
    os.remove(tmp)
    raise DataError(f"{shards[0]}: {count} records in the shards, the split has {total}")
  os.replace(tmp, path)
  logging.info("Wrote the random-access copy %s (%d records).", path, count)
  return count
