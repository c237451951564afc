"""Shared test set-up: persistent XLA compilation cache, sample-data location."""

import os
import pathlib
import sys
import time

import pytest

# libtriton (loaded by torchvision and transformers through torch._dynamo) segfaults when it is
# loaded after TensorFlow in one process, as in a full test run where the input-pipeline tests
# come first. The CPU tests need no triton: make its import fail cleanly; torch carries on.
sys.modules.setdefault("triton", None)

REPO = pathlib.Path(__file__).resolve().parents[1]
# A persistent compilation cache cuts compile time of repeated tiny models across tests and
# subprocesses; subprocess tests inherit it through the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs on CPU devices; with libtpu installed (test extra, for the compile-only TPU
# tests) JAX would otherwise try, and loudly fail, to start a TPU on every backend start-up.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


_SESSION_START = time.monotonic()


def pytest_addoption(parser):
  parser.addoption(
    "--time-budget",
    type=float,
    default=0.0,
    help="Seconds after which the tests not yet started are skipped (reported as skipped, "
    "reason 'time budget'); 0 = no budget. .ci/run sets it for the slow marker from the time "
    "left of CI's 90 minutes.",
  )


@pytest.fixture(autouse=True)
def _absl_verbosity_as_it_was():
  """A CLI run in-process (evaluate and export log at ERROR) or a flags parse sets absl's
  verbosity, and with it the absl logger's level, for the whole process; restore both so that
  a later test's caplog sees the INFO lines it checks."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  logger = absl_logging.get_absl_logger()
  saved_verbosity, saved_level = absl_logging.get_verbosity(), logger.level
  yield
  absl_logging.set_verbosity(saved_verbosity)  # first: it sets the logger's level too
  logger.setLevel(saved_level)


def pytest_runtest_setup(item):
  budget = item.config.getoption("--time-budget")
  if budget and time.monotonic() - _SESSION_START > budget:
    pytest.skip(f"time budget of {budget:.0f} s spent (pytest --time-budget)")


def sample_dir() -> pathlib.Path:
  env = os.environ.get("MEDVL_SAMPLE_DIR")
  return pathlib.Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_data_dir() -> pathlib.Path:
  d = sample_dir()
  if not (d / "covid_cxr_notes" / "pairs.csv").exists():
    pytest.fail(f"sample data not found at {d} (set MEDVL_SAMPLE_DIR)")
  return d


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 300, **kw):
  """Runs the real CLI `python -m module args` from the repo root; `env` adds to os.environ."""
  import subprocess

  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=dict(os.environ, **(env or {})),
    capture_output=True,
    text=True,
    timeout=timeout,
    **kw,
  )


def run_main(*args: str, **kw):
  """`python -m medvl_jax.main ...` (run_module's keywords)."""
  return run_module("medvl_jax.main", *args, **kw)


def run_prepare(*args: str, timeout: int = 600, **kw):
  """`python -m data_pipelines.prepare ...` (run_module's keywords)."""
  return run_module("data_pipelines.prepare", *args, timeout=timeout, **kw)


def run_export(*args: str, **kw):
  """`python -m medvl_jax.export ...` (run_module's keywords)."""
  return run_module("medvl_jax.export", *args, **kw)


def run_eval(*args: str, **kw):
  """`python -m medvl_jax.evaluate ...` (run_module's keywords)."""
  return run_module("medvl_jax.evaluate", *args, **kw)


def run_two_hosts(
  args, logs: pathlib.Path, devices_per_process: int = 1, timeout: int = 600
) -> str:
  """`launch/local_multihost.sh 2 args`: two processes of the main job joined with gloo, each
  with `devices_per_process` CPU devices, logging into `logs`; asserts both ended with status 0
  (showing their logs) and returns process 0's log."""
  import subprocess

  logs.mkdir(exist_ok=True)
  env = dict(os.environ, LOG_DIR=str(logs), PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)
  if devices_per_process > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  proc = subprocess.run(
    ["bash", "launch/local_multihost.sh", "2", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, "\n".join(
    f.read_text()[-4000:] for f in sorted(logs.glob("process_*.log"))
  )
  return (logs / "process_0.log").read_text()


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """One tfds data dir per test session; the sample is built into it on first use."""
  return tmp_path_factory.mktemp("tfds")


def read_scalars(logdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """All scalars of the TensorBoard event files under `logdir`: tag -> step -> value.

  Files are read oldest first, so a resumed run's values replace the killed run's.
  """
  import tensorflow as tf

  out: dict[str, dict[int, float]] = {}
  files = sorted(logdir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
  for f in files:
    for rec in tf.data.TFRecordDataset(str(f)):
      event = tf.compat.v1.Event.FromString(rec.numpy())
      for v in event.summary.value:
        if v.HasField("tensor"):
          val = tf.make_ndarray(v.tensor)
          if val.shape == ():
            out.setdefault(v.tag, {})[event.step] = float(val)
        elif v.HasField("simple_value"):
          out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


SMOKE = "configs/convirt.py:smoke"


def smoke_args(workdir, tfds_dir, *extra):
  return (f"--config={SMOKE}", f"--workdir={workdir}", f"--config.data.data_dir={tfds_dir}", *extra)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, tfds_dir, sample_data_dir):
  workdir = tmp_path_factory.mktemp("smoke")
  proc = run_main(*smoke_args(workdir, tfds_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


SHORT_STEPS = 3


@pytest.fixture(scope="session")
def short_run(tmp_path_factory, tfds_dir, sample_data_dir) -> pathlib.Path:
  """A 3-step smoke training run with a checkpoint at step 3, shared read-only by the export
  and evaluation tests (they write their outputs elsewhere)."""
  workdir = tmp_path_factory.mktemp("short_run")
  proc = run_main(
    *smoke_args(
      workdir,
      tfds_dir,
      f"--config.total_steps={SHORT_STEPS}",
      f"--config.checkpoint_every={SHORT_STEPS}",
      f"--config.eval_every={SHORT_STEPS}",
    )
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


MIXED_SMOKE = "configs/mixed.py:smoke"


def mixed_args(workdir, tfds_dir, *extra):
  return (
    f"--config={MIXED_SMOKE}",
    f"--workdir={workdir}",
    f"--config.data.data_dir={tfds_dir}",
    *extra,
  )


@pytest.fixture(scope="session")
def mixed_smoke_run(tmp_path_factory, tfds_dir, sample_data_dir):
  """The mixed family's 40-step smoke run on the three-source sample (checkpoints at 10, 20,
  30, 40), shared read-only by the trainer, regeneration and export tests."""
  workdir = tmp_path_factory.mktemp("mixed_smoke")
  proc = run_main(*mixed_args(workdir, tfds_dir), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc
