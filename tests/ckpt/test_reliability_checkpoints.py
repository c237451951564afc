"""Issue 14, the run's checkpoints and workdir: identity on resume, preflight, damaged
checkpoints (fallback to the newest good step), a disk that fills during a save, read-only
workdirs. Real Orbax checkpoints of the session's smoke run (copied, then damaged), the real CLI.

Cases that need a mount (tmpfs for a full disk, a read-only bind mount as root) run where the
machine allows `mount` (root in a container) and are skipped with the reason elsewhere.
"""

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from medvl_jax import config_check
from medvl_jax.ckpt import checkpoint
from medvl_jax.errors import CheckpointError, ConfigError
from tests.ckpt import damage
from tests.conftest import REPO, run_eval, run_main, smoke_args


def _one_line_error(proc, *needles) -> str:
  """Exit 2, the last stderr line is the one `error: ...` line, no traceback anywhere."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


def _copy_run(smoke_run, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir, ignore=shutil.ignore_patterns("eval", "discarded-*"))
  return workdir


# ----------------------------------------------------------------------------- run identity
@pytest.mark.parametrize(
  "override,key",
  [
    ("--config.model.projection_dim=64", "model.projection_dim (32 -> 64)"),  # shapes
    ("--config.seed=1", "seed (0 -> 1)"),
    ("--config.data.image_size=48", "data.image_size (64 -> 48)"),  # the data
  ],
)
def test_incompatible_resume_refused_and_config_json_untouched(
  smoke_run, tfds_dir, tmp_path, override, key
):
  workdir = _copy_run(smoke_run, tmp_path)
  before = (workdir / "config.json").read_bytes()
  proc = run_main(*smoke_args(workdir, tfds_dir, override))
  _one_line_error(proc, key, "cannot change on resume", str(workdir))
  assert (workdir / "config.json").read_bytes() == before
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "30"]


def test_export_after_refused_run_keeps_the_trained_crop_size(smoke_run, tfds_dir, tmp_path):
  """The issue's case: a refused `data.image_size=48` once rewrote config.json, and the
  export then claimed crop_size 48 for a model trained at 64."""
  pytest.importorskip("torch", reason="export writes torch files (extra 'torch')")
  from medvl_jax.interop import export

  workdir = _copy_run(smoke_run, tmp_path)
  proc = run_main(*smoke_args(workdir, tfds_dir, "--config.data.image_size=48"))
  assert proc.returncode == 2
  meta = export.export(workdir, tmp_path / "out")
  assert meta["step"] == 30
  pre = json.loads((tmp_path / "out" / "image_encoder" / "preprocessing.json").read_text())
  assert pre["crop_size"] == 64


def test_resumable_keys_documented():
  """The allow-list lives in config_check.RESUMABLE_KEYS and is documented, key by key, in
  docs/training.md."""
  page = (REPO / "docs" / "training.md").read_text()
  for key in config_check.RESUMABLE_KEYS:
    assert f"`{key}`" in page, key


# ----------------------------------------------------------------------------- preflight
def test_workdir_that_is_a_file(tfds_dir, tmp_path):
  target = tmp_path / "afile"
  target.write_text("not a directory")
  proc = run_main(*smoke_args(target, tfds_dir))
  _one_line_error(proc, str(target), "not a directory")


@contextlib.contextmanager
def _read_only(path: pathlib.Path):
  """`path` made read-only: chmod for a normal user; a read-only bind mount as root (root
  ignores permission bits). Skips when neither is possible."""
  if os.geteuid() != 0:
    mode = path.stat().st_mode
    path.chmod(0o555)
    try:
      yield
    finally:
      path.chmod(mode)
    return
  bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
  if bind.returncode != 0:
    pytest.skip(f"root, but no bind mount here: {bind.stderr.decode().strip()}")
  try:
    ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True)
    if ro.returncode != 0:
      pytest.skip(f"cannot remount read-only: {ro.stderr.decode().strip()}")
    yield
  finally:
    subprocess.run(["umount", str(path)], check=True)


def test_read_only_workdir(tfds_dir, tmp_path):
  workdir = tmp_path / "ro"
  workdir.mkdir()
  with _read_only(workdir):
    proc = run_main(*smoke_args(workdir, tfds_dir))
  _one_line_error(proc, str(workdir), "cannot create or write")


def test_evaluate_on_read_only_workdir_exits_2(smoke_run, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  with _read_only(workdir):
    proc = run_eval(f"--workdir={workdir}", "--task=retrieval")
  _one_line_error(proc, str(workdir / "eval"), "--out")


def test_batch_larger_than_train_split(smoke_run, tfds_dir, tmp_path):
  proc = run_main(*smoke_args(tmp_path / "w", tfds_dir, "--config.batch_size=512"))
  _one_line_error(proc, "config.batch_size=512", "261 examples", "allow_repeats")
  assert not (tmp_path / "w" / "config.json").exists()  # refused before config.json


@pytest.mark.slow  # a CLI run that trains; the in-process tests cover the default suite
def test_batch_larger_than_split_allowed_explicitly(smoke_run, tfds_dir):
  from configs import convirt

  cfg = convirt.get_config("smoke")
  cfg.data.data_dir = str(tfds_dir)
  cfg.batch_size = 512
  with pytest.raises(ConfigError, match="261 examples"):
    config_check.check_batch_fits(cfg)
  cfg.data.allow_repeats = True
  config_check.check_batch_fits(cfg)


def _mount_tmpfs(path: pathlib.Path, size: str) -> None:
  path.mkdir(parents=True, exist_ok=True)
  proc = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
  )
  if proc.returncode != 0:
    pytest.skip(f"no tmpfs mount here ({proc.stderr.decode().strip() or 'not root'})")


def test_too_little_disk_for_two_checkpoints(tfds_dir, tmp_path):
  workdir = tmp_path / "small"
  _mount_tmpfs(workdir, "4m")
  try:
    proc = run_main(*smoke_args(workdir, tfds_dir))
  finally:
    subprocess.run(["umount", str(workdir)], check=True)
  _one_line_error(proc, str(workdir), "free, but 2 checkpoints of this model need")


# ----------------------------------------------------------------------------- disk full
@pytest.mark.slow  # ~30 s: a smoke run to step 15-20
def test_disk_full_during_save_stops_cleanly(smoke_run, tfds_dir, tmp_path):
  """Checkpoints on a 15 MB tmpfs (a checkpoint is ~5.7 MB): steps 5 and 10 fit, step 15's
  save fails mid-write. The run stops (exit 2, one line naming step 15, its path and the last
  good step 10) instead of training on, and step 10 restores."""
  workdir = tmp_path / "full"
  ckpts = workdir / "checkpoints"
  _mount_tmpfs(ckpts, "15m")
  try:
    proc = run_main(*smoke_args(workdir, tfds_dir, "--config.checkpoint_every=5"))
    kept = tmp_path / "kept"
    shutil.copytree(ckpts, kept / "checkpoints", ignore=shutil.ignore_patterns("*tmp*"))
  finally:
    subprocess.run(["umount", str(ckpts)], check=True)
  line = _one_line_error(
    proc,
    "saving checkpoint 15",
    str(ckpts / "15"),
    "no space left",
    "last good checkpoint is step 10",
  )
  trained = [
    int(l.split("step ")[1].split("/")[0]) for l in proc.stderr.splitlines() if "/30 | loss" in l
  ]
  assert max(trained) < 30, line  # training did not go on to the end after the failed save
  mngr = checkpoint.manager(kept, read_only=True)
  assert sorted(mngr.all_steps()) == [5, 10]
  restored = mngr.restore(10)
  assert int(restored["state"]["step"]) == 10
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored["state"]["params"]))


# ----------------------------------------------------------------------------- damaged checkpoints
def _abstract_state(mngr, step):
  """The restore target from a good checkpoint's own metadata (shapes, dtypes), one device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = mngr.item_metadata(step)["state"]
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)


@pytest.mark.parametrize("kind", list(damage.DAMAGES))
def test_damaged_newest_checkpoint_falls_back(smoke_run, tmp_path, kind, caplog):
  workdir = _copy_run(smoke_run, tmp_path)
  fn, cause = damage.DAMAGES[kind]
  fn(workdir / "checkpoints" / "30")
  mngr = checkpoint.manager(workdir, keep=2)
  target = _abstract_state(mngr, 20)
  with caplog.at_level("WARNING"):
    step, state, data_state = checkpoint.restore_newest_good(mngr, target, workdir)
  assert step == 20 and data_state["batches_consumed"] == 20 and int(state["step"]) == 20
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and "step 30" in warnings[0] and cause in warnings[0], warnings
  # Set aside (not deleted), so a resumed run can save step 30 again.
  assert sorted(mngr.all_steps()) == [20]
  assert [p.name.split("-")[0] for p in (workdir / checkpoint.DAMAGED_DIR).iterdir()] == ["30"]
  mngr.close()


@pytest.mark.slow  # a CLI run that trains; the in-process tests cover the default suite
def test_damaged_checkpoint_resume_through_the_cli(smoke_run, tfds_dir, tmp_path):
  """The whole path: one warning, resume from step 20, train to 32, config.json updated with
  the new total_steps (a key that may change on resume)."""
  workdir = _copy_run(smoke_run, tmp_path)
  damage.truncate_arrays(workdir / "checkpoints" / "30")
  proc = run_main(*smoke_args(workdir, tfds_dir, "--config.total_steps=32"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  damaged = [l for l in proc.stderr.splitlines() if "is damaged" in l]
  assert len(damaged) == 1 and "checkpoint step 30" in damaged[0], damaged
  assert "resumed from checkpoint step 20" in proc.stderr
  assert sorted(checkpoint.manager(workdir, read_only=True).all_steps())[-1] == 32
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 32


def test_no_good_checkpoint_is_an_error_not_a_fresh_start(smoke_run, tfds_dir, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  damage.empty_step_dir(workdir / "checkpoints" / "30")
  damage.missing_data_item(workdir / "checkpoints" / "20")
  proc = run_main(*smoke_args(workdir, tfds_dir))
  _one_line_error(proc, "no usable checkpoint", "step 30", "step 20", "--restart_from_scratch")
  assert "step 1/30" not in proc.stderr  # no silent fresh start
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "30"]
  assert not (workdir / "LEASE.json").exists()  # the workdir's lease released on the error


@pytest.mark.slow  # a fresh 2-step run (~30 s)
def test_restart_from_scratch_sets_the_old_run_aside(smoke_run, tfds_dir, tmp_path):
  """The old run is set aside (nothing deleted) and a new one starts, also with a config the
  old run would refuse (another seed)."""
  workdir = _copy_run(smoke_run, tmp_path)
  proc = run_main(
    *smoke_args(
      workdir,
      tfds_dir,
      "--restart_from_scratch",
      "--config.seed=3",
      "--config.total_steps=2",
      "--config.checkpoint_every=2",
      "--config.eval_every=2",
    )
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (aside,) = workdir.glob("discarded-*")
  assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["20", "30"]
  assert sorted(checkpoint.manager(workdir, read_only=True).all_steps()) == [2]
  assert json.loads((workdir / "config.json").read_text())["seed"] == 3


def test_no_checkpoint_error_in_process(tmp_path):
  """Every step damaged: CheckpointError naming each step and its cause (what the CLI prints)."""
  mngr = checkpoint.manager(tmp_path, keep=2)
  state = {"w": jax.numpy.ones((2,)), "step": jax.numpy.asarray(7)}
  checkpoint.save(mngr, 7, state, {"batches_consumed": 7, "seed": 0})
  mngr.wait_until_finished()
  shutil.rmtree(tmp_path / "checkpoints" / "7" / "data")
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  with pytest.raises(
    CheckpointError, match=r"no usable checkpoint .*step 7: item 'data' is missing"
  ):
    checkpoint.restore_newest_good(mngr, target, tmp_path)


# ----------------------------------------------------------------------------- stray asyncio noise
def test_closed_event_loop_noise_is_dropped_other_errors_are_not():
  """TensorStore callbacks that outlive a failed Orbax save or restore report
  RuntimeError('Event loop is closed') through sys.excepthook; the CLIs drop exactly that."""
  code = (
    "import sys\n"
    "from medvl_jax import cli\n"
    "cli.quiet_closed_loop_errors()\n"
    "sys.excepthook(RuntimeError, RuntimeError('Event loop is closed'), None)\n"
    "sys.excepthook(RuntimeError, RuntimeError('something else'), None)\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert proc.returncode == 0, proc.stderr
  assert "Event loop is closed" not in proc.stderr and "something else" in proc.stderr


def test_unretrieved_ocdbt_write_futures_are_dropped_other_futures_are_not():
  """After a save fails on a full disk, asyncio logs "Future exception was never retrieved"
  for the save's other TensorStore chunk writes when they are collected, after our one error
  line (seen in CI); the CLIs drop exactly those. Real asyncio futures, real log handler."""
  code = (
    "import asyncio, gc, logging\n"
    "from medvl_jax import cli\n"
    "logging.basicConfig()\n"
    "cli.quiet_closed_loop_errors()\n"
    "loop = asyncio.new_event_loop()\n"
    "for text in ['RESOURCE_EXHAUSTED: Error writing \"state.bn.var/0\" in OCDBT database at '\n"
    "             'local file \"/ckpt/15.orbax-checkpoint-tmp/state/\": No space left on device',\n"
    "             'something else']:\n"
    "  f = loop.create_future()\n"
    "  f.set_exception(ValueError(text))\n"
    "  del f\n"
    "  gc.collect()\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert proc.returncode == 0, proc.stderr
  assert "OCDBT" not in proc.stderr, proc.stderr
  assert "Future exception was never retrieved" in proc.stderr, proc.stderr
  assert "something else" in proc.stderr, proc.stderr
