"""Every command-line tool through its real entry point: `--help` exits 0 and lists the tool's
flags; a mistyped config key is one line with the full dotted key and the closest existing one;
and the console of a smoke run, its evaluation and its export holds medvl_jax's own lines only
(no library start-up chatter: libtpu's probe on a host without a TPU chip, transformers'
'PyTorch was not found', tfds's progress bars)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_main, smoke_args

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
  (["-m", "medvl_jax.parallel.distributed"], ["--help"]),
  (["-m", "experiments.study"], ["--out", "--size", "--quick", "--arms", "--check", "--publish"]),
  (["-m", "experiments.sweep"], ["--out", "--steps"]),
  (["-m", "experiments.by_step"], ["--out", "--run"]),
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
    "error: cxr_sample: no config 'pairedd'; base configs: image_only, nih_halves, paired, "
    "text_only"
  ], proc.stderr


# ----------------------------------------------------------------------------- console
_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ (?P<file>[^ :]+\.py):\d+\] ")
# Basenames of medvl_jax's modules and of the sample's dataset builder it prepares: absl's
# prefix names the file only.
_OURS = {p.name for p in (REPO / "medvl_jax").rglob("*.py")} | {"cxr_sample_dataset_builder.py"}


def _not_ours(stderr: str) -> list[str]:
  out = []
  for line in stderr.splitlines():
    m = _ABSL_PREFIX.match(line)
    if not (line.startswith("error: ") or (m and m.group("file") in _OURS)):
      out.append(line)
  return out


def _console_env() -> dict[str, str]:
  """JAX picks its backends itself, as on a user's machine (libtpu is installed with the test
  extra; this host has no TPU chip)."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("JAX_PLATFORMS", None)
  return env


# `python -m medvl_jax.main` as on a machine without torch (the README's main command installs
# none): the import system finds no `torch`, so transformers, imported for the tokenizer, finds
# none either.
_MAIN_WITHOUT_TORCH = """
import importlib.machinery, runpy, sys

class NoTorch(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.partition(".")[0] == "torch":
      return None
    return importlib.machinery.PathFinder.find_spec(name, path, target)

sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv[0] = "medvl_jax.main"
runpy.run_module("medvl_jax.main", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def console_run(tmp_path_factory, sample_data_dir):
  """A 2-step smoke run from a fresh data dir (the sample is prepared in it)."""
  tmp = tmp_path_factory.mktemp("console")
  workdir, tfds = tmp / "run", tmp / "tfds"
  args = smoke_args(
    workdir,
    tfds,
    "--config.total_steps=2",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
  )
  proc = _run(["-c", _MAIN_WITHOUT_TORCH, *args], env=_console_env(), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_training_console_is_ours_only(console_run):
  _, proc = console_run
  assert "step 2/2" in proc.stderr and "Preparing cxr_sample/paired" in proc.stderr
  assert _not_ours(proc.stderr) == []


@pytest.mark.slow  # an evaluation process: ~20 s
def test_evaluation_console_is_ours_only(console_run, tmp_path):
  workdir, _ = console_run
  out = tmp_path / "lp"
  args = ["--task=linear_probe", f"--out={out}", "--cfg=n_boot=20", "--cfg=seeds=(0,)"]
  proc = _run(["-m", "medvl_jax.evaluate", f"--workdir={workdir}", *args], env=_console_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / "metrics.json").is_file()
  assert _not_ours(proc.stderr) == []


def test_export_console_is_ours_only(console_run, tmp_path):
  workdir, _ = console_run
  out = tmp_path / "exported"
  proc = _run(
    ["-m", "medvl_jax.export", f"--workdir={workdir}", f"--out={out}"], env=_console_env()
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert pathlib.Path(out / "export.json").is_file()
  assert _not_ours(proc.stderr) == []
