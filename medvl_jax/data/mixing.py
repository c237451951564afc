"""Which record of which source fills each row of a global train batch: pure index arithmetic.

A `Plan` mixes S sources of N_s records with weights w_s into global batches of B rows.

* Counts. Before global batch b, source s has contributed C_s(b) rows: the largest-remainder
  rounding of b * B * w_s / W (W = sum of weights; ties to the lower source index). So
  sum_s C_s(b) = b * B exactly, |C_s(b) - b * B * w_s / W| < 1 for every b, and batch b takes
  C_s(b + 1) - C_s(b) rows of source s (>= 0 as long as B * w_s / W >= 1, which
  `check_weights` demands). C_s(b) is closed-form: resuming needs no replay of the past.
* Streams. Source s's k-th example (k = 0, 1, ...) is element k of its own stream: epoch
  e = k // N_s, position p = k % N_s, record perm_{s,e}[p]; perm_{s,e} is a full permutation
  of range(N_s), a pure function of (seed, s, e). Each source has its own epoch counter.
* Rows. Batch b lists its rows source by source (in stream order); with several sources they
  are then shuffled by a permutation seeded by (seed, b), so every host slice mixes kinds.
  Host p of P takes rows [p * B / P, (p + 1) * B / P) and reads only their records.

With one source, rows stay in stream order and the permutation of epoch e is the argsort of
N stateless uniforms keyed by [seed, TRAIN_SALT] folded with (e, 0): the one-source stream is
that epoch order, read batch by batch.
"""

import collections
import dataclasses

import numpy as np
import tensorflow as tf

from medvl_jax.errors import ConfigError

TRAIN_SALT = 0x7A11  # Source 0's stream key: [seed, TRAIN_SALT].
_SOURCE_SALT, _ROWS_SALT = 0x50C, 0x4035


def fold(seed: tf.Tensor, *data) -> tf.Tensor:
  for d in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
  return seed


def source_key(seed: int, source: int) -> tf.Tensor:
  """Stateless key of source `source`'s stream (source 0: [seed, TRAIN_SALT] itself)."""
  key = tf.constant([seed, TRAIN_SALT], tf.int64)
  return key if source == 0 else fold(key, _SOURCE_SALT, source)


def check_weights(weights, batch_size: int, where: str = "config.data.sources") -> None:
  total = float(sum(weights))
  for s, w in enumerate(weights):
    if not w > 0:
      raise ConfigError(f"{where}[{s}].weight={w} must be > 0")
    if batch_size * w / total < 1:
      raise ConfigError(
        f"{where}[{s}].weight={w}: its share of a batch of {batch_size} is "
        f"{batch_size * w / total:.3g} rows; each source needs >= 1 row per "
        "batch (raise its weight or the batch size)"
      )


@dataclasses.dataclass
class Plan:
  """The deterministic train stream of a mix of sources (see the module docstring)."""

  seed: int
  batch_size: int
  sizes: tuple[int, ...]  # N_s, records per source split.
  weights: tuple[float, ...]

  def __post_init__(self):
    check_weights(self.weights, self.batch_size)
    self._cache = collections.OrderedDict()  # (s, e) -> permutation; a few recent epochs.

  def counts_before(self, b: int) -> np.ndarray:
    """C_s(b): rows of each source in global batches [0, b)."""
    w = np.asarray(self.weights, np.float64)
    quota = b * self.batch_size * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    left = b * self.batch_size - int(counts.sum())
    order = sorted(range(len(w)), key=lambda s: (-(quota[s] - counts[s]), s))
    counts[order[:left]] += 1
    return counts

  def permutation(self, s: int, e: int) -> np.ndarray:
    """perm_{s,e}: the record order of epoch e of source s (a full permutation)."""
    if (s, e) not in self._cache:
      u = tf.random.stateless_uniform([self.sizes[s]], fold(source_key(self.seed, s), e, 0))
      self._cache[(s, e)] = tf.argsort(u).numpy()
      if len(self._cache) > 2 * len(self.sizes) + 2:
        self._cache.popitem(last=False)
    else:
      self._cache.move_to_end((s, e))
    return self._cache[(s, e)]

  def rows(self, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(source s, stream position k) of each row of global batch b, in row order."""
    lo, hi = self.counts_before(b), self.counts_before(b + 1)
    sources = np.concatenate([np.full(h - l, s, np.int64) for s, (l, h) in enumerate(zip(lo, hi))])
    ks = np.concatenate([np.arange(l, h, dtype=np.int64) for l, h in zip(lo, hi)])
    if len(self.sizes) > 1:
      key = fold(tf.constant([self.seed, _ROWS_SALT], tf.int64), b)
      order = tf.argsort(tf.random.stateless_uniform([self.batch_size], key)).numpy()
      sources, ks = sources[order], ks[order]
    return sources, ks

  def host_rows(
    self, b: int, process_index: int, process_count: int
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(source, epoch, position, record index) of host `process_index`'s rows of batch b."""
    per_host = self.batch_size // process_count
    sl = slice(process_index * per_host, (process_index + 1) * per_host)
    sources, ks = (a[sl] for a in self.rows(b))
    sizes = np.asarray(self.sizes, np.int64)[sources]
    epochs, positions = ks // sizes, ks % sizes
    index = np.array(
      [self.permutation(int(s), int(e))[p] for s, e, p in zip(sources, epochs, positions)], np.int64
    )
    return sources, epochs, positions, index
