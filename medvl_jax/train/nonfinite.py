"""`config.nonfinite` on the host: the steps the jitted update refused, counted in order.

The jitted step (`step.train_step`) never applies a non-finite update: the state comes back
unchanged and the step's `skipped` flag is 1. The guard reads those flags without stalling the
devices (a flag is read once its step is done, or when the host is `MAX_AHEAD` steps ahead)
and decides when the run stops:
  'halt': at the first skipped step;
  'skip': go on, unless `config.nonfinite_max_consecutive` steps in a row were skipped.
The flags are resolved in step order, and all of them before any evaluation or checkpoint, so
the outcome is exact: the same steps counted, the same step named, the same last good
checkpoint; only the updates of the (at most `MAX_AHEAD`) steps already dispatched after a
halting one are computed, and discarded with the run's unsaved state.
"""

import collections
import math

from absl import logging
import jax

# Steps the host may dispatch ahead of the last one whose non-finite flag it has read; beyond
# that it waits (back-pressure: bounded device memory for queued batches and metrics).
MAX_AHEAD = 2


class Halt(Exception):
  """The non-finite policy stops the run (the message names the step)."""


class NonFiniteGuard:
  """The queue of dispatched steps whose `skipped` flag is not read yet, and the policy.

  `add` each step's metrics (device arrays, as the step returns them) right after dispatching
  it; `settle` reads the queued flags in step order and raises `Halt` when the policy stops
  the run. `total` counts the skipped steps of the run (those of earlier attempts included),
  `streak` the skipped steps in a row up to the last one read.
  """

  def __init__(self, policy: str, max_consecutive: int, skipped_before: int = 0):
    self.policy = policy
    self.limit = int(max_consecutive)
    self.total, self.streak = skipped_before, 0
    self._pending = collections.deque()  # (step, metrics), oldest first

  def add(self, step: int, metrics: dict) -> None:
    """Queues a dispatched step (its metrics hold 'skipped', 'raw_loss', 'raw_grad_norm')."""
    self._pending.append((step, metrics))

  def settle(self, upto: int | None = None, wait: bool = True) -> None:
    """Reads the flags of the queued steps in order: of those up to `upto` (None: all); with
    `wait`=False only as far as the steps already done. Raises Halt."""
    while self._pending and (upto is None or self._pending[0][0] <= upto):
      step, metrics = self._pending[0]
      if not wait and not metrics["skipped"].is_ready():
        return
      self._pending.popleft()
      skipped, loss, grad_norm = jax.device_get(
        (metrics["skipped"], metrics["raw_loss"], metrics["raw_grad_norm"])
      )
      self.resolve(step, bool(skipped), float(loss), float(grad_norm))

  def resolve(self, step: int, skipped: bool, loss: float, grad_norm: float) -> None:
    """Counts one step's outcome; a skipped step gets a warning line. Raises Halt."""
    if not skipped:
      self.streak = 0
      return
    self.total += 1
    self.streak += 1
    logging.warning(
      "step %d: non-finite loss (%s) or gradient norm (%s): update not applied "
      "(%d skipped in a row, %d in total; config.nonfinite=%r)",
      step,
      loss,
      grad_norm,
      self.streak,
      self.total,
      self.policy,
    )
    if self.policy == "halt":
      raise Halt(f"non-finite loss/gradient at step {step} (config.nonfinite='halt')")
    if self.streak >= self.limit:
      raise Halt(
        f"non-finite loss/gradient at steps {step - self.streak + 1}-{step} ({self.streak} in a "
        f"row = config.nonfinite_max_consecutive)"
      )

  def unhealthy(self, step: int) -> str | None:
    """Why the state after `step` must not be saved (None: it may be), from the flags read."""
    return f"step {step} was skipped (non-finite)" if self.streak else None

  def check_validation(self, step: int, val_loss: float) -> str | None:
    """Why the state evaluated at `step` must not be saved (None: the validation loss is
    finite). Raises Halt on a non-finite one under 'halt'."""
    if math.isfinite(val_loss):
      return None
    if self.policy == "halt":
      raise Halt(f"non-finite validation loss at step {step} (config.nonfinite='halt')")
    return f"validation loss {val_loss} at step {step}"
