"""The progress line and the train scalars of a log window (`train/log_window.py`), written
through a real TensorBoard writer."""

import logging
import time

from clu import metric_writers
import jax.numpy as jnp
import pytest

from medvl_jax.train import log_window, nonfinite
from tests.conftest import read_scalars


def _metrics(loss: float | None) -> dict:
  """A step's metrics as the jitted step returns them; None = a skipped step (zeroed)."""
  skipped = loss is None
  return {
    "loss": jnp.float32(0.0 if skipped else loss),
    "acc": jnp.float32(0.0 if skipped else 0.5),
    "skipped": jnp.float32(skipped),
    "raw_loss": jnp.float32(float("nan") if skipped else loss),
    "raw_grad_norm": jnp.float32(1.0),
  }


class _Run:
  """A guard and a log window over a real writer; `step(loss)` dispatches the next step."""

  def __init__(self, tmp_path, total_steps=10, start_step=0):
    self.logdir = tmp_path / "tb"
    self.writer = metric_writers.create_default_writer(str(self.logdir), asynchronous=False)
    self.guard = nonfinite.NonFiniteGuard("skip", 10)
    self.window = log_window.LogWindow(
      self.writer, self.guard, total_steps=total_steps, batch_size=8, start_step=start_step
    )
    self.n = start_step

  def step(self, loss):
    self.n += 1
    metrics = _metrics(loss)
    self.guard.add(self.n, metrics)
    self.window.add(metrics)

  def scalars(self):
    self.writer.flush()
    return read_scalars(self.logdir)


def _lines(caplog) -> list[str]:
  """The progress lines ('step N/total | ...')."""
  return [r.getMessage() for r in caplog.records if r.getMessage().split(" | ")[0].count("/")]


def test_means_leave_skipped_steps_out(tmp_path, caplog):
  run = _Run(tmp_path)
  for loss in (2.0, None, 4.0):
    run.step(loss)
  with caplog.at_level(logging.INFO, logger="absl"):
    run.window.close(3)
  assert run.window.last == {"train_loss": 3.0, "train_acc": 0.5}  # raw_* values left out
  (line,) = _lines(caplog)
  assert line.startswith("step 3/10 | loss 3.0000 | ") and "examples/s | ETA " in line
  assert line.endswith(" | 1 skipped (non-finite)")  # the guard read the window's flags
  scalars = run.scalars()
  assert scalars["train_loss"] == {3: 3.0} and scalars["skipped_steps"] == {3: 1.0}
  assert scalars["sec_per_step"][3] > 0


def test_a_window_of_skipped_steps_only_has_no_means(tmp_path, caplog):
  run = _Run(tmp_path)
  run.step(1.0)
  run.window.close(1)
  run.step(None)
  run.step(None)
  with caplog.at_level(logging.INFO, logger="absl"):
    run.window.close(3)
  assert run.window.last == {}
  (line,) = _lines(caplog)
  assert line.startswith("step 3/10 | loss n/a (skipped) | ")
  assert line.endswith(" | 2 skipped (non-finite)")
  assert "train_loss" not in {k for k, v in run.scalars().items() if 3 in v}


def test_a_deferred_window_is_logged_after_the_next_step(tmp_path, caplog):
  run = _Run(tmp_path, total_steps=20, start_step=10)
  run.step(1.0)
  run.step(3.0)
  with caplog.at_level(logging.INFO, logger="absl"):
    run.window.close(12, defer=True)
    assert _lines(caplog) == []
    run.step(5.0)  # the next step, dispatched before the window's figures are fetched
    run.window.log_deferred()
    run.window.log_deferred()  # once only
  (line,) = _lines(caplog)
  assert line.startswith("step 12/20 | loss 2.0000 | ")
  assert "skipped" not in line
  run.window.close(13)
  assert run.scalars()["train_loss"] == {12: 2.0, 13: 5.0}  # the next window: step 13 alone


def test_the_rate_excludes_time_given_to_exclude(tmp_path):
  run = _Run(tmp_path)
  run.step(1.0)
  t0 = time.perf_counter()
  time.sleep(0.3)
  run.window.exclude(time.perf_counter() - t0)
  run.window.close(1)
  run.step(1.0)
  time.sleep(0.3)
  run.window.close(2)
  rate = run.scalars()["sec_per_step"]
  assert rate[1] < 0.1 <= 0.3 <= rate[2]


@pytest.mark.parametrize(
  "seconds,text", [(0, "0m00s"), (59.9, "0m59s"), (61, "1m01s"), (3661, "1h01m01s"), (-5, "0m00s")]
)
def test_fmt_duration(seconds, text):
  assert log_window.fmt_duration(seconds) == text
