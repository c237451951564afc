"""Every command-line tool through its real entry point: `--help` exits 0 and lists the tool's
flags; a mistyped config key is one line with the full dotted key and the closest existing
one."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_main

# (command, flags its --help must list)
CLIS = [
  (["-m", "medvl_jax.main"], ["--config", "--workdir", "--restart_from_scratch", "--compile_only"]),
  (["-m", "medvl_jax.evaluate"], ["--workdir", "--task", "--step", "--out", "--cfg", "--compare"]),
  (
    ["-m", "medvl_jax.export"],
    ["--workdir", "--out", "--step", "--overwrite", "--allow_nonfinite"],
  ),
  (
    ["-m", "data_pipelines.prepare"],
    ["--manual_dir", "--data_dir", "--image_size", "--config", "--num_workers", "--rebuild"],
  ),
  (["-m", "experiments.study"], ["--out", "--quick", "--arms", "--publish"]),
  (["bench/fingerprint.py"], ["--data_dir", "--config"]),
  (["bench/prepare.py"], ["--num_workers", "--image_size"]),
  (["bench/linear_probe.py"], ["--ref_fits", "--threads"]),
]


def _run(args: list[str], env: dict | None = None, timeout: int = 300):
  return subprocess.run(
    [sys.executable, *args],
    cwd=REPO,
    env=env or dict(os.environ, PYTHONPATH=str(REPO)),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize("command,flags", CLIS, ids=[" ".join(c) for c, _ in CLIS])
def test_help_exits_0_and_lists_the_flags(command, flags):
  proc = _run([*command, "--help"])
  assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
  listed = {
    name
    for line in proc.stdout.splitlines()
    if line.lstrip().startswith("-")
    for name in re.findall(r"--(?:\[no\])?(\w+)", line)
  }
  assert [f for f in flags if f.lstrip("-") not in listed] == [], proc.stdout


def test_short_help_too():
  proc = _run(["-m", "medvl_jax.export", "-h"])
  assert proc.returncode == 0 and "--[no]overwrite" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize(
  "override,message",
  [
    (
      "--config.batch_sizee=3",
      "config key 'batch_sizee' does not exist; did you mean 'batch_size'?",
    ),
    (
      "--config.optimizer.lrr=0.1",
      "config key 'optimizer.lrr' does not exist; did you mean 'optimizer.lr'?",
    ),
  ],
)
def test_config_key_typo_is_one_line_with_the_full_key(tmp_path, override, message):
  proc = run_main("--config=configs/convirt.py:smoke", f"--workdir={tmp_path}", override)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.splitlines() == [f"error: {message} (overrides given: {override})"], (
    proc.stderr
  )
  assert list(tmp_path.iterdir()) == []


def test_prepare_reads_its_own_config_flag(tmp_path, sample_data_dir):
  """data_pipelines.prepare's --config (a builder config name) is its own, not main's."""
  proc = _run(
    [
      "-m",
      "data_pipelines.prepare",
      "cxr_sample",
      f"--manual_dir={sample_data_dir}",
      f"--data_dir={tmp_path}",
      "--config=pairedd",
    ]
  )
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
    "error: cxr_sample: no config 'pairedd'; base configs: image_only, paired, text_only"
  ], proc.stderr
