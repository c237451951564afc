"""The host side of `config.nonfinite` (`train/nonfinite.py`), fed the flags of real update
steps: which steps are counted, in which order, and where each policy stops."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medvl_jax.train import nonfinite, step

_OPT = ml_collections.ConfigDict(dict(lr=0.1, weight_decay=0.0, schedule="constant"))
_TX = step.make_optimizer(_OPT, {"w": True})


def _loss_fn(model, variables, batch, rng, train):  # pylint: disable=unused-argument
  return jnp.sum(variables["params"]["w"] * batch["x"]) ** 2, {}, variables["batch_stats"]


_STEP = jax.jit(
  lambda s, b: step.train_step(
    s, b, model=None, tx=_TX, loss_fn=_loss_fn, mask={"w": True}, rng=jax.random.key(0)
  )
)


def _step_metrics(flags: str) -> list[tuple[int, dict]]:
  """(step, metrics) of real jitted update steps, steps 1..; 'x' = a NaN batch, '.' = fine."""
  params = {"w": jnp.arange(3.0)}
  state = step.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=_TX.init(params)
  )
  out = []
  for i, flag in enumerate(flags, start=1):
    x = jnp.array([1.0, np.nan if flag == "x" else 1.0, 0.0])
    state, metrics = _STEP(state, {"x": x})
    out.append((i, metrics))
  jax.block_until_ready(out)
  return out


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if "update not applied" in r.getMessage()]


def _guard(policy="skip", limit=10, before=0, flags="") -> nonfinite.NonFiniteGuard:
  guard = nonfinite.NonFiniteGuard(policy, limit, before)
  for s, m in _step_metrics(flags):
    guard.add(s, m)
  return guard


def test_skip_counts_skipped_steps_and_resets_the_streak(caplog):
  guard = _guard(flags=".xx.x.")
  with caplog.at_level(logging.WARNING, logger="absl"):
    guard.settle()
  assert (guard.total, guard.streak) == (3, 0)
  lines = _warnings(caplog)
  assert [line.split(":")[0] for line in lines] == ["step 2", "step 3", "step 5"]
  assert "(2 skipped in a row, 2 in total; config.nonfinite='skip')" in lines[1]
  assert "(1 skipped in a row, 3 in total; config.nonfinite='skip')" in lines[2]
  assert "non-finite loss (nan)" in lines[0]


def test_skip_stops_at_max_consecutive_naming_the_streak():
  guard = _guard(limit=3, flags="x.xxxx")
  with pytest.raises(nonfinite.Halt) as e:
    guard.settle()
  assert str(e.value) == (
    "non-finite loss/gradient at steps 3-5 (3 in a row = config.nonfinite_max_consecutive)"
  )
  assert (guard.total, guard.streak) == (4, 3)  # step 6, dispatched after the stop, is not read


def test_halt_stops_at_the_first_skipped_step():
  guard = _guard(policy="halt", flags="..x.")
  with pytest.raises(nonfinite.Halt, match=r"^non-finite loss/gradient at step 3 \(config"):
    guard.settle()
  assert guard.total == 1


def test_settle_reads_in_order_up_to_a_step_and_counts_earlier_attempts():
  guard = _guard(before=7, flags="xxxxx")
  guard.settle(upto=2)
  assert (guard.total, guard.streak) == (9, 2)
  assert guard.unhealthy(2) == "step 2 was skipped (non-finite)"
  guard.settle(upto=2)  # nothing left up to 2
  assert guard.total == 9
  guard.settle(wait=False)  # every step is done (blocked on above): all of them are read
  assert (guard.total, guard.streak) == (12, 5)


def test_no_skipped_step_is_healthy():
  guard = _guard(flags="...")
  guard.settle()
  assert (guard.total, guard.streak) == (0, 0)
  assert guard.unhealthy(3) is None


def test_validation_loss_check():
  skip = nonfinite.NonFiniteGuard("skip", 10)
  assert skip.check_validation(4, 1.5) is None
  assert skip.check_validation(4, float("nan")) == "validation loss nan at step 4"
  halt = nonfinite.NonFiniteGuard("halt", 10)
  assert halt.check_validation(4, 1.5) is None
  with pytest.raises(nonfinite.Halt, match=r"non-finite validation loss at step 4 \(config"):
    halt.check_validation(4, float("inf"))
