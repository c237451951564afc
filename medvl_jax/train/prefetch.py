"""The next global batches, made by a background thread while the devices run a step."""

import queue
import threading


class Prefetcher:
  """`make()` (e.g. the next global batch, on the devices) run ahead by a background thread.

  Holds at most `depth` results; an exception in `make` is raised again by `next()` in the
  caller's thread (same type, same message). `close()` stops the thread (daemon: it never
  holds up the interpreter's exit).
  """

  def __init__(self, make, depth: int = 2):
    self._make = make
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="medvl-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    while not self._stop.is_set():
      try:
        item = (True, self._make())
      except BaseException as e:  # pylint: disable=broad-except  # handed to the consumer
        self._put((False, e))
        return
      if not self._put(item):
        return

  def next(self):
    ok, value = self._queue.get()
    if not ok:
      raise value
    return value

  def close(self) -> None:
    self._stop.set()
    while True:  # unblock a put in progress; the batches are dropped
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5.0)
