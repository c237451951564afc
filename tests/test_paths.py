"""The path layer on local paths and on gs:// URLs served by a real GCS emulator.

Every behaviour is checked on both kinds of path (`where`): what a caller sees must not depend
on where its workdir lives. Orbax checkpoints, TensorBoard event files and ArrayRecord reads go
through the real libraries against the emulator; a SIGKILL mid-save runs in a subprocess that
gets nothing but STORAGE_EMULATOR_HOST.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from medvl_jax import paths
from medvl_jax.errors import StorageError
from tests.conftest import REPO, read_scalars

pytest_plugins = ("tests.conftest_gcs",)


@pytest.fixture
def where(local_or_bucket) -> str:
  return local_or_bucket


def test_is_url_and_join():
  assert paths.is_url("gs://b/x") and not paths.is_url("/tmp/x") and not paths.is_url("runs/a")
  assert paths.join("gs://b/run/", "checkpoints", "1") == "gs://b/run/checkpoints/1"
  assert paths.join("/tmp/run", "checkpoints") == os.path.join("/tmp/run", "checkpoints")
  with pytest.raises(StorageError, match="unsupported URL scheme"):
    paths.exists("s3://bucket/x")


def test_files_and_directories(where, tmp_path):
  paths.mkdir(where)
  run = paths.join(where, "run")
  config = paths.join(run, "config.json")
  assert not paths.exists(config)
  paths.write_text(config, '{"seed": 0}')
  assert paths.read_text(config) == '{"seed": 0}'
  paths.write_bytes(paths.join(run, "sub", "a.bin"), b"\x00\x01")
  assert paths.exists(config) and paths.isdir(run) and paths.isdir(paths.join(run, "sub"))
  assert paths.listdir(run) == ["config.json", "sub"]
  with pytest.raises(FileNotFoundError):
    paths.listdir(paths.join(where, "nothing"))

  paths.write_text(config, '{"seed": 1}')  # overwrite in place
  assert paths.read_text(config) == '{"seed": 1}'
  moved = paths.join(run, "moved.json")
  paths.rename(config, moved)
  assert not paths.exists(config) and paths.read_text(moved) == '{"seed": 1}'
  paths.write_text(config, "new")
  with pytest.raises(FileExistsError):
    paths.rename(config, moved)
  paths.replace(config, moved)
  assert paths.read_text(moved) == "new" and not paths.exists(config)
  paths.remove(moved)
  paths.remove(moved, missing_ok=True)
  with pytest.raises(FileNotFoundError):
    paths.remove(moved)

  # Both directions between local disk and `where`, bytes intact.
  data = np.random.default_rng(0).bytes(3 * 2**20 + 17)
  (tmp_path / "big.bin").write_bytes(data)
  assert paths.copy(tmp_path / "big.bin", paths.join(run, "big.bin")) == len(data)
  paths.copy(paths.join(run, "big.bin"), tmp_path / "back.bin")
  assert (tmp_path / "back.bin").read_bytes() == data
  assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no temporaries left

  paths.rmtree(run)
  assert not paths.exists(paths.join(run, "sub", "a.bin")) and not paths.isdir(run)


def test_files_move_and_absolute(where, tmp_path):
  run = paths.join(where, "run")
  for rel in ("checkpoints/10/state/a", "checkpoints/10/commit_success.txt", "tensorboard/ev"):
    paths.write_bytes(paths.join(run, *rel.split("/")), rel.encode())
  assert paths.files(run) == [
    "checkpoints/10/commit_success.txt",
    "checkpoints/10/state/a",
    "tensorboard/ev",
  ]
  assert paths.files(paths.join(where, "nothing")) == []
  aside = paths.join(run, "discarded", "checkpoints")
  paths.mkdir(paths.join(run, "discarded"))
  paths.move(paths.join(run, "checkpoints"), aside)
  assert paths.files(aside) == ["10/commit_success.txt", "10/state/a"]
  assert paths.read_bytes(paths.join(aside, "10", "state", "a")) == b"checkpoints/10/state/a"
  assert not paths.exists(paths.join(run, "checkpoints"))
  with pytest.raises(OSError):  # FileExistsError for a URL, ENOTEMPTY locally
    paths.move(paths.join(run, "tensorboard"), aside)
  assert paths.name(run + "/") == "run" and paths.absolute(run + "/") == paths.absolute(run)
  if paths.is_url(where):
    assert paths.absolute(run) == run
  else:
    assert os.path.isabs(paths.absolute(os.path.relpath(run)))


def test_check_writable(where, tmp_path):
  paths.check_writable(paths.join(where, "out"))
  assert paths.files(where) == []  # the probe is gone
  if not paths.is_url(where):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
      paths.check_writable(tmp_path / "file" / "out")


def test_output_dir_installs_complete_or_nothing(where):
  out = paths.join(where, "export")
  refuse = []

  def check_replaceable(existing):
    if refuse:
      raise ValueError(f"{existing}: refused")

  with paths.output_dir(out, "export.json", check_replaceable) as tmp:
    for rel in ("export.json", "a/weights.bin", "README.md"):
      os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
      with open(os.path.join(tmp, rel), "w") as f:
        f.write(f"one {rel}")
  assert paths.files(out) == ["README.md", "a/weights.bin", "export.json"]
  assert not os.path.exists(tmp)

  # A failure in the block leaves the previous output as it was, and no temporary behind.
  with pytest.raises(RuntimeError), paths.output_dir(out, "export.json", check_replaceable) as t:
    with open(os.path.join(t, "export.json"), "w") as f:
      f.write("half")
    raise RuntimeError("export failed")
  assert paths.read_text(paths.join(out, "export.json")) == "one export.json"
  assert not os.path.exists(t) and [n for n in paths.listdir(where) if "tmp" in n] == []

  refuse.append(True)  # check_replaceable says no: nothing changes
  with (
    pytest.raises(ValueError, match="refused"),
    paths.output_dir(out, "export.json", check_replaceable) as tmp,
  ):
    with open(os.path.join(tmp, "export.json"), "w") as f:
      f.write("two")
  assert paths.read_text(paths.join(out, "export.json")) == "one export.json"

  refuse.clear()  # replaced: the old files that the new output lacks are gone
  with paths.output_dir(out, "export.json", check_replaceable) as tmp:
    with open(os.path.join(tmp, "export.json"), "w") as f:
      f.write("two")
  assert paths.files(out) == ["export.json"] and paths.read_text(paths.join(out, "export.json"))
  assert paths.listdir(where) == ["export"]


def test_output_dir_uploads_the_manifest_last(gcs_bucket, monkeypatch):
  uploaded = []
  copy = paths.copy
  monkeypatch.setattr(paths, "copy", lambda src, dst: uploaded.append(dst) or copy(src, dst))
  out = gcs_bucket + "/export"
  with paths.output_dir(out, "export.json", lambda _: None) as tmp:
    for rel in ("a.bin", "export.json", "z.bin"):
      with open(os.path.join(tmp, rel), "w") as f:
        f.write(rel)
  assert uploaded == [f"{out}/a.bin", f"{out}/z.bin", f"{out}/export.json"]


# ----------------------------------------------------------------------------- install_dir (local)
def _tree(d: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def _dir(path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  path.mkdir()
  for name, text in files.items():
    (path / name).write_text(text)
  return path


def _refuse(existing: str) -> None:
  if not (pathlib.Path(existing) / "result.json").is_file():
    raise ValueError(f"{existing}: not ours")


def test_new_or_empty_out_is_replaced(tmp_path):
  tmp = _dir(tmp_path / "out.tmp-1", {"result.json": "new"})
  paths.install_dir(tmp, tmp_path / "out", _refuse)
  assert _tree(tmp_path / "out") == {"result.json": "new"} and not tmp.exists()
  (tmp_path / "empty").mkdir()
  tmp = _dir(tmp_path / "empty.tmp-1", {"result.json": "new"})
  paths.install_dir(tmp, tmp_path / "empty", _refuse)
  assert _tree(tmp_path / "empty") == {"result.json": "new"}


def test_previous_output_is_replaced_and_other_content_refused(tmp_path):
  out = _dir(tmp_path / "out", {"result.json": "old", "stale.txt": "old"})
  paths.install_dir(_dir(tmp_path / "out.tmp-1", {"result.json": "new"}), out, _refuse)
  assert _tree(out) == {"result.json": "new"}
  other = _dir(tmp_path / "other", {"notes.txt": "keep me"})
  tmp = _dir(tmp_path / "other.tmp-1", {"result.json": "new"})
  with pytest.raises(ValueError, match="not ours"):
    paths.install_dir(tmp, other, _refuse)
  assert _tree(other) == {"notes.txt": "keep me"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "other.tmp-1", "out"]


def test_failed_rename_puts_the_previous_output_back(tmp_path):
  """The new directory cannot take the place (here: it is gone): the previous output is
  restored under its name, nothing is set aside, and the error reaches the caller."""
  out = _dir(tmp_path / "out", {"result.json": "old"})
  with pytest.raises(FileNotFoundError):
    paths.install_dir(tmp_path / "out.tmp-gone", out, _refuse)
  assert _tree(out) == {"result.json": "old"}
  assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_mirror_uploads_what_changed(where):
  mirror = paths.Mirror(paths.join(where, "tb"))
  with open(os.path.join(mirror.local, "events"), "wb") as f:
    f.write(b"one")
  os.makedirs(os.path.join(mirror.local, "eval"))
  with open(os.path.join(mirror.local, "eval", "events"), "wb") as f:
    f.write(b"e")
  expected = ["eval/events", "events"] if paths.is_url(where) else []
  assert mirror.sync() == expected
  assert mirror.sync() == []
  with open(os.path.join(mirror.local, "events"), "ab") as f:
    f.write(b"two")
  assert mirror.sync() == (["events"] if paths.is_url(where) else [])
  mirror.close()
  assert paths.read_bytes(paths.join(where, "tb", "events")) == b"onetwo"
  assert paths.read_bytes(paths.join(where, "tb", "eval", "events")) == b"e"


def test_tensorboard_event_files_through_a_mirror(gcs_bucket, tmp_path):
  """clu's SummaryWriter (TensorFlow's event writer) writes locally; the mirror uploads."""
  from clu import metric_writers

  logdir = gcs_bucket + "/run/tensorboard"
  mirror = paths.Mirror(logdir)
  writer = metric_writers.SummaryWriter(mirror.local)
  for step in (1, 2):
    writer.write_scalars(step, {"train/loss": 3.0 - step})
    writer.flush()
    mirror.sync()
  writer.close()
  mirror.close()

  (name,) = paths.listdir(logdir)
  assert name.startswith("events.out.tfevents.")
  paths.copy(paths.join(logdir, name), tmp_path / name)
  assert read_scalars(tmp_path) == {"train/loss": {1: 2.0, 2: 1.0}}


def test_conditional_writes(where):
  """A workdir lease: create-if-absent, replace-if-unchanged, delete-if-unchanged."""
  paths.mkdir(where)
  lock = paths.join(where, "LOCK")
  assert paths.generation(lock) is None
  first = paths.create_if_absent(lock, b"host-a")
  assert first is not None and paths.generation(lock) == first
  assert paths.create_if_absent(lock, b"host-b") is None
  assert paths.read_bytes(lock) == b"host-a"

  renewed = paths.replace_if_generation(lock, b"host-a renewed", first)
  assert renewed is not None and renewed != first
  assert paths.replace_if_generation(lock, b"host-b", first) is None  # a stale generation
  assert paths.read_bytes(lock) == b"host-a renewed"

  if not paths.is_url(where):
    # fake-gcs-server 1.54 ignores preconditions on delete (GCS answers 412); only local here.
    assert not paths.delete_if_generation(lock, first)
  assert paths.delete_if_generation(lock, renewed)
  assert not paths.exists(lock)
  assert paths.create_if_absent(lock, b"host-b") is not None


def test_unreachable_storage_fails_fast_in_one_line(gcs_bucket, monkeypatch):
  paths.check_reachable(gcs_bucket + "/run")
  paths.check_reachable("/no/such/local/dir")  # local paths are not probed

  with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
    paths.check_reachable("gs://no-such-bucket/run")

  with socket.socket() as closed:
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  t0 = time.monotonic()
  with pytest.raises(StorageError, match="cannot reach bucket .* refused") as e:
    paths.check_reachable(gcs_bucket + "/run", timeout=2)
  assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)

  # An endpoint that accepts the connection and never answers.
  with socket.socket() as silent:
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{silent.getsockname()[1]}")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach bucket .*ReadTimeout"):
      paths.check_reachable(gcs_bucket + "/run", timeout=2)
    assert time.monotonic() - t0 < 6


def test_array_record_reads_from_the_bucket(gcs_bucket, tmp_path):
  """ArrayRecord's own GCS client (google-cloud-cpp) reads gs:// by index: the train reads."""
  from array_record.python import array_record_data_source, array_record_module

  # Without this mapping ArrayRecord asks the real GCS and retries for minutes: fail at once.
  assert os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT") == os.environ["STORAGE_EMULATOR_HOST"]
  records = [f"record {i}".encode() * (i + 1) for i in range(50)]
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "a.array_record"), "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  url = gcs_bucket + "/tfds/random_access/train.array_record"
  paths.copy(tmp_path / "a.array_record", url)
  source = array_record_data_source.ArrayRecordDataSource([url])
  assert len(source) == 50
  assert [source[i] for i in (0, 49, 7)] == [records[0], records[49], records[7]]


def _state(scale: float):
  import jax.numpy as jnp

  return {
    "params": {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4) * scale, "bias": jnp.ones(4)}},
    "step": jnp.asarray(int(scale), jnp.int32),
    "emb": jnp.full((7, 5), scale, jnp.bfloat16),
  }


def _manager(directory: str):
  import orbax.checkpoint as ocp

  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
  return ocp.CheckpointManager(paths.path(directory), item_handlers=handlers, options=options)


def test_orbax_checkpoints_on_gcs(gcs_bucket):
  """Async saves of a real pytree to gs://, the oldest pruned, the newest restored exactly."""
  import jax
  import orbax.checkpoint as ocp

  directory = gcs_bucket + "/run/checkpoints"
  mngr = _manager(directory)
  for step in (1, 2, 3):
    mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state(float(step))), data=ocp.args.JsonSave({"pos": step})
      ),
    )
  mngr.wait_until_finished()
  mngr.close()
  assert paths.listdir(directory) == ["2", "3"]
  # On GCS Orbax commits a step by writing this marker, not by renaming a temporary directory.
  assert paths.exists(paths.join(directory, "3", "commit_success.txt"))

  mngr = _manager(directory)
  assert mngr.latest_step() == 3
  restored = mngr.restore(3)
  jax.tree.map(np.testing.assert_array_equal, restored["state"], _state(3.0))
  assert restored["data"] == {"pos": 3}


_KILLED_SAVE = textwrap.dedent(
  """
  import os, sys, time
  from medvl_jax import paths  # maps STORAGE_EMULATOR_HOST before Orbax touches a URL
  import numpy as np
  import orbax.checkpoint as ocp
  from tests.test_paths import _manager, _state
  mngr = _manager(sys.argv[1])
  def save(step, state):
    mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"pos": step})))
  save(1, _state(1.0))
  mngr.wait_until_finished()
  # Large enough that its upload is still running when the parent kills this process.
  big = {f"w{i}": np.full((1024, 1024), i, np.float32) for i in range(48)}
  save(2, big)
  print("saving", flush=True)
  time.sleep(600)
  """
)


def test_sigkill_mid_save_leaves_no_step_that_latest_step_picks(gcs_bucket, gcs_emulator):
  directory = gcs_bucket + "/run/checkpoints"
  # Nothing but STORAGE_EMULATOR_HOST: the child derives every other setting itself.
  derived = {paths.EMULATOR_ENV: gcs_emulator}
  paths.configure(derived)
  env = {k: v for k, v in os.environ.items() if k not in derived}
  env.update(STORAGE_EMULATOR_HOST=gcs_emulator, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  child = subprocess.Popen(
    [sys.executable, "-c", _KILLED_SAVE, directory],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    assert child.stdout.readline().strip() == "saving", child.stderr.read()[-3000:]
    step2 = paths.join(directory, "2")
    deadline = time.monotonic() + 60
    while not paths.exists(paths.join(step2, "_CHECKPOINT_METADATA")):
      assert time.monotonic() < deadline, "the save of step 2 never started"
      time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
  finally:
    child.kill()
    child.wait()
  assert paths.exists(paths.join(step2, "_CHECKPOINT_METADATA"))
  if paths.exists(paths.join(step2, "commit_success.txt")):
    pytest.fail("step 2 committed before the kill; make the child's state larger")

  mngr = _manager(directory)
  assert mngr.all_steps() == [1] and mngr.latest_step() == 1
  assert mngr.restore(1)["data"] == {"pos": 1}
  # The resumed run saves step 2 again over the partial one.
  import orbax.checkpoint as ocp

  mngr.save(
    2,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state(2.0)), data=ocp.args.JsonSave({"pos": 2})
    ),
  )
  mngr.wait_until_finished()
  assert mngr.all_steps() == [1, 2]
  assert mngr.restore(2)["data"] == {"pos": 2}
