"""The progress line and the train scalars: running means of the step metrics over a log window.

The steps' metrics stay on the devices as they come (no device work and no host sync per step)
and are fetched in one transfer per window. A window that ends at a step without evaluation or
checkpoint is logged once the next step has been dispatched (`close(..., defer=True)`, then
`log_deferred()`), so fetching its figures never leaves the devices idle.
"""

import time

from absl import logging
from clu import metric_writers
import jax
import numpy as np

from medvl_jax.train import nonfinite


def means(window: list[dict]) -> dict[str, float]:
  """Means of the window's metrics (waits for its steps and fetches them at once).

  Steps the non-finite guard skipped (`skipped` = 1, other metrics zeroed by the step) are
  left out; a window of skipped steps only gives no means at all.
  """
  if not window:
    return {}
  fetched = jax.device_get(window)
  sums = {k: float(np.sum([m[k] for m in fetched], dtype=np.float64)) for k in fetched[0]}
  n = len(window) - sums.pop("skipped", 0.0)
  return {k: v / n for k, v in sums.items()} if n > 0 else {}


def fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class LogWindow:
  """Collects the steps of a log window; writes its means and logs the progress line.

  The line, e.g. `step 10/30 | loss 2.3026 | 0.05 s/step | 160.0 examples/s | ETA 0m01s`, and
  the scalars train_<metric>, sec_per_step and skipped_steps, at the window's last step. The
  rate runs from the previous line (or from the construction, after the compile) and leaves
  out the time given to `exclude` (evaluation). `last` holds the last logged means.
  """

  def __init__(
    self,
    writer: metric_writers.MetricWriter,
    guard: nonfinite.NonFiniteGuard,
    *,
    total_steps: int,
    batch_size: int,
    start_step: int,
  ):
    self._writer, self._guard = writer, guard
    self._total_steps, self._batch_size = total_steps, batch_size
    self._window = []
    self._deferred = None  # (step, window): logged once the next step is dispatched
    self._t_report, self._step_report = time.perf_counter(), start_step
    self.last = {}

  def add(self, metrics: dict) -> None:
    """A dispatched step's metrics (device arrays; the raw_* values are not averaged)."""
    self._window.append({k: v for k, v in metrics.items() if not k.startswith("raw_")})

  def close(self, step: int, defer: bool = False) -> None:
    """Ends the window at `step`: logged now, or with `defer` at the next `log_deferred`."""
    window, self._window = self._window, []
    if defer:
      self._deferred = (step, window)
    else:
      self._log(step, window)

  def log_deferred(self) -> None:
    """Logs the window closed with `defer`, if any."""
    if self._deferred is not None:
      deferred, self._deferred = self._deferred, None
      self._log(*deferred)

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (spent on something else than training) out of the next rate."""
    self._t_report += seconds

  def _log(self, step: int, window: list[dict]) -> None:
    self._guard.settle(upto=step)  # the window's skipped steps are counted in the line
    self.last = {f"train_{k}": v for k, v in means(window).items()}
    now = time.perf_counter()
    sec_per_step = (now - self._t_report) / (step - self._step_report)
    self._t_report, self._step_report = now, step
    skipped = self._guard.total
    scalars = dict(self.last, sec_per_step=sec_per_step, skipped_steps=skipped)
    self._writer.write_scalars(step, scalars)
    loss = self.last.get("train_loss")
    logging.info(
      "step %d/%d | loss %s | %.2f s/step | %.1f examples/s | ETA %s%s",
      step,
      self._total_steps,
      "n/a (skipped)" if loss is None else f"{loss:.4f}",
      sec_per_step,
      self._batch_size / sec_per_step,
      fmt_duration(sec_per_step * (self._total_steps - step)),
      f" | {skipped} skipped (non-finite)" if skipped else "",
    )
