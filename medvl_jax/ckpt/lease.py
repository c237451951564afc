"""One run per workdir: the lease a live run holds on its workdir.

`<workdir>/LEASE.json` is one small JSON object:

  host        the holder's host name
  pid         its process id: process 0 of a (multi-host) run holds the lease for all its hosts
  pid_scope   where `pid` names that process: this boot of the machine and its PID namespace;
              a newcomer in the same scope can ask the kernel whether the holder still lives
  pid_start   the process's start time (clock ticks after boot): a reused pid is another process
  job         the scheduler's job id (e.g. `SLURM_JOB_ID=123`), or null
  started     when the holder took the lease (UTC, ISO 8601)
  renewed     its latest renewal (UTC)
  expires_at  renewed + ttl_s (UTC)
  ttl_s       the holder's time to live

Every write goes through the conditional writes of `medvl_jax.paths` (`create_if_absent`,
`replace_if_generation`, `delete_if_generation`): of two writers that saw the same generation of
the file, exactly one succeeds. They work on local paths, on a shared filesystem (flock +
rename) and on gs:// (object generation preconditions).

Acquire (`hold`): create the file if absent. If it exists, judge its holder:
  * same pid scope: alive → refused at once; gone (SIGKILL, crash) → taken over at once;
  * another host, lease expired (`expires_at + SKEW_MARGIN_S` before now) → taken over at once;
  * another host, lease not expired: the holder cannot be checked, so watch the file (one
    progress line): a change proves a live writer → refused; no change for the holder's
    ttl_s + SKEW_MARGIN_S (measured on this host's monotonic clock, so no clock skew enters)
    → taken over; the file gone → created afresh.
A take-over is `replace_if_generation` with the generation that was judged, so of two newcomers
only one wins; the other sees the winner alive and is refused. A refusal is one line naming the
holder and writes nothing.

Hold: a daemon thread renews every ttl_s / 3 with `replace_if_generation(own generation)`. The
loop asks `check` at each step boundary (a flag and a clock read; no I/O) and, renewing at once,
right before each checkpoint save. The run stops, with one line and without saving, when
  * a renewal found the file changed or gone: another run took it over (it judged this run dead:
    no renewal for a ttl, e.g. a paused VM or a storage outage) or someone removed it;
  * no renewal succeeded for ttl_s (storage unreachable): another host may judge the lease
    expired, so this run can no longer prove that it owns the workdir.
What this makes sound: a newcomer takes over only after the holder went a whole ttl without a
renewal, and by then the holder itself refuses to save (its deadline is the last successful
renewal + ttl_s on its own monotonic clock; the newcomer waits ttl_s + SKEW_MARGIN_S, or the
wall-clock expiry plus the margin, so a clock of another host up to SKEW_MARGIN_S ahead is
tolerated). No checkpoint save starts without a renewal just before it. The lease is not a
fence on each write, though: a save already in flight when the lease is lost is abandoned by
`python -m medvl_jax.main`, which exits at once (a step counts only once its save commits, so
that leaves no step a resume would pick), but one started before a long freeze (a paused VM)
may commit after a take-over. On a multi-host run, process 0 renews, and the hosts agree on a
lost lease right before each checkpoint save (one broadcast from process 0), so all stop at the
same step, before the save; between saves their only write to the workdir is process 0's
TensorBoard events.

Release: `delete_if_generation(own generation)` at the end of the run, on an error and after a
SIGTERM; nothing when the lease was lost (it is another run's now).
"""

from collections.abc import Callable
import datetime
import json
import os
import socket
import threading
import time
from typing import Any

from absl import logging

from medvl_jax import paths
from medvl_jax.errors import LeaseError

LEASE_FILE = "LEASE.json"
DEFAULT_TTL_S = 60.0
# How far ahead of the holder's clock a newcomer's clock may be without taking over a live
# run's lease early (wall-clock expiry only; the watched wait uses a monotonic clock).
SKEW_MARGIN_S = 10.0
_JOB_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")


# ----------------------------------------------------------------------------- this process
def _utc(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds(utc: str) -> float:
  return datetime.datetime.fromisoformat(utc).timestamp()


def _proc_start(pid: int | str) -> tuple[str, str] | None:
  """(state, start time in clock ticks after boot) of process `pid`; None when it is gone."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      stat = f.read()
  except OSError:
    return None
  fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
  return fields[0], fields[19]


def _pid_scope() -> str | None:
  """This boot of the machine and this PID namespace (None where the kernel does not say)."""
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
      boot = f.read().strip()
    return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
  except OSError:
    return None


def _alive(record: dict[str, Any]) -> bool:
  """Whether the holder's process (in this pid scope) still runs: a zombie does not."""
  found = _proc_start(record["pid"])
  if found is None or found[0] in ("Z", "X"):
    return False
  return record.get("pid_start") is None or found[1] == str(record["pid_start"])


def _new_record(ttl_s: float) -> dict[str, Any]:
  now = time.time()
  own = _proc_start("self")
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "pid_scope": _pid_scope(),
    "pid_start": own[1] if own else None,
    "job": next((f"{v}={os.environ[v]}" for v in _JOB_VARS if os.environ.get(v)), None),
    "started": _utc(now),
    "renewed": _utc(now),
    "expires_at": _utc(now + ttl_s),
    "ttl_s": ttl_s,
  }


def _encode(record: dict[str, Any]) -> bytes:
  return (json.dumps(record, indent=1) + "\n").encode("utf-8")


def describe(record: dict[str, Any] | None) -> str:
  """The holder in a few words: host, pid, job, start time, expiry."""
  if record is None:
    return "an unreadable lease file"
  job = f", job {record['job']}" if record.get("job") else ""
  return (
    f"host {record.get('host')}, pid {record.get('pid')}{job}, started "
    f"{record.get('started')}, lease expires {record.get('expires_at')}"
  )


def _read(path: str) -> tuple[str | None, dict[str, Any] | None]:
  """(generation, record) of the lease file, read consistently; (None, None) when absent. The
  record is None when the file is not a lease (not JSON, keys missing)."""
  while True:
    generation = paths.generation(path)
    if generation is None:
      return None, None
    try:
      text = paths.read_text(path)
    except FileNotFoundError:
      continue
    if paths.generation(path) != generation:  # rewritten between the two reads
      continue
    try:
      record = json.loads(text)
      _seconds(record["expires_at"])
      float(record["ttl_s"])
      record["pid"]  # pylint: disable=pointless-statement
    except (ValueError, KeyError, TypeError):
      record = None
    return generation, record


# ----------------------------------------------------------------------------- holding
class Lease:
  """The lease of a run on its workdir; `check` at step boundaries, `release` at the end.

  Process 0 of a run holds the file; the other processes of a multi-host run hold a follower
  (`path` None) that only takes part in the agreement of `check`.
  """

  def __init__(
    self,
    workdir: str,
    path: str | None,
    record: dict[str, Any] | None,
    generation: str | None,
    ttl_s: float,
    deadline: float,
  ):
    self.workdir, self.path, self.record, self.generation = workdir, path, record, generation
    self.ttl_s = ttl_s
    self._deadline = deadline  # monotonic: the last successful renewal + ttl_s
    self._lost: str | None = None  # why this run no longer holds the workdir
    self._failure: str | None = None  # the latest renewal error, while renewals fail
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = None
    if path is not None:
      self._thread = threading.Thread(target=self._renew_every, name="lease-renewal", daemon=True)
      self._thread.start()

  @property
  def holds_file(self) -> bool:
    return self.path is not None

  def _renew_every(self) -> None:
    while not self._stop.wait(self.ttl_s / 3):
      self.renew()

  def renew(self) -> None:
    """Rewrites the lease with a new expiry, on condition that nobody else wrote it."""
    with self._lock:
      if self._lost is not None or self.generation is None:
        return
      started = time.monotonic()
      now = time.time()
      record = dict(self.record, renewed=_utc(now), expires_at=_utc(now + self.ttl_s))
      try:
        generation = paths.replace_if_generation(self.path, _encode(record), self.generation)
      except Exception as e:  # pylint: disable=broad-except  # storage unreachable: next time
        if self._failure is None:
          logging.warning("cannot renew the lease %s: %s: %s", self.path, type(e).__name__, e)
        self._failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        return
      if generation is None:
        _, holder = _read(self.path)
        self._lost = (
          f"lost the workdir {self.workdir}: its lease was taken over by another run "
          f"({describe(holder)})"
          if holder is not None
          else f"lost the workdir {self.workdir}: its lease file {self.path} was removed"
        )
        logging.error("%s", self._lost)
        return
      self.generation, self.record = generation, record
      self._deadline = started + self.ttl_s
      self._failure = None

  def problem(self, saving: bool = False) -> str | None:
    """Why this run must stop writing to its workdir now (None: it holds the lease). With
    `saving`, the lease is renewed first, so that a save starts with a proven hold."""
    if not self.holds_file:
      return None
    if self._lost is None and (saving or time.monotonic() > self._deadline):
      self.renew()
    if self._lost is None and time.monotonic() > self._deadline:
      return (
        f"cannot renew the lease of workdir {self.workdir} for {self.ttl_s:.0f} s "
        f"({self._failure}); another run may take the workdir over"
      )
    return self._lost

  def check(self, step: int, saving: bool = False) -> None:
    """Raises LeaseError when the run must stop at this step boundary without writing more.

    One process: at every step boundary; with `saving`, right before a checkpoint save, the
    lease renewed first. Several processes: right before each save only, where process 0 tells
    the others (between saves they could not all stop at the same step without a collective).
    """
    import jax  # pylint: disable=g-import-not-at-top

    if jax.process_count() == 1:
      reason = self.problem(saving)
    elif not saving:
      return
    else:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      import numpy as np  # pylint: disable=g-import-not-at-top

      reason = self.problem(saving)
      if not int(multihost_utils.broadcast_one_to_all(np.int32(reason is not None))):
        return
      reason = reason or f"process 0 lost the lease of workdir {self.workdir}"
    if reason is not None:
      raise LeaseError(
        f"{reason}: stopped at step {step} without saving (this run no longer owns its workdir)"
      )

  def release(self) -> None:
    """Stops the renewals and removes the lease file, unless another run holds it now."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    with self._lock:
      if self._lost is not None:
        return
      try:
        if not paths.delete_if_generation(self.path, self.generation):
          logging.warning("lease %s was rewritten by another run; left to it", self.path)
      except Exception as e:  # pylint: disable=broad-except  # it expires by itself
        logging.warning("cannot remove the lease %s (%s); it expires by itself", self.path, e)
      self.generation = None

  def __enter__(self) -> "Lease":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire(
  workdir: str,
  ttl_s: float = DEFAULT_TTL_S,
  should_stop: Callable[[], bool] = lambda: False,
  poll_s: float = 1.0,
) -> Lease | None:
  """Takes the workdir's lease for this process (see the module docstring); None when
  `should_stop` turned True while waiting for another host's lease to expire.

  Raises:
    LeaseError: a live run holds the workdir (one line naming it); nothing was written.
  """
  workdir = os.fspath(workdir)
  path = paths.join(workdir, LEASE_FILE)
  scope = _pid_scope()
  watched = None  # (generation, monotonic time first seen) of a lease that cannot be checked
  while True:
    record = _new_record(ttl_s)
    started = time.monotonic()
    generation = paths.create_if_absent(path, _encode(record))
    if generation is not None:
      return Lease(workdir, path, record, generation, ttl_s, started + ttl_s)
    seen, holder = _read(path)
    if seen is None:
      continue  # released in the meantime: create it again
    why = None  # why the lease may be taken over
    if holder is not None and scope is not None and holder.get("pid_scope") == scope:
      if _alive(holder):
        raise _in_use(workdir, holder)
      why = f"its process {holder['pid']} on this host is gone"
    elif holder is not None and time.time() > _seconds(holder["expires_at"]) + SKEW_MARGIN_S:
      why = f"it expired at {holder['expires_at']}"
    else:
      holder_ttl = float(holder["ttl_s"]) if holder is not None else ttl_s
      if watched is not None and watched[0] != seen:
        raise _in_use(workdir, holder)  # renewed (or taken) while watched: a live writer
      if watched is None:
        watched = (seen, time.monotonic())
        logging.warning(
          "workdir %s is held by %s (another host): waiting up to %.0f s for it to renew the "
          "lease (then this run is refused) or to let it lapse (then this run takes over)",
          workdir,
          describe(holder),
          holder_ttl + SKEW_MARGIN_S,
        )
      if time.monotonic() - watched[1] > holder_ttl + SKEW_MARGIN_S:
        why = f"it was not renewed for {holder_ttl + SKEW_MARGIN_S:.0f} s"
    if why is None:
      if should_stop():
        return None
      time.sleep(poll_s)
      continue
    generation = paths.replace_if_generation(path, _encode(record), seen)
    if generation is not None:
      logging.warning(
        "took over the lease of workdir %s from %s: %s", workdir, describe(holder), why
      )
      return Lease(workdir, path, record, generation, ttl_s, started + ttl_s)
    # Another newcomer won the take-over (or the holder renewed): judge the new holder.


def _in_use(workdir: str, holder: dict[str, Any] | None) -> LeaseError:
  return LeaseError(
    f"workdir {workdir} is in use by another run ({describe(holder)}); not starting a second "
    "run on it: wait for that run to end, stop it, or choose another --workdir"
  )


def hold(
  workdir: str,
  ttl_s: float = DEFAULT_TTL_S,
  should_stop: Callable[[], bool] = lambda: False,
) -> Lease | None:
  """`acquire` on process 0; every process of a multi-host run learns the outcome (the others
  get a follower lease). None when process 0 stopped waiting (`should_stop`)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return acquire(workdir, ttl_s, should_stop)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  lease, error, outcome = None, None, 0  # 0 held, 1 refused or failed, 2 stopped
  if jax.process_index() == 0:
    try:
      lease = acquire(workdir, ttl_s, should_stop)
      outcome = 0 if lease is not None else 2
    except Exception as e:  # pylint: disable=broad-except  # re-raised after the others know
      error, outcome = e, 1
  outcome = int(multihost_utils.broadcast_one_to_all(np.int32(outcome)))
  if error is not None:
    raise error
  if outcome == 1:
    raise LeaseError(f"process 0 could not take the lease of workdir {workdir} (see its log)")
  if outcome == 2:
    return None
  return lease or Lease(os.fspath(workdir), None, None, None, ttl_s, float("inf"))
