"""The mixing plan: each source's share of the rows, and full-file shuffles that differ between
epochs (on a real 20k-record ArrayRecord store, read through the train stream's records)."""

import pathlib

from array_record.python import array_record_module
import numpy as np
import pytest

from medvl_jax.data import mixing, records, sources, streams
from tests.data.sample import CountingStore, take_rows


def test_realised_shares_over_1000_batches():
  # Tolerance: after any number of batches each source is within 1 row of B * b * w / W.
  weights = (5.0, 3.0, 1.5)
  plan = mixing.Plan(seed=0, batch_size=16, sizes=(261, 497, 1597), weights=weights)
  counts = np.zeros(3)
  for b in range(1000):
    rows, _ = plan.rows(b)
    assert len(rows) == 16
    counts += np.bincount(rows, minlength=3)
    np.testing.assert_array_less(np.abs(counts - (b + 1) * 16 * np.array(weights) / 9.5), 1.0)
  np.testing.assert_allclose(counts / counts.sum(), np.array(weights) / 9.5, atol=1e-4)


@pytest.fixture(scope="module")
def store_20k(tmp_path_factory) -> pathlib.Path:
  """A real ArrayRecord file of 20,000 records; record i holds its file position i."""
  path = tmp_path_factory.mktemp("ar") / "fixture.array_record"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for i in range(20_000):
    writer.write(str(i).encode())
  writer.close()
  return path


def test_shuffle_spans_the_file_and_differs_between_epochs(store_20k):
  n, batch = 20_000, 64
  store = CountingStore(records.RecordStore([str(store_20k)], n))
  source = sources.Source("fixture", "fixture", "", "train", "text", 1.0, "convirt")
  reader = streams.Reader(source, store, None, "", "")
  plan = mixing.Plan(seed=3, batch_size=batch, sizes=(n,), weights=(1.0,))
  it = streams.train_records(None, [reader], plan, 0, 0, 1)
  steps = 2 * n // batch  # 625 batches: two epochs.
  rows = take_rows(it, steps)
  positions = np.array([int(r[0]) for r in rows])
  np.testing.assert_array_equal(positions, [r[4] for r in rows])  # Read what was asked.
  epochs = positions[:n], positions[n : 2 * n]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))  # Full permutations.
  # Statistic: spread of file positions within a batch, (max - min) / N. A random batch of
  # 64 spans ~0.97 N; a window shuffle of block K spans <= K / N (a 10k window: 0.5).
  spread = [np.ptp(positions[i : i + batch]) / n for i in range(0, len(positions), batch)]
  assert min(spread) > 0.8 and np.median(spread) > 0.95
  assert np.mean(epochs[0] == epochs[1]) < 0.01  # The order differs between epochs.
  # Consecutive batches are not local either: their mean positions are uncorrelated.
  means = np.array([positions[i : i + batch].mean() for i in range(0, n, batch)])
  assert abs(np.corrcoef(means[:-1], means[1:])[0, 1]) < 0.2
  # Resume at step 10,000 (epoch 32 of this store) reads one batch of records.
  store.count = 0
  resumed = streams.train_records(None, [reader], plan, 10_000, 0, 1)
  first = take_rows(resumed, 1)
  assert store.count == batch
  assert [r[2] for r in first] == [10_000 * batch // n] * batch
