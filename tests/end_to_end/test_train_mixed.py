"""The mixed-data family through the one trainer, on the real three-source sample (paired
covid_cxr_notes + image-only nih14_sample + text-only iu_reports): each loss falls and is logged
under its own name, checkpoints resume exactly after SIGKILL, and 2 hosts train as 1."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, mixed_args, read_scalars, run_main, run_two_hosts

STEPS = 40  # configs/mixed.py:smoke


@pytest.fixture(scope="session")
def mixed_run(mixed_smoke_run):
  return mixed_smoke_run


@pytest.mark.slow  # the mixed smoke run: ~2 min of compiles on 2 cores
def test_each_loss_falls_and_is_logged_under_its_name(mixed_run):
  workdir, proc = mixed_run
  scalars = read_scalars(workdir / "tensorboard")
  for name in ("train_loss", "train_mlm", "train_mvm", "train_contrastive"):
    values = scalars[name]
    assert sorted(values) == list(range(1, STEPS + 1)), name
    first = np.mean([values[s] for s in range(1, 6)])
    last = np.mean([values[s] for s in range(STEPS - 4, STEPS + 1)])
    assert last < first, (name, first, last)
  # Per-scale MVM and validation metrics under their own names too.
  for name in (
    "train_mvm_1x1",
    "train_mvm_2x2",
    "train_mvm_4x4",
    "val_loss",
    "val_mlm",
    "val_mvm",
    "val_contrastive",
  ):
    assert name in scalars, name
  # All three kinds reached the loss: pairs counted, masked tokens and patches present.
  assert min(scalars["train_pairs"].values()) >= 1
  assert min(scalars["train_mlm_tokens"].values()) > 0
  assert min(scalars["train_mvm_patches"].values()) > 0
  assert "validation loss" in proc.stderr and "| mlm " in proc.stderr


@pytest.mark.slow  # kill + resume of the mixed smoke run: ~1 min
def test_resume_after_sigkill_matches_uninterrupted(mixed_run, tfds_dir, tmp_path):
  reference = read_scalars(mixed_run[0] / "tensorboard")["train_loss"]
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "medvl_jax.main", *mixed_args(workdir, tfds_dir)]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  first_ckpt = workdir / "checkpoints" / "10"
  deadline = time.time() + 300
  while not first_ckpt.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert first_ckpt.exists(), "no checkpoint appeared"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = run_main(*mixed_args(workdir, tfds_dir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  start = int(resumed.stderr.split("resumed from checkpoint step ")[1].split()[0])
  assert start >= 10
  losses = read_scalars(workdir / "tensorboard")["train_loss"]
  for step in range(start + 1, STEPS + 1):
    np.testing.assert_allclose(losses[step], reference[step], rtol=1e-6, err_msg=f"step {step}")


@pytest.mark.slow  # 2 processes (gloo) + 1: ~2 min
def test_two_processes_match_one(mixed_run, tfds_dir, tmp_path):
  reference = read_scalars(mixed_run[0] / "tensorboard")["train_loss"]
  workdir = tmp_path / "two_hosts"
  args = mixed_args(
    workdir,
    tfds_dir,
    "--config.total_steps=4",
    "--config.eval_every=4",
    "--config.checkpoint_every=4",
  )
  run_two_hosts(args, tmp_path / "logs", timeout=400)
  losses = read_scalars(workdir / "tensorboard")["train_loss"]
  assert sorted(losses) == list(range(1, 5))
  for step in range(1, 5):
    np.testing.assert_allclose(losses[step], reference[step], rtol=1e-5, err_msg=f"step {step}")


@pytest.mark.slow  # a fresh data dir (the sample built) and a 2-step mixed run: 1-4 min
def test_image_source_on_the_nih_pretrain_half(tmp_path):
  """The study's NIH image source: `nih_halves`/`pretrain` in place of `image_only`/`train`,
  built on first use with the random-access copies of both halves."""
  import json

  halves = dict(name="cxr_sample", builder_config="nih_halves", split="pretrain", kind="image")
  sources = (
    dict(name="cxr_sample", builder_config="paired", split="train", kind="paired", weight=0.5),
    dict(halves, weight=0.25),
    dict(name="cxr_sample", builder_config="text_only", split="train", kind="text", weight=0.25),
  )
  workdir, data_dir = tmp_path / "w", tmp_path / "tfds"
  proc = run_main(
    *mixed_args(
      workdir,
      data_dir,
      "--config.total_steps=2",
      "--config.eval_every=2",
      "--config.checkpoint_every=2",
      f"--config.data.sources={sources!r}",
    )
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((workdir / "config.json").read_text())
  assert dict(halves, weight=0.25) in config["data"]["sources"]
  copies = data_dir / "cxr_sample" / "nih_halves"
  assert sorted(p.name for p in copies.glob("*/random_access/*")) == [
    "pretrain.array_record",
    "probe.array_record",
  ]
  assert not (data_dir / "cxr_sample" / "image_only").exists()
  losses = read_scalars(workdir / "tensorboard")
  assert sorted(losses["train_mvm"]) == [1, 2]
  assert all(np.isfinite(v) for v in losses["train_loss"].values())


def test_family_config_mismatch_is_one_line(tmp_path, tfds_dir):
  proc = run_main(*mixed_args(tmp_path / "w", tfds_dir, "--config.loss.name=infonce"))
  assert proc.returncode == 2
  last = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1]
  assert "config.loss.name='infonce' does not fit config.model.name='mixed'" in last, last
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "config.json").exists()


@pytest.mark.slow  # the mixed smoke run and 4 evaluator processes
@pytest.mark.parametrize("task", ["retrieval", "linear_probe", "zeroshot", "finetune"])
def test_evaluators_run_on_a_mixed_checkpoint(mixed_run, tmp_path, task):
  """The evaluators reach the mixed model through the family's encoders, as for ConVIRT."""
  import json

  from tests.conftest import run_eval

  workdir, _ = mixed_run
  out = tmp_path / task
  proc = run_eval(f"--workdir={workdir}", f"--task={task}", "--cfg=n_boot=20", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "metrics.json").read_text())
  assert result["step"] == STEPS and result["task"] == task
  values = [v for v in result["metrics"].values() if v is not None]
  assert values and all(np.isfinite(v) for v in values)
