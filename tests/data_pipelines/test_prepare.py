"""`python -m data_pipelines.prepare`: the real CLI on a MIMIC-CXR fixture tree."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from data_pipelines.mimic_cxr import Builder
from tests import fixtures_layout as fl
from tests.conftest import REPO


def run_prepare(*args, **kw):
  return subprocess.run(
    [sys.executable, "-m", "data_pipelines.prepare", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    **kw,
  )


@pytest.fixture(scope="module")
def tree(sample_data_dir, tmp_path_factory):
  return fl.mimic_cxr(sample_data_dir, tmp_path_factory.mktemp("mimic"), n_patients=6)


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
