"""`python -m data_pipelines.prepare`: the real CLI on a MIMIC-CXR fixture tree and on the real
sample; what training does with data that is not (wholly) prepared."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tensorflow_datasets as tfds

from data_pipelines import common
from data_pipelines import cxr_sample as sample_builder
from data_pipelines.mimic_cxr import Builder
from medvl_jax.data import records, sources
from medvl_jax.errors import DataError
from tests import fixtures_layout as fl
from tests.conftest import REPO, run_main, run_prepare
from tests.data.sample import make_config


@pytest.fixture(scope="module")
def tree(sample_data_dir, tmp_path_factory):
  return fl.mimic_cxr(sample_data_dir, tmp_path_factory.mktemp("mimic"), n_patients=6)


@pytest.mark.slow  # a prepare process with worker processes: ~40 s
def test_cli_builds_with_workers_and_prints_summary(tree, tmp_path):
  result = run_prepare(
    "mimic_cxr",
    f"--manual_dir={tree}",
    f"--data_dir={tmp_path}",
    "--image_size=64",
    "--num_workers=2",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  builder = Builder(config="paired_64", data_dir=str(tmp_path))
  assert builder.is_prepared()
  for split, info in builder.info.splits.items():
    assert f"  {split:<12} {info.num_examples:>9,d} records" in result.stdout
  assert "  skipped              0 records" in result.stdout
  assert "Generating" in result.stderr  # tfds progress bar.
  # Every split, train and eval, gets its random-access copy (a progress bar each).
  assert f"  random access: {', '.join(builder.info.splits)} (" in result.stdout
  for split, info in builder.info.splits.items():
    assert f"random-access copy of {split}" in result.stderr
    store = records.RecordStore.open(builder, split)
    assert len(store) == store.total == info.num_examples > 0


@pytest.mark.slow
def test_cli_errors_are_one_line(tree, tmp_path):
  result = run_prepare("mimic_cxr", f"--manual_dir={tmp_path / 'nope'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: --manual_dir=")
  result = run_prepare("mimicc", f"--manual_dir={tree}")
  assert result.returncode == 2
  assert "corpus='mimicc' is not a known dataset; valid:" in result.stderr
  result = run_prepare("mimic_cxr", f"--manual_dir={tree}", "--image_size=100")
  assert result.returncode == 2 and "image_size=100 has no config" in result.stderr
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "x").write_text("")
  result = run_prepare("mimic_cxr", f"--manual_dir={empty}", f"--data_dir={tmp_path}")
  assert result.returncode == 2
  assert "mimic-cxr-2.0.0-metadata.csv.gz: required file not found" in result.stderr


@pytest.mark.slow  # a killed and a rerun prepare process: ~20 s
def test_interrupted_prepare_is_not_read_and_rerun_recovers(tree, tmp_path):
  manual = tmp_path / "mimic"
  shutil.copytree(tree, manual)
  # One image is a named pipe: reading it blocks (a real OS behaviour, no mock), so the
  # run is stuck mid-generation when we kill it.
  victim = sorted(manual.rglob("*.jpg"))[len(list(manual.rglob("*.jpg"))) // 2]
  saved = victim.read_bytes()
  victim.unlink()
  os.mkfifo(victim)
  data_dir = tmp_path / "tfds"
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "data_pipelines.prepare",
      "mimic_cxr",
      f"--manual_dir={manual}",
      f"--data_dir={data_dir}",
      "--image_size=64",
      "--num_workers=1",
    ],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  config_dir = data_dir / "mimic_cxr" / "paired_64"
  deadline = time.time() + 120
  while not list(config_dir.glob("incomplete.*")) and time.time() < deadline:
    assert proc.poll() is None, "prepare ended before it was interrupted"
    time.sleep(0.05)
  time.sleep(1.0)
  assert proc.poll() is None
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert list(config_dir.glob("incomplete.*")), "the killed run left its incomplete folder"
  builder = Builder(config="paired_64", data_dir=str(data_dir))
  assert not builder.is_prepared()
  with pytest.raises(AssertionError, match="could not find data"):
    builder.as_dataset(split="train")
  # Re-run with the image back in place: completes, and leaves no half-written folder.
  victim.unlink()
  victim.write_bytes(saved)
  result = run_prepare(
    "mimic_cxr",
    f"--manual_dir={manual}",
    f"--data_dir={data_dir}",
    "--image_size=64",
    "--num_workers=1",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert not list(config_dir.glob("incomplete.*"))
  builder = Builder(config="paired_64", data_dir=str(data_dir))
  assert builder.is_prepared()
  n = sum(info.num_examples for info in builder.info.splits.values())
  assert n == len(fl.read_csv_gz(manual / "mimic-cxr-2.0.0-metadata.csv.gz"))


def test_prepare_killed_while_copying_leaves_no_copy_taken_for_complete(sample_data_dir, tmp_path):
  """SIGKILL while a random-access copy is being written: the split has no copy that reads as
  complete (training refuses it in one line), and the same command finishes the job."""
  data_dir = tmp_path / "tfds"
  command = [
    "cxr_sample",
    "--config=image_only",
    f"--manual_dir={sample_data_dir}",
    f"--data_dir={data_dir}",
  ]
  version = str(sample_builder.Builder.VERSION)
  copies = data_dir / "cxr_sample" / "image_only" / version / records.COPY_DIR
  proc = subprocess.Popen(
    [sys.executable, "-m", "data_pipelines.prepare", *command],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  half = None
  deadline = time.time() + 240
  while half is None and proc.poll() is None and time.time() < deadline:
    # A copy being written: a temporary that holds records already.
    temporaries = list(copies.glob(".*.tmp")) if copies.is_dir() else []
    half = next((p for p in temporaries if _size(p) > 0), None)
    if half is not None:
      # Stopped first, then looked at again: the writer may have renamed it whole meanwhile.
      os.killpg(proc.pid, signal.SIGSTOP)
      if not half.exists():
        half = None
        os.killpg(proc.pid, signal.SIGCONT)
    time.sleep(0.001)
  assert half is not None, "prepare ended before a copy was caught half-written"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  split = half.name.split(".")[1]
  assert half.exists() and not (copies / f"{split}.array_record").exists()
  builder = sample_builder.Builder(config="image_only", data_dir=str(data_dir))
  assert builder.is_prepared() and not records.has_copies(builder)
  expected = (
    f"split {split!r} of cxr_sample/image_only has no random-access copy; prepare it once, on "
    f"one machine: python -m data_pipelines.prepare {' '.join(command)}"
  )
  with pytest.raises(DataError) as error:
    records.RecordStore.open(builder, split)
  assert str(error.value).endswith(expected)
  # Training on several hosts (which never prepare) refuses the run in the same line.
  config = make_config(
    data_dir,
    **{"data.builder_config": "image_only", "data.train_split": split, "data.eval_split": ""},
  )
  config.data.sources = (
    {
      "name": "cxr_sample",
      "builder_config": "image_only",
      "split": split,
      "kind": "image",
      "weight": 1.0,
    },
  )
  with pytest.raises(DataError, match=re.escape(expected)):
    sources.prepare(config, process_count=2)

  result = run_prepare(*command)
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(p.name for p in copies.iterdir()) == sorted(
    f"{s}.array_record" for s in builder.info.splits
  )  # The killed writer's temporary is gone.
  for s, info in builder.info.splits.items():
    assert records.RecordStore.open(builder, s).total == info.num_examples
  # Skip counts are reported as the build recorded them.
  skipped = dict(builder.info.metadata.get("skipped", {}))
  assert f"  {common.skipped_line(skipped)}" in result.stdout


def _size(path: pathlib.Path) -> int:
  try:
    return path.stat().st_size
  except FileNotFoundError:  # Renamed into place meanwhile.
    return 0


def test_training_refuses_an_unprepared_corpus_in_one_line(tree, tmp_path):
  """A real corpus that is not prepared, or prepared without its random-access copies: the
  main job exits 2 with one line naming the exact prepare command, and writes no data."""
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  args = (
    "--config=configs/convirt.py:smoke",
    f"--workdir={tmp_path / 'run'}",
    "--config.data.name=mimic_cxr",
    "--config.data.builder_config=paired_64",
    f"--config.data.data_dir={data_dir}",
  )
  proc = run_main(*args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert line == (
    f"error: {data_dir}/mimic_cxr/paired_64/1.0.0: dataset mimic_cxr/paired_64 (config.data) "
    "is not prepared; prepare it once, on one machine: python -m data_pipelines.prepare "
    f"mimic_cxr --config=paired --image_size=64 --manual_dir=DIR --data_dir={data_dir}"
  )
  assert os.listdir(data_dir) == []
  # Built by tfds alone (no random-access copies): refused, with the recorded manual_dir.
  builder = Builder(config="paired_64", data_dir=str(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(tree), try_download_gcs=False)
  )
  config = make_config(data_dir, **{"data.name": "mimic_cxr", "data.builder_config": "paired_64"})
  with pytest.raises(DataError) as error:
    sources.prepare(config)
  assert str(error.value).endswith(
    "split 'train' of mimic_cxr/paired_64 has no random-access copy; prepare it once, on one "
    "machine: python -m data_pipelines.prepare mimic_cxr --config=paired --image_size=64 "
    f"--manual_dir={tree} --data_dir={data_dir}"
  )
  assert not (pathlib.Path(builder.data_dir) / records.COPY_DIR).exists()
