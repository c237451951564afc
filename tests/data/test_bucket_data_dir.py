"""A data dir in a bucket, on a real GCS emulator (fake-gcs-server): `prepare` builds locally
and uploads, metadata last; training reads the bucket (tfds metadata through epath/gcsfs,
records through ArrayRecord's own GCS client) and trains as on a local data dir; an
evaluator's labelled split reads the same from the bucket as from local disk."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from configs import convirt as convirt_config
from data_pipelines import cxr_sample
from data_pipelines import prepare as prepare_lib
from medvl_jax import paths
from medvl_jax.data import records
from medvl_jax.evaluate import datasets, features
from tests import fixtures_layout as fl
from tests.conftest import REPO, read_scalars, run_main, run_prepare, smoke_args

pytest_plugins = ("tests.conftest_gcs",)

STEPS = 4


@pytest.mark.slow
def test_training_reads_a_prepared_bucket(
  gcs_bucket, smoke_run, sample_data_dir, tfds_dir, tmp_path
):
  data_dir = gcs_bucket + "/tfds"
  result = run_prepare(
    "cxr_sample", "--config=paired", f"--manual_dir={sample_data_dir}", f"--data_dir={data_dir}"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "upload to gs://" in result.stderr  # The upload's progress bar.
  assert f"  random access: train, validation, test ({data_dir}/" in result.stdout
  staging = prepare_lib._default_staging(data_dir)  # pylint: disable=protected-access
  assert not os.path.exists(staging)  # The local build is removed once uploaded.
  version = paths.join(data_dir, "cxr_sample", "paired", str(cxr_sample.Builder.VERSION))
  assert paths.listdir(paths.join(version, records.COPY_DIR)) == [
    "test.array_record",
    "train.array_record",
    "validation.array_record",
  ]
  builder = cxr_sample.Builder(config="paired", data_dir=data_dir)
  assert builder.is_prepared() and records.has_copies(builder)
  assert builder.info.splits["train"].num_examples == 261
  # Prepared already: a second run uploads nothing.
  again = run_prepare(
    "cxr_sample", "--config=paired", f"--manual_dir={sample_data_dir}", f"--data_dir={data_dir}"
  )
  assert again.returncode == 0 and "upload to" not in again.stderr, again.stderr[-3000:]

  workdir = tmp_path / "run"
  proc = run_main(
    *smoke_args(
      workdir,
      data_dir,
      f"--config.total_steps={STEPS}",
      f"--config.eval_every={STEPS}",
      f"--config.checkpoint_every={STEPS}",
    )
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  reference = read_scalars(smoke_run[0] / "tensorboard")
  scalars = read_scalars(workdir / "tensorboard")
  assert sorted(scalars["train_loss"]) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    np.testing.assert_allclose(
      scalars["train_loss"][step], reference["train_loss"][step], rtol=1e-6, err_msg=f"step {step}"
    )

  # The evaluators' read of the run's own paired split (retrieval, zero-shot, the default
  # probe): the same arrays from the bucket as from the local data dir.
  config = convirt_config.get_config("smoke")
  config.data.data_dir = str(tfds_dir)
  local = features.load_sample_split(config, "validation")
  config.data.data_dir = data_dir
  remote = features.load_sample_split(config, "validation")
  assert len(local["image"]) > 0 and local.keys() == remote.keys()
  for k in local:
    np.testing.assert_array_equal(local[k], remote[k], err_msg=k)


@pytest.mark.slow  # a killed and a rerun prepare process: ~20 s
def test_a_killed_upload_is_not_prepared_and_a_rerun_completes(
  gcs_emulator, gcs_bucket, sample_data_dir
):
  """SIGKILL while `prepare` uploads: the objects already in the bucket do not make a prepared
  dataset (its metadata goes last); the same command completes it from the kept local build."""
  data_dir = gcs_bucket + "/tfds"
  prefix = f"tfds/cxr_sample/image_only/{cxr_sample.Builder.VERSION}/"
  command = ["cxr_sample", "--config=image_only", f"--manual_dir={sample_data_dir}"]
  command.append(f"--data_dir={data_dir}")
  proc = subprocess.Popen(
    [sys.executable, "-m", "data_pipelines.prepare", *command],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  # Killed once a first copy is in the bucket: the metadata, tiny, must not be there yet.
  deadline = time.time() + 300
  while not objects(gcs_emulator, gcs_bucket, prefix + "random_access/"):
    assert proc.poll() is None, "prepare ended before its upload was interrupted"
    assert time.time() < deadline, "no copy was uploaded"
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  uploaded = objects(gcs_emulator, gcs_bucket, prefix)
  assert prefix + "dataset_info.json" not in uploaded, uploaded
  assert not cxr_sample.Builder(config="image_only", data_dir=data_dir).is_prepared()
  staging = prepare_lib._default_staging(data_dir)  # pylint: disable=protected-access
  assert os.path.isdir(staging)  # Kept for the rerun.

  result = run_prepare(*command)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Generating" not in result.stderr  # The kept build was uploaded, not built again.
  assert prefix + "dataset_info.json" in objects(gcs_emulator, gcs_bucket, prefix)
  assert f"  random access: train, validation, test ({data_dir}/" in result.stdout
  assert not os.path.exists(staging)


def objects(emulator: str, bucket: str, prefix: str) -> list[str]:
  """The names of the objects under `prefix`, asked of the emulator (no client-side cache)."""
  url = f"{emulator}/storage/v1/b/{bucket.removeprefix('gs://')}/o?prefix={prefix}"
  with urllib.request.urlopen(url, timeout=10) as response:
    listing = json.loads(response.read())
  return sorted(item["name"] for item in listing.get("items", []))


@pytest.mark.slow
def test_an_evaluator_split_reads_the_same_from_a_bucket(gcs_bucket, sample_data_dir, tmp_path):
  manual = fl.chexpert(sample_data_dir, tmp_path / "chexpert")
  staging, data_dir = tmp_path / "staging", gcs_bucket + "/tfds"
  result = run_prepare(
    "chexpert",
    "--config=u_ignore",
    "--image_size=64",
    f"--manual_dir={manual}",
    f"--data_dir={data_dir}",
    f"--staging_dir={staging}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  kw = dict(builder_config="u_ignore_64", image_size=56, resize=64)
  local = datasets.load_split("chexpert", "test", data_dir=str(staging), **kw)  # Kept: ours.
  remote = datasets.load_split("chexpert", "test", data_dir=data_dir, **kw)
  assert len(local["image"]) > 0 and local.keys() == remote.keys()
  for k in local:
    np.testing.assert_array_equal(local[k], remote[k], err_msg=k)
