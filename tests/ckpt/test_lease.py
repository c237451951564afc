"""One run per workdir (medvl_jax.ckpt.lease): real lease files, on a local directory and on a
bucket of a real GCS emulator, and real `python -m medvl_jax.main` processes sharing a workdir.

A lease of "another host" is written by hand: a record whose pid scope is not this machine's,
so the newcomer cannot ask the kernel about its process and goes by expiry and renewals.
"""

import datetime
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from medvl_jax import paths
from medvl_jax.ckpt import lease
from medvl_jax.errors import LeaseError
from tests.conftest import REPO, run_main, smoke_args

pytest_plugins = ("tests.conftest_gcs",)


@pytest.fixture(params=["local", "gcs"])
def where(request, tmp_path) -> str:
  """A workdir: a local directory, or a prefix in a fresh bucket of the GCS emulator."""
  if request.param == "local":
    workdir = str(tmp_path / "run")
    paths.mkdir(workdir)
    return workdir
  return request.getfixturevalue("gcs_bucket") + "/run"


def _utc(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _other_host(expires_in: float, ttl_s: float = 60.0) -> dict:
  """The lease of a run on another machine, expiring `expires_in` seconds from now."""
  now = time.time()
  return {
    "host": "node-b17",
    "pid": 4242,
    "pid_scope": "another-boot/pid:[4026531836]",
    "pid_start": "1234",
    "job": "SLURM_JOB_ID=77",
    "started": _utc(now - 3600),
    "renewed": _utc(now + expires_in - ttl_s),
    "expires_at": _utc(now + expires_in),
    "ttl_s": ttl_s,
  }


def _this_host(pid: int) -> dict:
  """pid, pid_scope and pid_start of a live process of this machine, as a lease records them."""
  stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
  return {
    "pid": pid,
    "pid_scope": f"{boot}/{os.readlink('/proc/self/ns/pid')}",
    "pid_start": stat.rpartition(")")[2].split()[19],
  }


def _write(workdir, record: dict) -> str:
  """Writes the lease file by hand; its generation."""
  path = paths.join(workdir, lease.LEASE_FILE)
  paths.write_bytes(path, json.dumps(record).encode())
  return paths.generation(path)


def _holder(workdir) -> dict:
  return json.loads(paths.read_text(paths.join(workdir, lease.LEASE_FILE)))


# ----------------------------------------------------------------------------- the lease file
def test_a_second_holder_is_refused_until_release(where):
  held = lease.acquire(where, ttl_s=30)
  try:
    record = _holder(where)
    assert record["pid"] == os.getpid() and record["host"] and record["ttl_s"] == 30
    assert set(record) >= {"started", "renewed", "expires_at", "pid_scope", "pid_start", "job"}
    t0 = time.monotonic()
    with pytest.raises(LeaseError) as refused:
      lease.acquire(where, ttl_s=30)
    assert time.monotonic() - t0 < 5  # alive on this host: refused at once
    line = str(refused.value)
    for part in (where, record["host"], f"pid {os.getpid()}", record["started"], "expires"):
      assert part in line, line
    assert held.problem() is None and held.problem(saving=True) is None  # renewed: still held
  finally:
    held.release()
  assert not paths.exists(paths.join(where, lease.LEASE_FILE))
  lease.acquire(where, ttl_s=30).release()


def test_renewals_extend_the_expiry(tmp_path):
  held = lease.acquire(tmp_path, ttl_s=3)  # renewed every second
  try:
    first = _holder(tmp_path)
    time.sleep(2.5)
    renewed = _holder(tmp_path)
    assert renewed["started"] == first["started"] and renewed["expires_at"] > first["expires_at"]
    assert held.problem() is None
  finally:
    held.release()


def test_expired_lease_of_another_host_is_taken_over_at_once(where, caplog):
  stale = _other_host(expires_in=-30)  # past its expiry and the clock-skew margin
  _write(where, stale)
  t0 = time.monotonic()
  with caplog.at_level("WARNING"), lease.acquire(where, ttl_s=30):
    assert time.monotonic() - t0 < 5
    assert _holder(where)["pid"] == os.getpid()
  taken = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
  assert len(taken) == 1 and "node-b17" in taken[0], taken
  assert f"expired at {stale['expires_at']}" in taken[0], taken


def test_dead_holder_on_this_host_is_taken_over_at_once(where, caplog):
  """A SIGKILLed holder: its lease has an hour to run, but its process is gone."""
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  record = dict(_other_host(expires_in=3600), **_this_host(holder.pid))
  holder.kill()
  holder.wait()
  _write(where, record)
  t0 = time.monotonic()
  with caplog.at_level("WARNING"), lease.acquire(where, ttl_s=30):
    assert time.monotonic() - t0 < 5
  gone = f"its process {holder.pid} on this host is gone"
  assert any(gone in r.getMessage() for r in caplog.records)


def test_live_holder_on_this_host_is_refused_however_long_unrenewed(tmp_path):
  """A stopped (SIGSTOP) holder still lives: its lease is not taken, even long expired."""
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    holder.send_signal(signal.SIGSTOP)
    _write(tmp_path, dict(_other_host(expires_in=-600), **_this_host(holder.pid)))
    with pytest.raises(LeaseError, match=f"pid {holder.pid}"):
      lease.acquire(tmp_path, ttl_s=30)
  finally:
    holder.kill()
    holder.wait()


def test_unexpired_lease_of_another_host_renewed_means_refused(tmp_path, monkeypatch, caplog):
  """The holder cannot be checked: a renewal seen while waiting proves it alive."""
  path = paths.join(tmp_path, lease.LEASE_FILE)
  generation = _write(tmp_path, _other_host(expires_in=30, ttl_s=3))
  stop = threading.Event()

  def renew():
    nonlocal generation
    while not stop.wait(1.0):
      record = _other_host(expires_in=30, ttl_s=3)
      generation = paths.replace_if_generation(path, json.dumps(record).encode(), generation)

  renewer = threading.Thread(target=renew)
  renewer.start()
  try:
    t0 = time.monotonic()
    with caplog.at_level("WARNING"), pytest.raises(LeaseError, match="node-b17"):
      lease.acquire(tmp_path, ttl_s=30, poll_s=0.2)
    assert time.monotonic() - t0 < 5
  finally:
    stop.set()
    renewer.join()
  waiting = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
  assert len(waiting) == 1 and "node-b17" in waiting[0], waiting  # one progress line


def test_unexpired_lease_of_another_host_not_renewed_is_taken_over(where, monkeypatch):
  """No renewal for the holder's ttl plus the margin, on this host's clock: taken over, however
  far in the future its (possibly skewed) clock put the expiry."""
  monkeypatch.setattr(lease, "SKEW_MARGIN_S", 1.0)
  _write(where, _other_host(expires_in=3600, ttl_s=2))
  t0 = time.monotonic()
  with lease.acquire(where, ttl_s=30, poll_s=0.2):
    waited = time.monotonic() - t0
  assert 3.0 <= waited < 15, waited


def test_two_newcomers_for_a_stale_lease_one_wins(where):
  _write(where, _other_host(expires_in=-30))
  contenders = 4
  start = threading.Barrier(contenders)
  won, refused = [], []

  def contend():
    start.wait()
    try:
      won.append(lease.acquire(where, ttl_s=30))
    except LeaseError as e:
      refused.append(str(e))

  threads = [threading.Thread(target=contend) for _ in range(contenders)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  try:
    assert len(won) == 1 and len(refused) == contenders - 1, (won, refused)
    assert paths.generation(paths.join(where, lease.LEASE_FILE)) == won[0].generation
  finally:
    for held in won:
      held.release()


def test_a_run_whose_lease_was_taken_stops_and_leaves_it(tmp_path):
  """Another run took the lease over (it judged this one dead): the renewal notices, the next
  step boundary stops the run in one line, and the release leaves the new holder's file."""
  held = lease.acquire(tmp_path, ttl_s=3)
  try:
    path = paths.join(tmp_path, lease.LEASE_FILE)
    taken = json.dumps(_other_host(expires_in=60)).encode()
    assert paths.replace_if_generation(path, taken, held.generation) is not None
    deadline = time.monotonic() + 5
    while held.problem() is None and time.monotonic() < deadline:  # the renewal thread's turn
      time.sleep(0.1)
    assert "taken over by another run" in (held.problem() or "")
    with pytest.raises(LeaseError) as stopped:
      held.check(step=7)
    line = str(stopped.value)
    assert "node-b17" in line and "stopped at step 7 without saving" in line, line
  finally:
    held.release()
  assert paths.read_bytes(path) == taken


def test_a_removed_lease_file_stops_the_run_before_a_save(tmp_path):
  held = lease.acquire(tmp_path, ttl_s=30)
  try:
    os.remove(tmp_path / lease.LEASE_FILE)
    with pytest.raises(LeaseError, match="removed"):
      held.check(step=3, saving=True)
  finally:
    held.release()
  assert not (tmp_path / lease.LEASE_FILE).exists()


# ----------------------------------------------------------------------------- the main job
def _tree(workdir: pathlib.Path) -> dict[str, str]:
  """Every file under `workdir`: its SHA-256."""
  return {
    str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(workdir.rglob("*"))
    if p.is_file()
  }


def _state_digest(step_dir: pathlib.Path) -> str:
  """SHA-256 of every leaf of a checkpoint step's train state (as bench/fingerprint.py)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  with ocp.PyTreeCheckpointer() as ckptr:  # as host NumPy arrays: no sharding to guess
    meta = ckptr.metadata(step_dir / "state").item_metadata
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(meta))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    state = ckptr.restore(
      step_dir / "state", args=ocp.args.PyTreeRestore(item, restore_args=restore_args)
    )
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    x = np.ascontiguousarray(np.asarray(x))
    h.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape};".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def _refused(proc, workdir) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
  assert f"workdir {workdir} is in use by another run" in errors[0], errors[0]
  assert "Traceback" not in proc.stderr and "waiting up to" not in proc.stderr
  return errors[0]


@pytest.mark.slow
def test_second_run_on_a_live_workdir_is_refused_and_writes_nothing(smoke_run, tfds_dir, tmp_path):
  """A double submit: the second job is refused in one line naming the holder, writes nothing
  (also with --restart_from_scratch, which would set the run aside), and the first job ends
  with the checkpoints of a lone run, bit for bit. The first job is paused (SIGSTOP) once it
  has checkpoint 10, so its workdir cannot change while the second runs: any change is the
  second's; a paused process is alive, so it keeps its workdir."""
  workdir = tmp_path / "live"
  cmd = [sys.executable, "-m", "medvl_jax.main", *smoke_args(workdir, tfds_dir)]
  first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "10").is_dir():
      assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    before = _tree(workdir)
    holder = _holder(workdir)
    assert holder["pid"] == first.pid and lease.LEASE_FILE in before
    for extra in ((), ("--restart_from_scratch",)):
      t0 = time.monotonic()
      line = _refused(run_main(*smoke_args(workdir, tfds_dir, *extra)), workdir)
      print(f"refused in {time.monotonic() - t0:.1f} s: {line}")
      for part in (holder["host"], f"pid {first.pid}", holder["started"], holder["expires_at"]):
        assert part in line, line
      assert _tree(workdir) == before
    first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
  finally:
    first.kill()
  assert first.returncode == 0, err.decode()[-3000:]
  assert not (workdir / lease.LEASE_FILE).exists()  # released at the end
  assert len(list((workdir / "tensorboard").rglob("events.out.tfevents.*"))) == 1
  reference = smoke_run[0] / "checkpoints"
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "30"]
  for step in ("20", "30"):
    assert _state_digest(workdir / "checkpoints" / step) == _state_digest(reference / step), step


@pytest.mark.slow
def test_a_run_whose_lease_is_taken_over_stops_without_saving(tfds_dir, tmp_path):
  """Another run took the workdir over (as it would from a run that went a ttl without
  renewing): the run stops at a step boundary in one line, starts no checkpoint save after
  that, and leaves the new holder's lease in place."""
  workdir = tmp_path / "taken"
  ckpts = workdir / "checkpoints"
  args = smoke_args(workdir, tfds_dir, "--lease_ttl_s=3", "--config.checkpoint_every=5")
  run = subprocess.Popen(
    [sys.executable, "-m", "medvl_jax.main", *args],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 300
    while not (ckpts / "5").is_dir():
      assert run.poll() is None and time.time() < deadline, run.stderr.read()[-3000:]
      time.sleep(0.05)
    run.send_signal(signal.SIGSTOP)  # the take-over happens between two of its steps
    started = {p.name.split(".")[0] for p in ckpts.iterdir()}  # committed, or being saved
    taken = _write(workdir, _other_host(expires_in=60))
    run.send_signal(signal.SIGCONT)
    _, err = run.communicate(timeout=300)
  finally:
    run.kill()
  assert run.returncode == 2, err[-3000:]
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert lines[-1].startswith("error: lost the workdir"), err[-3000:]
  assert "node-b17" in lines[-1] and "without saving" in lines[-1], lines[-1]
  assert "Traceback" not in err
  assert {p.name.split(".")[0] for p in ckpts.iterdir()} <= started
  assert "30" not in started and paths.generation(workdir / lease.LEASE_FILE) == taken


@pytest.mark.slow  # a smoke run killed at checkpoint 10 and resumed: ~60-120 s
def test_resume_after_sigkill_takes_the_lease_over_at_once(smoke_run, tfds_dir, tmp_path):
  """The killed run's lease is left behind with a 10-minute ttl; the same command on the same
  host sees its process gone and resumes at once, to the lone run's final checkpoint."""
  workdir = tmp_path / "killed"
  args = smoke_args(workdir, tfds_dir, "--lease_ttl_s=600")
  first = subprocess.Popen(
    [sys.executable, "-m", "medvl_jax.main", *args],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "10").is_dir() and time.time() < deadline:
    assert first.poll() is None
    time.sleep(0.05)
  first.kill()
  first.wait()
  assert _holder(workdir)["pid"] == first.pid  # never released
  resumed = run_main(*args, timeout=400)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"its process {first.pid} on this host is gone" in resumed.stderr
  assert "waiting up to" not in resumed.stderr
  assert "resumed from checkpoint step" in resumed.stderr
  assert not (workdir / lease.LEASE_FILE).exists()
  final = workdir / "checkpoints" / "30"
  assert _state_digest(final) == _state_digest(smoke_run[0] / "checkpoints" / "30")


def _copy_run(smoke_run, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir, ignore=shutil.ignore_patterns("eval", "discarded-*"))
  return workdir


@pytest.mark.slow  # a resumed smoke run (2 steps): ~30-60 s
def test_main_takes_over_an_expired_lease_of_another_host(smoke_run, tfds_dir, tmp_path):
  workdir = _copy_run(smoke_run, tmp_path)
  stale = _other_host(expires_in=-30)
  _write(workdir, stale)
  proc = run_main(*smoke_args(workdir, tfds_dir, "--config.total_steps=32"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  taken = [l for l in proc.stderr.splitlines() if "took over the lease" in l]
  assert len(taken) == 1 and "node-b17" in taken[0] and stale["expires_at"] in taken[0], taken
  assert (workdir / "checkpoints" / "32").is_dir()
  assert not (workdir / lease.LEASE_FILE).exists()


def test_finished_run_says_so_without_its_lease(smoke_run, tfds_dir, tmp_path):
  """A complete run reports it at once, whoever holds the lease, and writes nothing: here an
  unexpired lease of another host, which training would wait for."""
  workdir = _copy_run(smoke_run, tmp_path)
  _write(workdir, _other_host(expires_in=3600))
  before = _tree(workdir)
  proc = run_main(*smoke_args(workdir, tfds_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"run already complete at step 30 (workdir {workdir})" in proc.stderr
  assert "waiting up to" not in proc.stderr and "took over" not in proc.stderr
  assert _tree(workdir) == before
