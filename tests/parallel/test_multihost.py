"""Two processes (hosts) with CPU gloo collectives train exactly as one: the global batch, the
loss and the update do not depend on how many hosts share the work."""

import os
import subprocess
import sys

import numpy as np

from tests.conftest import REPO, read_scalars, smoke_args


def test_two_processes_match_one(smoke_run, tfds_dir, tmp_path):
  reference = read_scalars(smoke_run[0] / "tensorboard")["train_loss"]
  workdir, logs = tmp_path / "two_hosts", tmp_path / "logs"
  logs.mkdir()
  args = smoke_args(
    workdir,
    tfds_dir,
    "--config.total_steps=6",
    "--config.eval_every=3",
    "--config.checkpoint_every=3",
  )
  env = dict(os.environ, LOG_DIR=str(logs), PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    ["bash", "launch/local_multihost.sh", "2", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, "\n".join(
    f.read_text()[-4000:] for f in sorted(logs.glob("process_*.log"))
  )
  log0 = (logs / "process_0.log").read_text()
  assert "mesh: 2 devices (cpu) over 2 processes" in log0
  losses = read_scalars(workdir / "tensorboard")["train_loss"]
  assert sorted(losses) == list(range(1, 7))
  for step in range(1, 7):
    # Same global batch and program split over 2 hosts: float32 reduction-order noise only.
    np.testing.assert_allclose(losses[step], reference[step], rtol=1e-5, err_msg=f"step {step}")
  assert (workdir / "checkpoints" / "6").is_dir()
