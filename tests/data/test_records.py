"""Random-access records of a prepared split (medvl_jax/data/records.py), from a local data dir
and from the same prepared data in a bucket served by a real GCS emulator."""

import os

from medvl_jax import paths
from medvl_jax.data import corpora, records

pytest_plugins = ("tests.conftest_gcs",)


def test_records_from_a_bucket_equal_the_local_ones(data_dir, gcs_bucket):
  """ArrayRecord reads the bucket with its own GCS client; nothing becomes a local `gs:` path."""
  local = corpora.builder("cxr_sample", "paired", data_dir=str(data_dir))
  store = records.RecordStore.open(local, "train")  # the local random-access copy
  version_dir = os.fspath(local.data_dir)
  relative = os.path.relpath(version_dir, data_dir)
  remote_dir = paths.join(gcs_bucket, "tfds")
  for rel in paths.files(version_dir):
    paths.copy(paths.join(version_dir, rel), paths.join(remote_dir, relative, rel))

  remote = corpora.builder("cxr_sample", "paired", data_dir=remote_dir)
  assert remote.is_prepared() and os.fspath(remote.data_dir).startswith("gs://")
  from_bucket = records.RecordStore.open(remote, "train[2:12]")
  assert len(from_bucket) == 10
  assert from_bucket.read(list(range(10))) == store.read(list(range(2, 12)))
  assert not os.path.exists("gs:")
