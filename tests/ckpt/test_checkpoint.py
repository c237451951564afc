"""Orbax retention: the latest N checkpoints plus the best by validation loss survive."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax.ckpt import checkpoint
from medvl_jax.errors import CheckpointError


def test_keeps_latest_n_and_best(tmp_path):
  mngr = checkpoint.manager(tmp_path, keep=2)
  val = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.0}
  for step, loss in val.items():
    state = {"w": jnp.full((3,), float(step)), "step": jnp.asarray(step)}
    checkpoint.save(mngr, step, state, {"batches_consumed": step, "seed": 0}, val_loss=loss)
  mngr.wait_until_finished()
  assert sorted(mngr.all_steps()) == [2, 4, 5]  # best (step 2) + latest two
  assert mngr.best_step() == 2 and mngr.latest_step() == 5
  mngr.close()
  # A fresh manager (as after a restart) sees the same, and the best one restores.
  again = checkpoint.manager(tmp_path, keep=2, read_only=True)
  restored = again.restore(2)
  np.testing.assert_array_equal(restored["state"]["w"], [2.0, 2.0, 2.0])
  assert restored["data"] == {"batches_consumed": 2, "seed": 0}


def test_restore_of_missing_step_names_available(tmp_path):
  mngr = checkpoint.manager(tmp_path, keep=2)
  state = {"w": jnp.ones((2,))}
  checkpoint.save(mngr, 7, state, {"batches_consumed": 7, "seed": 0})
  mngr.wait_until_finished()
  with pytest.raises(CheckpointError, match=r"step 9 .*available: \[7\]"):
    checkpoint.restore(mngr, jax.tree.map(lambda x: x, state), step=9)
