"""The in-training hook: `config.evaluators` metrics land in TensorBoard and equal the CLI's."""

import json
import subprocess
import sys

import pytest

from configs import convirt
from medvl_jax.train import loop
from tests.conftest import REPO, read_scalars


@pytest.mark.slow
def test_training_hook_matches_cli(tmp_path, tfds_dir, sample_data_dir):
  config = convirt.get_config("smoke")
  config.data.data_dir = str(tfds_dir)
  config.total_steps = config.eval_every = config.checkpoint_every = 2
  config.evaluators = [{"name": "retrieval", "n_boot": 50}]
  workdir = tmp_path / "run"
  result = loop.train_and_evaluate(config, str(workdir))
  assert "retrieval/t2i_R@5" in result
  logged = read_scalars(workdir / "tensorboard")
  assert logged["retrieval/t2i_R@5"][2] == pytest.approx(result["retrieval/t2i_R@5"])

  out = tmp_path / "cli"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "medvl_jax.evaluate",
      f"--workdir={workdir}",
      "--task=retrieval",
      f"--out={out}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  cli = json.loads((out / "metrics.json").read_text())
  assert cli["cfg"] == {"n_boot": 50}  # Taken from the run's config.evaluators.
  for name, value in cli["metrics"].items():
    assert result[name] == pytest.approx(value, abs=1e-5), name
