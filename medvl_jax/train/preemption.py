"""SIGTERM, as schedulers send it before preempting a job: save at the next step and stop.

The handler is installed first thing in `train_and_evaluate`, so a SIGTERM during data
preparation, model building or compilation ends the run after that stage with one line and
exit 0 (not 143, the default action's).
"""

import signal
import threading

from absl import logging


class Preemption:
  """`requested` turns True at a SIGTERM (handled only when created in the main thread, where
  Python runs signal handlers)."""

  def __init__(self):
    self.requested = False
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: checkpointing at the next step, then stopping.")
    self.requested = True


def stop_during_setup(stage: str, mngr=None) -> dict:
  """The run's end when a SIGTERM came before training: one line; nothing to save."""
  logging.warning(
    "SIGTERM received during %s: stopped before training; nothing new to save "
    "(rerun the command to resume)",
    stage,
  )
  if mngr is not None:
    mngr.close()
  return {}
