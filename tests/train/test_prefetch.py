"""The background prefetcher (`train/prefetch.py`): order, bound, errors, stop."""

import threading
import time

import pytest

from medvl_jax.train import prefetch


class _Counter:
  def __init__(self, fail_at=None):
    self.made, self.fail_at = 0, fail_at
    self.lock = threading.Lock()

  def __call__(self):
    with self.lock:
      self.made += 1
      if self.made == self.fail_at:
        raise ValueError(f"bad record {self.made}")
      return self.made


def _next(p: prefetch.Prefetcher, timeout: float = 10.0):
  """`p.next()`, failing instead of hanging when no item ever comes."""
  out = []
  t = threading.Thread(target=lambda: out.append(_outcome(p.next)), daemon=True)
  t.start()
  t.join(timeout)
  assert out, f"no item or error within {timeout} s"
  ok, value = out[0]
  if not ok:
    raise value
  return value


def _outcome(fn):
  try:
    return True, fn()
  except Exception as e:  # pylint: disable=broad-except  # re-raised by _next
    return False, e


def _settled(counter, seconds=0.5):
  time.sleep(seconds)
  return counter.made


def test_items_come_in_order_and_at_most_depth_are_held():
  counter = _Counter()
  p = prefetch.Prefetcher(counter, depth=2)
  try:
    # depth in the queue plus the one made and waiting to be put
    assert _settled(counter) == 3
    assert [_next(p) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert _settled(counter) == 8
  finally:
    p.close()


def test_an_error_is_raised_in_the_consumer_after_the_good_items():
  p = prefetch.Prefetcher(_Counter(fail_at=3), depth=2)
  try:
    assert [_next(p), _next(p)] == [1, 2]
    with pytest.raises(ValueError, match="^bad record 3$"):
      _next(p)
  finally:
    p.close()


def test_close_stops_the_thread_while_it_waits_to_put():
  counter = _Counter()
  p = prefetch.Prefetcher(counter, depth=1)
  _settled(counter, 0.3)
  p.close()
  assert not p._thread.is_alive()  # pylint: disable=protected-access
  made = counter.made
  assert _settled(counter, 0.3) == made
