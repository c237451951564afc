"""Scale-out acceptance (slow): the smoke config trained on a ('data', 'fsdp') = (2, 2) mesh by
2 processes x 2 CPU devices (gloo) has the per-step losses of 1 process x 4 devices on the same
mesh and of 1 process x 1 device; and a checkpoint written by 2 processes resumes in 1 process
on another mesh shape (and the reverse) with the losses of an uninterrupted run."""

import numpy as np
import pytest

from tests.conftest import read_scalars, run_main, run_two_hosts, smoke_args

STEPS = 6
MESH_2X2 = "--config.mesh=(('data', 2), ('fsdp', 2), ('model', 1))"
# Every leaf of >= 256 elements sharded over 'fsdp' (the smoke model's are tiny otherwise).
FSDP = ("--config.sharding.rules=(('.*', 'fsdp'),)", "--config.sharding.fsdp_min_size=256")
# Same global batch and program, split differently: float32 reduction-order noise only, which
# training for 6 steps at lr 1e-3 amplifies a little; measured max relative difference ~1e-6.
RTOL = 2e-5


def _args(workdir, tfds_dir, *extra, steps=STEPS):
  return smoke_args(
    workdir,
    tfds_dir,
    f"--config.total_steps={steps}",
    "--config.eval_every=3",
    "--config.checkpoint_every=3",
    *extra,
  )


def _two_processes(args, logs, devices_per_process=2):
  return run_two_hosts(args, logs, devices_per_process)


def _one_process(args, devices):
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  proc = run_main(*args, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


def _assert_same(losses, reference, steps):
  assert sorted(losses) == list(steps), sorted(losses)
  for step in steps:
    np.testing.assert_allclose(losses[step], reference[step], rtol=RTOL, err_msg=f"step {step}")
  worst = max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in steps)
  print(f"max relative loss difference over steps {steps}: {worst:.2e}")  # shown with -s


@pytest.mark.slow
def test_fsdp_mesh_two_processes_equal_one_process_and_one_device(smoke_run, tfds_dir, tmp_path):
  one_device = read_scalars(smoke_run[0] / "tensorboard")["train_loss"]  # 1 process x 1 device

  log = _two_processes(_args(tmp_path / "2x2", tfds_dir, MESH_2X2, *FSDP), tmp_path / "logs")
  assert "mesh: 4 devices (cpu) over 2 processes, data=2 fsdp=2 model=1" in log
  assert "distributed: explicit coordinator" in log and "gloo" in log
  assert "leaves sharded by config.sharding.rules" in log
  two_procs = read_scalars(tmp_path / "2x2" / "tensorboard")["train_loss"]

  log = _one_process(_args(tmp_path / "1x4", tfds_dir, MESH_2X2, *FSDP), devices=4)
  assert "mesh: 4 devices (cpu) over 1 processes, data=2 fsdp=2 model=1" in log
  one_proc = read_scalars(tmp_path / "1x4" / "tensorboard")["train_loss"]

  steps = range(1, STEPS + 1)
  _assert_same(two_procs, one_device, steps)
  _assert_same(one_proc, one_device, steps)
  _assert_same(two_procs, one_proc, steps)


@pytest.mark.slow
def test_checkpoint_moves_between_process_counts_and_mesh_shapes(smoke_run, tfds_dir, tmp_path):
  """2 processes (2x2 FSDP mesh) write step 3 -> 1 process, 1 device, pure data parallel,
  resumes to step 6; and 1 process x 4 devices (4-way FSDP) writes step 3 -> 2 processes x
  1 device resume. Both continue with the losses of the uninterrupted 1-device run."""
  reference = read_scalars(smoke_run[0] / "tensorboard")["train_loss"]

  a = tmp_path / "a"
  _two_processes(_args(a, tfds_dir, MESH_2X2, *FSDP, steps=3), tmp_path / "logs_a")
  log = _one_process(_args(a, tfds_dir), devices=1)
  assert "resumed from checkpoint step 3" in log
  _assert_same(read_scalars(a / "tensorboard")["train_loss"], reference, range(1, STEPS + 1))

  b = tmp_path / "b"
  fsdp4 = "--config.mesh=(('data', 1), ('fsdp', -1), ('model', 1))"
  _one_process(_args(b, tfds_dir, fsdp4, *FSDP, steps=3), devices=4)
  log = _two_processes(_args(b, tfds_dir), tmp_path / "logs_b", devices_per_process=1)
  assert "resumed from checkpoint step 3" in log
  assert "mesh: 2 devices (cpu) over 2 processes, data=2 fsdp=1 model=1" in log
  _assert_same(read_scalars(b / "tensorboard")["train_loss"], reference, range(1, STEPS + 1))
