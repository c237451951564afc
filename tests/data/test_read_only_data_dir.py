"""Prepare once, read everywhere: two hosts (processes, gloo) train on a prepared data dir they
cannot write to, a read-only bind mount where the machine allows one (root ignores file modes,
so chmod would prove nothing); they write nothing to it (a full listing with sizes, mtimes and
ctimes is unchanged) and train exactly as one process does: the global batch, the loss and the
update do not depend on how many hosts share the work (the suite's one multi-host training
run; tests/parallel covers the mesh and the start-up)."""

import subprocess

import numpy as np
import pytest

from tests.conftest import read_scalars, run_prepare, run_two_hosts, smoke_args
from tests.data.sample import listing


def _mount_read_only(source, view) -> bool:
  """Binds `source` at `view`, read-only; False where the machine does not allow it."""
  view.mkdir()
  try:
    subprocess.run(["mount", "--bind", source, view], check=True, capture_output=True)
  except (OSError, subprocess.CalledProcessError):
    return False
  if subprocess.run(["mount", "-o", "remount,ro,bind", view], capture_output=True).returncode:
    subprocess.run(["umount", view], capture_output=True)
    return False
  return True


@pytest.fixture
def prepared_read_only(tmp_path, sample_data_dir):
  """The paired sample prepared by `prepare`, seen through a read-only bind mount if possible."""
  data_dir = tmp_path / "tfds"
  result = run_prepare(
    "cxr_sample", "--config=paired", f"--manual_dir={sample_data_dir}", f"--data_dir={data_dir}"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  view = tmp_path / "read_only"
  mounted = _mount_read_only(data_dir, view)
  yield (view if mounted else data_dir), mounted
  if mounted:
    subprocess.run(["umount", view], check=True)


@pytest.mark.slow
def test_two_hosts_train_on_a_read_only_prepared_data_dir(prepared_read_only, smoke_run, tmp_path):
  data_dir, mounted = prepared_read_only
  if mounted:
    with pytest.raises(OSError, match="Read-only file system"):
      (data_dir / "probe").write_text("x")
  before = listing(data_dir)
  assert any(p.endswith("random_access/train.array_record") for p in before)
  workdir = tmp_path / "two_hosts"
  args = smoke_args(
    workdir,
    data_dir,
    "--config.total_steps=6",
    "--config.eval_every=3",
    "--config.checkpoint_every=3",
  )
  log0 = run_two_hosts(args, tmp_path / "logs", timeout=400)
  assert "mesh: 2 devices (cpu) over 2 processes" in log0
  assert listing(data_dir) == before  # Neither host wrote to the data dir.
  reference = read_scalars(smoke_run[0] / "tensorboard")["train_loss"]
  losses = read_scalars(workdir / "tensorboard")["train_loss"]
  assert sorted(losses) == list(range(1, 7))
  for step in range(1, 7):
    np.testing.assert_allclose(losses[step], reference[step], rtol=1e-5, err_msg=f"step {step}")
