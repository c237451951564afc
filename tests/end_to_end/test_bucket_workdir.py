"""A run whose workdir is a gs:// URL, through the real CLIs against a real GCS emulator.

fake-gcs-server (tests/conftest_gcs.py) serves the bucket; each CLI subprocess gets
STORAGE_EMULATOR_HOST as its only storage setting. The bucket run is the smoke config of the
local `smoke_run`, so what it leaves in the bucket (checkpoints, TensorBoard scalars, exports)
must equal the local run's. The data dir stays local here; a data dir in a bucket is
tests/data/test_bucket_data_dir.py's.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types

import jax
import numpy as np
import pytest

from medvl_jax import paths
from medvl_jax.errors import StorageError
from tests.conftest import REPO, read_scalars, smoke_args

pytest_plugins = ("tests.conftest_gcs",)


def child_env(emulator: str) -> dict[str, str]:
  from tests import conftest_gcs  # imported once pytest loaded it as a plugin (assert rewriting)

  return conftest_gcs.child_env(emulator)


def new_bucket(emulator: str) -> str:
  from tests import conftest_gcs

  return conftest_gcs.new_bucket(emulator)


TIMING_TAGS = ("sec_per_step",)  # wall-clock figures, different in every run


def run_cli(module: str, *args: str, emulator: str | None, timeout: int = 600):
  """`python -m module args` from the repo root; `emulator`: its STORAGE_EMULATOR_HOST."""
  env = dict(child_env(emulator) if emulator else os.environ, PYTHONPATH=str(REPO))
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def one_line_error(proc, *needles) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
  assert last.startswith("error: "), proc.stderr[-3000:]
  for needle in needles:
    assert needle in last, f"{needle!r} not in {last!r}"
  return last


@pytest.fixture(scope="session")
def bucket_run(gcs_emulator, tfds_dir, sample_data_dir):
  """The smoke run (30 steps, checkpoints at 10, 20, 30) with --workdir=gs://BUCKET/run."""
  workdir = new_bucket(gcs_emulator) + "/run"
  proc = run_cli("medvl_jax.main", *smoke_args(workdir, tfds_dir), emulator=gcs_emulator)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return types.SimpleNamespace(workdir=workdir, proc=proc, emulator=gcs_emulator)


def bucket_scalars(logdir: str, local: pathlib.Path) -> dict[str, dict[int, float]]:
  """read_scalars of the event files under the URL `logdir`, copied to `local` first."""
  for rel in paths.files(logdir):
    (local / rel).parent.mkdir(parents=True, exist_ok=True)
    paths.copy(paths.join(logdir, rel), local / rel)
  return read_scalars(local)


def assert_same_checkpoint(workdir_a, workdir_b, step: int) -> None:
  """Every array of checkpoint `step` bit-identical, and the same data item."""
  from medvl_jax.ckpt import checkpoint

  a = checkpoint.manager(workdir_a, read_only=True).restore(step)
  b = checkpoint.manager(workdir_b, read_only=True).restore(step)
  assert a["data"] == b["data"]
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a["state"])
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b["state"])
  assert tree_a == tree_b and len(flat_a) > 10
  for (key, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(key))


def without_timing(scalars: dict) -> dict:
  return {tag: v for tag, v in scalars.items() if tag not in TIMING_TAGS}


# ----------------------------------------------------------------------------- training
def test_bucket_run_equals_the_local_run(bucket_run, smoke_run, gcs_env, tmp_path):
  """Checkpoints committed with Orbax's marker, the old ones pruned, the last one and the
  TensorBoard scalars equal to the local run's; config.json written."""
  from medvl_jax.ckpt import checkpoint

  workdir = bucket_run.workdir
  assert "run already complete" not in bucket_run.proc.stderr
  assert checkpoint.committed_steps(paths.join(workdir, "checkpoints")) == [20, 30]
  assert paths.exists(paths.join(workdir, "checkpoints", "30", "commit_success.txt"))
  assert json.loads(paths.read_text(paths.join(workdir, "config.json")))["total_steps"] == 30
  assert_same_checkpoint(workdir, smoke_run[0], 30)

  local = read_scalars(smoke_run[0] / "tensorboard")
  remote = bucket_scalars(paths.join(workdir, "tensorboard"), tmp_path)
  assert sorted(remote["train_loss"]) == list(range(1, 31))
  assert without_timing(remote) == without_timing(local)


def test_rerun_of_the_finished_run_reports_it_complete(bucket_run, tfds_dir):
  proc = run_cli(
    "medvl_jax.main", *smoke_args(bucket_run.workdir, tfds_dir), emulator=bucket_run.emulator
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "run already complete at step 30" in proc.stderr
  assert "compiled the train step" not in proc.stderr


@pytest.mark.slow  # a second bucket run, killed after its first checkpoint and resumed: ~2-3 min
def test_kill_and_resume_in_the_bucket_equals_the_local_run(smoke_run, gcs_env, tfds_dir, tmp_path):
  workdir = new_bucket(gcs_env) + "/killed"
  env = dict(child_env(gcs_env), PYTHONPATH=str(REPO))
  cmd = [sys.executable, "-m", "medvl_jax.main", *smoke_args(workdir, tfds_dir)]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  committed = paths.join(workdir, "checkpoints", "10", "commit_success.txt")
  deadline = time.time() + 300
  try:
    while not paths.exists(committed) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert paths.exists(committed), "no checkpoint appeared"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL

  resumed = run_cli("medvl_jax.main", *smoke_args(workdir, tfds_dir), emulator=gcs_env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint step" in resumed.stderr
  assert int(resumed.stderr.split("resumed from checkpoint step ")[1].split()[0]) >= 10
  assert_same_checkpoint(workdir, smoke_run[0], 30)
  remote = bucket_scalars(paths.join(workdir, "tensorboard"), tmp_path)
  local = read_scalars(smoke_run[0] / "tensorboard")
  assert remote["train_loss"] == local["train_loss"] and remote["val_loss"] == local["val_loss"]


# ----------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def local_export(smoke_run, tmp_path_factory) -> pathlib.Path:
  """The local run's export: the reference of the bucket run's."""
  out = tmp_path_factory.mktemp("exports") / "local"
  proc = run_cli("medvl_jax.export", f"--workdir={smoke_run[0]}", f"--out={out}", emulator=None)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


@pytest.mark.slow  # two export processes against the emulator: ~20 s
def test_export_from_the_bucket_to_local_disk_and_to_the_bucket(
  bucket_run, local_export, gcs_env, tmp_path
):
  from safetensors.numpy import load_file

  torch = pytest.importorskip("torch", reason="the export is loaded in torchvision")
  from tests.interop.test_export import tiny_torchvision_resnet

  out = tmp_path / "exported"
  proc = run_cli(
    "medvl_jax.export", f"--workdir={bucket_run.workdir}", f"--out={out}", emulator=gcs_env
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"exported step 30 of {bucket_run.workdir} to {out}" in proc.stdout
  meta = json.loads((out / "export.json").read_text())
  assert meta["source_workdir"] == bucket_run.workdir and meta["step"] == 30

  weights = sorted(p.relative_to(out) for p in out.rglob("*.safetensors"))
  assert weights == sorted(p.relative_to(local_export) for p in local_export.rglob("*.safetensors"))
  for rel in weights:  # the bucket run's weights are the local run's
    ours, theirs = load_file(out / rel), load_file(local_export / rel)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
      np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{rel}: {key}")
  cnn = tiny_torchvision_resnet()
  cnn.fc = torch.nn.Identity()
  cnn.load_state_dict(
    {k: torch.from_numpy(v) for k, v in load_file(out / "image_encoder/model.safetensors").items()}
  )

  url = bucket_run.workdir.rsplit("/", 1)[0] + "/exported"
  proc = run_cli(
    "medvl_jax.export", f"--workdir={bucket_run.workdir}", f"--out={url}", emulator=gcs_env
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  local_files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  assert paths.files(url) == local_files
  for rel in local_files:  # the same export, whichever side of the upload
    assert paths.read_bytes(paths.join(url, rel)) == (out / rel).read_bytes(), rel

  # A second export to the same URL is refused without --overwrite, and replaces it with it.
  proc = run_cli(
    "medvl_jax.export", f"--workdir={bucket_run.workdir}", f"--out={url}", emulator=gcs_env
  )
  one_line_error(proc, url, "--overwrite")
  proc = run_cli(
    "medvl_jax.export",
    f"--workdir={bucket_run.workdir}",
    f"--out={url}",
    "--overwrite",
    emulator=gcs_env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert paths.files(url) == local_files


# ----------------------------------------------------------------------------- evaluation
@pytest.mark.slow  # an evaluation process against the emulator: ~20 s
def test_evaluate_the_bucket_run_into_the_bucket(bucket_run, gcs_env):
  out = bucket_run.workdir.rsplit("/", 1)[0] + "/evaluations/retrieval"
  proc = run_cli(
    "medvl_jax.evaluate",
    f"--workdir={bucket_run.workdir}",
    "--task=retrieval",
    f"--out={out}",
    "--cfg=n_boot=100",
    emulator=gcs_env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"wrote {out}/metrics.json" in proc.stdout
  assert paths.files(out) == ["metrics.json", "retrieval_sheet.png"]
  result = json.loads(paths.read_text(paths.join(out, "metrics.json")))
  assert result["workdir"] == bucket_run.workdir and result["step"] == 30
  assert 0 <= result["metrics"]["retrieval/t2i_R@1"] <= 1
  assert paths.read_bytes(paths.join(out, "retrieval_sheet.png"))[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- bad URLs
@pytest.mark.slow  # three CLI processes: ~12 s
def test_unreachable_urls_fail_in_one_line_within_seconds(bucket_run, tfds_dir):
  """Through the CLIs: a typo'd bucket, and an endpoint that refuses connections (a wrong
  STORAGE_EMULATOR_HOST), where the storage libraries would retry for minutes."""
  t0 = time.monotonic()
  proc = run_cli(
    "medvl_jax.main",
    *smoke_args("gs://no-such-bucket/run", tfds_dir),
    emulator=bucket_run.emulator,
  )
  one_line_error(proc, "gs://no-such-bucket/run", "bucket 'no-such-bucket' does not exist")

  with socket.socket() as closed:
    closed.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
  proc = run_cli(
    "medvl_jax.export", f"--workdir={bucket_run.workdir}", "--out=/unused", emulator=endpoint
  )
  one_line_error(proc, bucket_run.workdir, "cannot reach bucket", endpoint)
  # Two CLI start-ups (imports of JAX and TensorFlow included), not the storage libraries'
  # minutes of retries.
  assert time.monotonic() - t0 < 2 * 30


def test_unreachable_data_dir_and_outputs_are_refused_before_any_work(bucket_run, gcs_env):
  """In-process (the CLIs print these StorageErrors as their one line): a data dir, an
  evaluation OUT and an export OUT in a bucket that does not exist."""
  from configs import convirt
  from medvl_jax.data import sources
  from medvl_jax.evaluate import runs
  from medvl_jax.interop import export

  config = convirt.get_config("smoke")
  config.data.data_dir = "gs://no-such-data/tfds"
  with pytest.raises(StorageError, match="gs://no-such-data/tfds: bucket 'no-such-data' does"):
    sources.check_sources(config)
  with pytest.raises(StorageError, match="gs://no-such-out/eval: bucket 'no-such-out' does"):
    runs.evaluate_run(bucket_run.workdir, "retrieval", out="gs://no-such-out/eval")
  with pytest.raises(StorageError, match="gs://no-such-out/x: bucket 'no-such-out' does"):
    export.export(bucket_run.workdir, "gs://no-such-out/x")


def test_no_local_gs_directory_is_created(bucket_run, tmp_path_factory):
  """Every URL went through medvl_jax.paths: nothing made `gs:/...` a local directory."""
  roots = [REPO, pathlib.Path.cwd(), pathlib.Path(tempfile.gettempdir())]
  assert [str(r / "gs:") for r in roots if (r / "gs:").exists()] == []
  base = tmp_path_factory.getbasetemp()
  assert [str(p) for p in base.rglob("gs:")] == []
  assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("medvl-out-")]
