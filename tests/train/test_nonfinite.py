"""Non-finite values never reach the weights, a checkpoint, "best" or an export; the log lines a
user needs (saved checkpoint, run already complete, SIGTERM during start-up).

Issue 14, "What a user hits" case 1 (`--config.optimizer.lr=1e30` on a resumed smoke run) and
case 6 (silent saves, a finished workdir recompiled, SIGTERM during compile exits 143). The CLI
cases resume a copy of the shared 3-step `short_run`; lr=1e30 turns every step after the first
into NaN.
"""

import json
import math
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medvl_jax.ckpt import checkpoint
from medvl_jax.train import step
from tests.conftest import REPO, SHORT_STEPS, read_scalars, run_export, run_main, smoke_args

RESUME = (
  f"--config.checkpoint_every={SHORT_STEPS}",
  f"--config.eval_every={SHORT_STEPS}",
)


def _strict_json(path: pathlib.Path):
  def refuse(token):
    raise ValueError(f"{path}: bare {token} is not JSON")

  return json.loads(path.read_text(), parse_constant=refuse)


def _copy_run(short_run, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(short_run, workdir)
  return workdir


def _error_line(proc) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), last
  return last


def _assert_checkpoints_sane(workdir: pathlib.Path) -> list[int]:
  """Every checkpoint finite, every metrics file strict JSON, "best" a finite val_loss."""
  mngr = checkpoint.manager(workdir, read_only=True)
  steps = sorted(mngr.all_steps())
  for s in steps:
    leaves = jax.tree.leaves(mngr.restore(s)["state"]["params"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves), f"step {s} not finite"
    metrics = workdir / "checkpoints" / str(s) / "metrics" / "metrics"
    if metrics.exists():
      assert math.isfinite(_strict_json(metrics)["val_loss"])
  best = mngr.best_step()
  assert best is None or best in steps
  mngr.close()
  return steps


# ----------------------------------------------------------------------------- the step
def _tiny_state(tx, params):
  return step.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params)
  )


def test_step_skips_a_nonfinite_update_and_applies_the_next():
  """A NaN in the batch -> NaN loss and gradient: params and Adam state stay bit-identical,
  the step counter advances, `skipped` is 1; the next finite batch is applied as usual."""
  opt = ml_collections.ConfigDict(dict(lr=0.1, weight_decay=0.0, schedule="constant"))
  params = {"w": jnp.arange(4.0), "frozen": jnp.ones(2)}
  mask = {"w": True, "frozen": False}
  tx = step.make_optimizer(opt, mask)

  def loss_fn(model, variables, batch, rng, train):  # pylint: disable=unused-argument
    loss = jnp.sum(variables["params"]["w"] * batch["x"]) ** 2
    return loss, {"acc": jnp.asarray(0.5)}, variables["batch_stats"]

  fn = jax.jit(
    lambda s, b: step.train_step(
      s, b, model=None, tx=tx, loss_fn=loss_fn, mask=mask, rng=jax.random.key(0)
    )
  )
  state = _tiny_state(tx, params)
  before = jax.device_get(state)
  state, metrics = fn(state, {"x": jnp.array([1.0, np.nan, 0.0, 0.0])})
  after = jax.device_get(state)
  assert float(metrics["skipped"]) == 1.0 and math.isnan(float(metrics["raw_loss"]))
  assert float(metrics["loss"]) == 0.0 and float(metrics["acc"]) == 0.0  # out of the means
  assert int(after.step) == 1
  for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state)):
    np.testing.assert_array_equal(a, b)  # Adam's count included: the step never happened

  state, metrics = fn(state, {"x": jnp.array([1.0, 1.0, 0.0, 0.0])})
  assert float(metrics["skipped"]) == 0.0 and float(metrics["grad_norm"]) > 0
  assert int(state.step) == 2
  assert not np.array_equal(jax.device_get(state.params["w"]), before.params["w"])
  np.testing.assert_array_equal(jax.device_get(state.params["frozen"]), before.params["frozen"])


def test_step_skips_an_update_that_overflows_the_params():
  """Finite loss and gradient, but p + u overflows float32: not applied either."""
  opt = ml_collections.ConfigDict(dict(lr=3e38, weight_decay=0.0, schedule="constant"))
  params = {"w": jnp.full(3, -3e38)}
  tx = step.make_optimizer(opt, {"w": True})

  def loss_fn(model, variables, batch, rng, train):  # pylint: disable=unused-argument
    w = variables["params"]["w"]
    return jnp.sum(w - jax.lax.stop_gradient(w)), {}, variables["batch_stats"]  # 0, grad 1

  state, metrics = step.train_step(
    _tiny_state(tx, params),
    {},
    model=None,
    tx=tx,
    loss_fn=loss_fn,
    mask={"w": True},
    rng=jax.random.key(0),
  )
  assert float(metrics["skipped"]) == 1.0
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(params["w"]))


# ----------------------------------------------------------------------------- checkpoints
def test_nan_val_loss_is_never_best_and_metrics_stay_json(tmp_path):
  """Real Orbax manager, keep=1 latest + best: a NaN validation loss is not recorded (no bare
  NaN in the metrics file) and cannot evict the best finite step; a non-finite state is not
  written at all."""
  mngr = checkpoint.manager(tmp_path, keep=1)
  state = {"w": np.ones(3, np.float32)}
  for s, val in [(1, 1.0), (2, float("nan")), (3, 2.0), (4, float("inf"))]:
    checkpoint.save(mngr, s, state, {"batches_consumed": s}, val_loss=val)
    mngr.wait_until_finished()
  assert mngr.best_step() == 1
  assert sorted(mngr.all_steps()) == [1, 4]  # the best and the latest
  for metrics in (tmp_path / "checkpoints").glob("*/metrics/metrics"):
    assert math.isfinite(_strict_json(metrics)["val_loss"])
  with pytest.raises(checkpoint.CheckpointError, match="refusing to write checkpoint 5"):
    checkpoint.save(mngr, 5, {"w": np.array([1.0, np.nan], np.float32)}, {}, val_loss=0.5)
  mngr.wait_until_finished()
  assert sorted(mngr.all_steps()) == [1, 4]
  mngr.close()


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow  # resume of the smoke run with lr=1e30 until the stop: ~30-90 s
def test_lr_1e30_resume_skip_policy_stops_and_keeps_the_good_checkpoint(
  short_run, tfds_dir, tmp_path
):
  """The issue's case with the defaults ('skip', 10 in a row): NaN steps are skipped, counted
  (log + TensorBoard), the run stops with exit 2 naming the last good step (before: exit 0,
  NaN checkpoints, the best one deleted)."""
  workdir = _copy_run(short_run, tmp_path)
  proc = run_main(
    *smoke_args(workdir, tfds_dir, *RESUME),
    "--config.total_steps=20",
    "--config.optimizer.lr=1e30",
  )
  last = _error_line(proc)
  assert "10 in a row" in last and "config.nonfinite_max_consecutive" in last, last
  assert f"last good checkpoint: step {SHORT_STEPS}" in last, last
  assert "update not applied (1 skipped in a row" in proc.stderr
  assert _assert_checkpoints_sane(workdir) == [SHORT_STEPS]
  skipped = read_scalars(workdir / "tensorboard")["skipped_steps"]
  assert max(skipped.values()) == 10, skipped
  assert all(math.isfinite(v) for v in read_scalars(workdir / "tensorboard")["train_loss"].values())


@pytest.mark.slow  # a CLI run; kept out of the ~20 min default suite
def test_lr_1e30_resume_halt_policy(short_run, tfds_dir, tmp_path):
  workdir = _copy_run(short_run, tmp_path)
  proc = run_main(
    *smoke_args(workdir, tfds_dir, *RESUME),
    "--config.total_steps=12",
    "--config.optimizer.lr=1e30",
    "--config.nonfinite=halt",
  )
  last = _error_line(proc)
  assert "non-finite loss/gradient at step " in last and "'halt'" in last, last
  assert f"last good checkpoint: step {SHORT_STEPS}" in last, last
  assert _assert_checkpoints_sane(workdir) == [SHORT_STEPS]


def test_bad_nonfinite_policy_is_one_line(tmp_path, tfds_dir):
  proc = run_main(*smoke_args(tmp_path / "w", tfds_dir), "--config.nonfinite=ignore")
  last = _error_line(proc)
  assert "config.nonfinite='ignore'" in last and "halt, skip" in last, last


def test_export_refuses_nonfinite_weights_unless_allowed(short_run, tmp_path):
  """A NaN checkpoint (as older versions wrote) is refused; --allow_nonfinite exports it."""
  workdir = _copy_run(short_run, tmp_path)
  mngr = checkpoint.manager(workdir)
  restored = mngr.restore(SHORT_STEPS)
  state = jax.tree.map(np.array, restored["state"])  # writable host copies
  jax.tree.leaves(state["params"])[0].reshape(-1)[0] = np.nan
  bad = SHORT_STEPS + 1
  mngr.save(
    bad,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(restored["data"])
    ),
  )
  mngr.wait_until_finished()
  mngr.close()
  out = tmp_path / "out"
  proc = run_export(f"--workdir={workdir}", f"--out={out}")
  last = _error_line(proc)
  assert f"checkpoint step {bad}" in last and "non-finite" in last, last
  assert "--allow_nonfinite" in last and not out.exists()
  proc = run_export(f"--workdir={workdir}", f"--out={out}", "--allow_nonfinite")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _strict_json(out / "export.json")["step"] == bad


def test_rerun_of_a_finished_run_says_so_without_compiling(short_run, tfds_dir, tmp_path):
  workdir = _copy_run(short_run, tmp_path)
  events = sorted((workdir / "tensorboard").rglob("events.out.tfevents.*"))
  proc = run_main(*smoke_args(workdir, tfds_dir, *RESUME, f"--config.total_steps={SHORT_STEPS}"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"run already complete at step {SHORT_STEPS} (workdir {workdir})" in proc.stderr
  assert "compiled the train step" not in proc.stderr
  assert "mesh:" not in proc.stderr  # stopped before the mesh, data and model
  assert sorted((workdir / "tensorboard").rglob("events.out.tfevents.*")) == events


@pytest.mark.slow  # a CLI run; kept out of the ~20 min default suite
def test_saved_checkpoint_line(short_run, tfds_dir, tmp_path):
  """Resume 3 -> 5 with a checkpoint at 4 and 5: one 'saved checkpoint N (async, x.x s)' each."""
  workdir = _copy_run(short_run, tmp_path)
  proc = run_main(
    *smoke_args(workdir, tfds_dir, "--config.total_steps=5", "--config.checkpoint_every=4")
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  import re  # pylint: disable=g-import-not-at-top

  saved = re.findall(r"saved checkpoint (\d+) \(async, (\d+\.\d) s\)", proc.stderr)
  assert [int(s) for s, _ in saved] == [4, 5], proc.stderr[-2000:]


@pytest.mark.slow  # a CLI run; kept out of the ~20 min default suite
def test_sigterm_during_startup_exits_cleanly(tfds_dir, tmp_path):
  """SIGTERM right after the mesh line (data, model build and compile still ahead): one line,
  exit 0, no checkpoint (before: the default action, killed by signal 15 / exit 143)."""
  workdir = tmp_path / "startup"
  cmd = [sys.executable, "-m", "medvl_jax.main", *smoke_args(workdir, tfds_dir)]
  proc = subprocess.Popen(
    cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if "mesh:" in line:
      proc.send_signal(signal.SIGTERM)
      break
  _, rest = proc.communicate(timeout=240)
  err = "".join(seen) + rest
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM received during" in err and "stopped before training" in err, err[-2000:]
  assert "Traceback" not in err
  assert not list((workdir / "checkpoints").glob("[0-9]*"))
