"""The 'saved checkpoint N (async, x.x s)' line of an async checkpoint save."""

import time

from absl import logging
import orbax.checkpoint as ocp

from medvl_jax.ckpt import checkpoint


class SaveLog:
  """Logs 'saved checkpoint N (async, x.x s)' once Orbax has finalised an async save.

  x.x runs from `started` (called once `checkpoint.save` has returned, i.e. after its blocking
  device-to-host copy) to Orbax's post-finalisation callback (`finalised`, passed as the
  manager's `on_commit`: the step's files written, just before the rename into place). The
  line is logged at the first `poll` after that (the loop polls at each step boundary), or
  when `poll(wait=True)` waits for it.
  """

  def __init__(self):
    self.pending, self.finalised_at = None, None

  def finalised(self) -> None:  # Orbax's background thread
    self.finalised_at = time.perf_counter()

  def started(self, step: int) -> None:
    """Called right after `checkpoint.save(..., step, ...)` returned."""
    self.pending, self.finalised_at = (step, time.perf_counter()), None

  def poll(self, mngr: ocp.CheckpointManager, wait: bool = False) -> None:
    """Logs the line if the pending save is done (with `wait`: once it is; CheckpointError,
    one line, if it failed)."""
    if self.pending is None:
      return
    if wait:
      checkpoint.wait_until_saved(mngr)
    elif mngr.is_saving_in_progress():
      return
    step, t0 = self.pending
    t1 = self.finalised_at or time.perf_counter()
    logging.info("saved checkpoint %d (async, %.1f s)", step, t1 - t0)
    self.pending = None
