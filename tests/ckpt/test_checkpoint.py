"""Orbax retention: the latest N checkpoints plus the best by validation loss survive; the
committed steps, intact or damaged, in a local workdir and in a bucket (a GCS emulator)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax import paths
from medvl_jax.ckpt import checkpoint
from medvl_jax.errors import CheckpointError

pytest_plugins = ("tests.conftest_gcs",)


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


def test_best_step_is_the_lowest_validation_loss_kept(tmp_path):
  assert checkpoint.best_step(tmp_path) is None  # no checkpoint at all
  mngr = checkpoint.manager(tmp_path, keep=1)
  for step, loss in {250: 2.4, 500: 2.7, 750: float("nan"), 1000: 3.0}.items():
    state = {"w": jnp.full((3,), float(step)), "step": jnp.asarray(step)}
    checkpoint.save(mngr, step, state, {"batches_consumed": step, "seed": 0}, val_loss=loss)
  mngr.wait_until_finished()
  mngr.close()
  assert checkpoint.best_step(tmp_path) == 250  # not the latest (1000), NaN never best
  # Steps saved without a validation loss: there is no best one (not the latest by default).
  other = tmp_path / "other"
  mngr = checkpoint.manager(other, keep=2)
  checkpoint.save(mngr, 3, {"w": jnp.ones((2,))}, {"batches_consumed": 3, "seed": 0})
  mngr.wait_until_finished()
  mngr.close()
  assert checkpoint.best_step(other) is None
  # A reader's --step: a number, 'best', or nothing (newest intact); else one error line.
  assert checkpoint.resolve_step(tmp_path, "best") == 250
  assert checkpoint.resolve_step(tmp_path, "1000") == 1000
  assert checkpoint.resolve_step(tmp_path, None) is None
  with pytest.raises(CheckpointError, match="expected a step number or 'best'"):
    checkpoint.resolve_step(tmp_path, "latest")
  with pytest.raises(CheckpointError, match="no kept checkpoint carries a validation loss"):
    checkpoint.resolve_step(other, "best")


def test_restore_of_missing_step_names_available(tmp_path):
  mngr = checkpoint.manager(tmp_path, keep=2)
  state = {"w": jnp.ones((2,))}
  checkpoint.save(mngr, 7, state, {"batches_consumed": 7, "seed": 0})
  mngr.wait_until_finished()
  with pytest.raises(CheckpointError, match=r"step 9 .*available: \[7\]"):
    checkpoint.restore(mngr, jax.tree.map(lambda x: x, state), step=9)


# ----------------------------------------------------------------------------- local and gs://
@pytest.fixture
def workdir(local_or_bucket) -> str:
  return paths.join(local_or_bucket, "run")


def _state(step: int) -> dict:
  return {"w": jnp.full((3,), float(step)), "step": jnp.asarray(step)}


def _save_steps(workdir: str, *steps: int) -> None:
  mngr = checkpoint.manager(workdir, keep=len(steps))
  for step in steps:
    checkpoint.save(mngr, step, _state(step), {"batches_consumed": step, "seed": 0})
  mngr.wait_until_finished()
  mngr.close()


def _partial_copy(workdir: str, step: int, new: int) -> None:
  """Step `new` as a save killed mid-write leaves it: on GCS at its final name without the
  commit markers (Orbax writes them last), locally a temporary directory."""
  src = paths.join(workdir, "checkpoints", str(step))
  name = str(new) if paths.is_url(workdir) else f"{new}.orbax-checkpoint-tmp-1765000000"
  for rel in paths.files(src):
    if paths.name(rel) != "commit_success.txt":
      paths.mkdir(paths.parent(paths.join(workdir, "checkpoints", name, rel)))
      paths.copy(paths.join(src, rel), paths.join(workdir, "checkpoints", name, rel))


def test_only_committed_steps_count(workdir):
  _save_steps(workdir, 1)
  _partial_copy(workdir, 1, 2)
  ckpts = paths.join(workdir, "checkpoints")
  assert paths.isdir(paths.join(ckpts, "2" if paths.is_url(workdir) else paths.listdir(ckpts)[1]))
  assert checkpoint.committed_steps(ckpts) == [1]
  assert checkpoint.has_checkpoints(workdir) and checkpoint.latest_intact_step(workdir) == 1
  assert checkpoint.manager(workdir, read_only=True).latest_step() == 1

  paths.rmtree(paths.join(ckpts, "1"))  # only the killed save is left: no checkpoint at all
  assert not checkpoint.has_checkpoints(workdir)
  assert checkpoint.latest_intact_step(workdir) is None


def test_damaged_newest_step_is_set_aside(workdir):
  _save_steps(workdir, 1, 2)
  assert checkpoint.latest_intact_step(workdir) == 2
  paths.remove(paths.join(workdir, "checkpoints", "2", "state", "_METADATA"))
  assert checkpoint.has_checkpoints(workdir) and checkpoint.latest_intact_step(workdir) is None

  mngr = checkpoint.manager(workdir, keep=2)
  step, state, data = checkpoint.restore_newest_good(mngr, _state(0), workdir)
  assert step == 1 and data["batches_consumed"] == 1
  np.testing.assert_array_equal(state["w"], [1.0, 1.0, 1.0])
  assert checkpoint.committed_steps(paths.join(workdir, "checkpoints")) == [1]
  (aside,) = paths.listdir(paths.join(workdir, checkpoint.DAMAGED_DIR))
  assert aside.startswith("2-")
  assert "state/array_metadatas/process_0" in paths.files(
    paths.join(workdir, checkpoint.DAMAGED_DIR, aside)
  )
  # The next save of step 2 is a clean one.
  checkpoint.save(mngr, 2, _state(2), {"batches_consumed": 2, "seed": 0})
  mngr.wait_until_finished()
  assert checkpoint.latest_intact_step(workdir) == 2
