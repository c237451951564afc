"""Random-access records: parallel reads in the caller's order, reads that never write, copies
written whole, and the decoded split the evaluators read (real ArrayRecord files, the real
sample)."""

import os
import shutil
import socket
import subprocess

from array_record.python import array_record_module
import numpy as np
import pytest

from data_pipelines.cxr_sample import Builder
from medvl_jax.data import records
from medvl_jax.errors import DataError
from tests.data.sample import N_VALIDATION, listing


def _write(path, items) -> str:
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for item in items:
    writer.write(item)
  writer.close()
  return str(path)


def test_read_keeps_the_order_across_files_and_slices(tmp_path):
  a = [f"a{i}".encode() for i in range(10)]
  b = [f"b{i}".encode() * (i + 1) for i in range(15)]
  files = [_write(tmp_path / "a.array_record", a), _write(tmp_path / "b.array_record", b)]
  whole = a + b
  store = records.RecordStore(files, size=20, first=3)  # Records 3..22 of the two files.
  indices = [0, 16, 5, 7, 19, 6, 7, 0]
  assert store.read(indices) == [whole[3 + i] for i in indices]
  assert store.read(np.array([19, 1])) == [whole[22], whole[4]]
  assert store.read([]) == [] and len(store) == 20 and store.total == 25
  with pytest.raises(IndexError):
    store.read([20])
  one = records.RecordStore([files[1]], size=15)
  assert one.read(list(range(14, -1, -1))) == b[::-1]
  with pytest.raises(DataError, match="15 records, the split needs 16"):
    records.RecordStore([files[1]], size=16)


@pytest.fixture
def sample_copy(data_dir, tmp_path):
  """A private copy of the prepared paired sample (with its copies), as a data dir."""
  shutil.copytree(data_dir / "cxr_sample" / "paired", tmp_path / "tfds" / "cxr_sample" / "paired")
  return tmp_path / "tfds"


def test_open_reads_only_and_names_the_prepare_command(sample_copy, sample_data_dir):
  builder = Builder(config="paired", data_dir=str(sample_copy))
  assert records.has_copies(builder)
  assert len(records.RecordStore.open(builder, "validation[:5]")) == 5
  os.remove(records.copy_path(builder, "validation"))
  before = listing(sample_copy)
  assert not records.has_copies(builder)
  with pytest.raises(DataError) as error:
    records.RecordStore.open(builder, "validation")
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(records.copy_path(builder, "validation"))
  assert message.endswith(
    "split 'validation' of cxr_sample/paired has no random-access copy; prepare it once, on "
    "one machine: python -m data_pipelines.prepare cxr_sample --config=paired "
    f"--manual_dir={sample_data_dir} --data_dir={sample_copy}"
  )
  assert listing(sample_copy) == before  # Nothing written, not even a directory.
  # A copy that does not hold the split (another build's): refused, with the rebuild command.
  shutil.copy(records.copy_path(builder, "test"), records.copy_path(builder, "validation"))
  with pytest.raises(DataError, match=r"has 21; rebuild it: .* --rebuild$"):
    records.RecordStore.open(builder, "validation")


def test_write_copies_is_atomic_and_removes_only_dead_writers_leftovers(sample_copy):
  builder = Builder(config="paired", data_dir=str(sample_copy))
  path = records.copy_path(builder, "validation")
  expected = records.RecordStore([path], N_VALIDATION).read(range(N_VALIDATION))
  os.remove(path)
  directory = os.path.dirname(path)
  dead = _dead_pid()
  host = socket.gethostname()
  leftovers = {
    "dead": f".validation.array_record.{host}.{dead}.tmp",
    "alive": f".validation.array_record.{host}.{os.getppid()}.tmp",  # Another live writer.
    "other_host": ".validation.array_record.other-host.example.1.tmp",
  }
  for name in leftovers.values():
    with open(os.path.join(directory, name), "wb") as f:
      f.write(b"half a copy")
  assert records.write_copies(builder) == {"validation": N_VALIDATION}
  left = set(os.listdir(directory))
  assert leftovers["dead"] not in left
  assert {leftovers["alive"], leftovers["other_host"]} <= left
  assert records.RecordStore.open(builder, "validation").read(range(N_VALIDATION)) == expected
  assert records.write_copies(builder) == {}  # Every split has its copy: nothing to do.


def _dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_decoded_split_is_what_as_dataset_gives(data_dir):
  builder = Builder(config="paired", data_dir=str(data_dir))
  ours = list(records.decoded_split(builder, "validation", chunk=4).as_numpy_iterator())
  theirs = list(builder.as_dataset(split="validation", shuffle_files=False).as_numpy_iterator())
  assert len(ours) == len(theirs) == N_VALIDATION
  for a, b in zip(ours, theirs):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
