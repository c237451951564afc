"""Kill/restart fault injection for the trainer (issue 14, deliver 6).

The harness starts the real CLI (`python -m medvl_jax.main ...`), SIGKILLs it at seeded random
moments, restarts the same command until it finishes and compares the final checkpoint leaf by
leaf, bit for bit, with that of an uninterrupted run of the same command. Each kill is one of:

  time     a random time in start-up (imports, data, restore, compile): uniform up to the
           previous launch's time to its first step (at first the uninterrupted run's), at the
           latest when the launch logs its first step;
  step     a random delay (0-0.3 s) after step (newest checkpoint + 1..4) is logged
           (training, evaluation, an async save or the end of the run);
  save     while Orbax's temporary step directory `<step>.orbax-checkpoint-tmp*` exists in
           `<workdir>/checkpoints`, i.e. while an async checkpoint is being written: during
           the launch's 1st, 2nd or 3rd save, a random 0-50 ms after it appears or at once.

A kill "hit a save in progress" when a temporary step directory that the launch created is
still there after the process died (the save could not have completed). Used by
tests/end_to_end/test_faults.py (marker `slow`); also a command line for longer campaigns:

  PYTHONPATH=. python -m tests.faults --kills=20 --seed=1 --out=/tmp/faults
"""

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TMP_MARK = ".orbax-checkpoint-tmp"
_STEP_LINE = re.compile(r"\] step (\d+)/(\d+) \|")
MODES = ("time", "step", "save")


@dataclasses.dataclass
class Launch:
  """One start of the command: how it ended and where its output is."""

  index: int
  mode: str  # a kill mode, or 'none' for a launch left to finish
  killed: bool
  returncode: int | None
  seconds: float
  last_step_logged: int
  hit_save: bool  # killed while an async checkpoint of this launch was being written
  log: str  # stdout and stderr of the launch


@dataclasses.dataclass
class Report:
  seed: int
  launches: list[Launch] = dataclasses.field(default_factory=list)
  failures: list[str] = dataclasses.field(default_factory=list)
  mismatches: list[str] = dataclasses.field(default_factory=list)
  final_step: int | None = None
  seconds: float = 0.0

  @property
  def kills(self) -> int:
    return sum(l.killed for l in self.launches)

  @property
  def kills_in_save(self) -> int:
    return sum(l.killed and l.hit_save for l in self.launches)

  @property
  def ok(self) -> bool:
    return not self.failures and not self.mismatches and self.final_step is not None

  def summary(self) -> dict:
    by_mode = collections.Counter(l.mode for l in self.launches if l.killed)
    return {
      "seed": self.seed,
      "ok": self.ok,
      "kills": self.kills,
      "kills_in_save": self.kills_in_save,
      "kills_by_mode": dict(sorted(by_mode.items())),
      "launches": len(self.launches),
      "final_step": self.final_step,
      "seconds": round(self.seconds, 1),
      "failures": self.failures,
      # per launch: mode, last step logged, exit code ('-9' = killed), '+save' = hit a save
      "schedule": [
        f"{l.mode}@{l.last_step_logged}:{l.returncode}{'+save' if l.hit_save else ''}"
        for l in self.launches
      ],
      "mismatch_count": len(self.mismatches),
      "mismatches": self.mismatches[:20],
    }


def command(args, module: str = "medvl_jax.main") -> list[str]:
  return [sys.executable, "-m", module, *args]


def _ckpt_dir(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / "checkpoints"


def _tmp_dirs(workdir: pathlib.Path) -> set[tuple[str, int, int]]:
  """Orbax's temporary step directories, by (name, inode, ctime): a leftover of an earlier
  kill that Orbax removes and re-creates to save the same step again counts as new."""
  d = _ckpt_dir(workdir)
  out = set()
  try:
    for p in d.iterdir():
      if TMP_MARK in p.name:
        try:
          st = p.stat()
        except FileNotFoundError:
          continue
        out.add((p.name, st.st_ino, st.st_ctime_ns))
  except FileNotFoundError:
    pass
  return out


def latest_step(workdir: pathlib.Path) -> int:
  """The newest finalized step directory (0 if none); Orbax renames a step dir when complete."""
  d = _ckpt_dir(workdir)
  try:
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()]
  except FileNotFoundError:
    return 0
  return max(steps, default=0)


def _last_logged_step(log: pathlib.Path) -> int:
  try:
    text = log.read_text(errors="replace")
  except FileNotFoundError:
    return 0
  steps = [int(m.group(1)) for m in _STEP_LINE.finditer(text)]
  return max(steps, default=0)


class _LogWatch:
  """The highest step logged so far in a launch's log, read incrementally."""

  def __init__(self, log: pathlib.Path):
    self.log, self.offset, self.rest, self.step = log, 0, b"", 0

  def poll(self) -> int:
    try:
      with open(self.log, "rb") as f:
        f.seek(self.offset)
        data = f.read()
    except FileNotFoundError:
      return self.step
    self.offset += len(data)
    *lines, self.rest = (self.rest + data).split(b"\n")
    for line in lines:
      m = _STEP_LINE.search(line.decode("utf-8", errors="replace"))
      if m:
        self.step = max(self.step, int(m.group(1)))
    return self.step


def launch(
  args,
  log: pathlib.Path,
  *,
  module: str = "medvl_jax.main",
  env: dict | None = None,
  cwd: pathlib.Path = REPO,
) -> subprocess.Popen:
  """Starts the command in its own process group, stdout and stderr into `log`."""
  full_env = dict(os.environ, **(env or {}))
  full_env["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p
  )
  with open(log, "wb") as f:
    return subprocess.Popen(
      command(args, module),
      cwd=cwd,
      env=full_env,
      stdout=f,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )


def _kill(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)  # the group this harness started for the launch
  except ProcessLookupError:
    pass
  proc.wait()


def run_uninterrupted(
  workdir: pathlib.Path, args, log: pathlib.Path, timeout: float = 600, **kw
) -> tuple[int, float, float]:
  """Runs the command to the end: (exit code, seconds, seconds until the first step line)."""
  t0 = time.monotonic()
  proc = launch(args, log, **kw)
  t_first, watch = None, _LogWatch(log)
  while proc.poll() is None:
    if t_first is None and watch.poll() > 0:
      t_first = time.monotonic() - t0
    if time.monotonic() - t0 > timeout:
      _kill(proc)
      break
    time.sleep(0.05)
  total = time.monotonic() - t0
  return proc.returncode, total, t_first if t_first is not None else total


def run_with_kills(
  workdir: pathlib.Path,
  args,
  *,
  kills: int,
  seed: int,
  total_steps: int,
  startup_s: float,
  logs: pathlib.Path,
  modes: tuple[str, ...] = MODES,
  weights: tuple[float, ...] = (0.2, 0.4, 0.4),
  step_window: tuple[int, int] = (1, 4),
  module: str = "medvl_jax.main",
  restart_module: str | None = None,
  env: dict | None = None,
  launch_timeout: float = 300,
  max_launches: int | None = None,
) -> Report:
  """Kills the command `kills` times at seeded random moments, restarting it each time, then
  lets it finish. `restart_module` (default `module`) runs every launch after the first: the
  hook through which tests break resume on purpose. A `step` kill fires after step
  newest checkpoint + randint(*step_window) is logged. The report lists each launch; `failures`
  holds launches that ended on their own with a non-zero code, or hung."""
  rng = random.Random(seed)
  report = Report(seed=seed)
  logs.mkdir(parents=True, exist_ok=True)
  max_launches = max_launches or 3 * kills + 5
  t_start = time.monotonic()
  warm_startup = None  # seconds to the first step of the latest launch that got there
  wmodes = [m for m in MODES if m in modes]
  wweights = [w for m, w in zip(MODES, weights) if m in modes]
  while len(report.launches) < max_launches:
    i = len(report.launches)
    done = latest_step(workdir)
    mode = rng.choices(wmodes, wweights)[0] if report.kills < kills else "none"
    if mode != "none" and done >= total_steps:
      mode = "none"  # the run is complete: nothing left to interrupt
    # Drawn before the launch, so the schedule depends only on the seed and the progress.
    target = min(total_steps, done + rng.randint(*step_window))
    delay = rng.uniform(0.0, 0.3)
    startup_at = rng.random() * (warm_startup or startup_s)
    save_delay = rng.choice([0.0, rng.uniform(0.0, 0.05)])
    nth_save = rng.randint(1, 3)  # earlier saves of the launch complete: the run progresses
    saves_seen = set()
    log = logs / f"launch_{i:02d}.log"
    before_tmp = _tmp_dirs(workdir)
    mod = module if i == 0 or restart_module is None else restart_module
    t0 = time.monotonic()
    proc = launch(args, log, module=mod, env=env)
    watch = _LogWatch(log)
    killed, hit_save, first_at = False, False, None
    while proc.poll() is None:
      now = time.monotonic() - t0
      logged = watch.poll()
      if logged and first_at is None:
        first_at = now
      if now > launch_timeout:
        _kill(proc)
        report.failures.append(f"launch {i} ({mode}) hung for more than {launch_timeout:.0f} s")
        break
      fire = False
      if mode == "time":
        fire = now >= startup_at or logged > 0  # at the latest at the launch's first step
      elif mode == "step":
        fire = logged >= target
        if fire:
          time.sleep(delay)
      elif mode == "save":
        writing = _tmp_dirs(workdir) - before_tmp
        saves_seen |= {name for name, _, _ in writing}
        fire = bool(writing) and len(saves_seen) >= nth_save
        if fire and save_delay:
          time.sleep(save_delay)
      if fire:
        _kill(proc)
        killed = proc.returncode == -signal.SIGKILL
        hit_save = bool(_tmp_dirs(workdir) - before_tmp)
        break
      time.sleep(0.005 if mode == "save" else 0.02)
    seconds = time.monotonic() - t0
    proc.wait()
    if first_at is not None:
      warm_startup = first_at
    report.launches.append(
      Launch(
        index=i,
        mode=mode if killed else "none",
        killed=killed,
        returncode=proc.returncode,
        seconds=round(seconds, 2),
        last_step_logged=_last_logged_step(log),
        hit_save=hit_save,
        log=str(log),
      )
    )
    if report.failures:
      break
    if not killed:
      if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        report.failures.append(f"launch {i} exited {proc.returncode}: {tail[0][:300]}")
        break
      if latest_step(workdir) >= total_steps:
        break
  else:
    report.failures.append(f"not finished after {max_launches} launches")
  report.seconds = time.monotonic() - t_start
  step = latest_step(workdir)
  report.final_step = step if step >= total_steps and not report.failures else None
  return report


# ----------------------------------------------------------------------------- comparison
def _flat(tree) -> dict[str, object]:
  import jax

  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def compare_checkpoints(ref: pathlib.Path, got: pathlib.Path, step: int) -> list[str]:
  """Every leaf of the train state (params, batch_stats, optimizer state, step) and the data
  item of checkpoint `step` in both workdirs, restored with the project's checkpoint module:
  the differences (empty = bit-identical: same tree, dtypes, shapes and bytes)."""
  import numpy as np

  from medvl_jax.ckpt import checkpoint

  def load(workdir):
    mngr = checkpoint.manager(workdir, read_only=True)
    try:
      if step not in mngr.all_steps():
        return None
      return mngr.restore(step)
    finally:
      mngr.close()

  a, b = load(ref), load(got)
  if a is None or b is None:
    return [f"step {step} missing in {'reference' if a is None else 'interrupted'} run"]
  out = []
  if a["data"] != b["data"]:
    out.append(f"data item: {a['data']} != {b['data']}")
  fa, fb = _flat(a["state"]), _flat(b["state"])
  for k in sorted(set(fa) ^ set(fb)):
    out.append(f"{k}: only in {'reference' if k in fa else 'interrupted'} run")
  n_diff = 0
  for k in sorted(set(fa) & set(fb)):
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    if x.dtype != y.dtype or x.shape != y.shape:
      out.append(f"{k}: {x.dtype}{x.shape} != {y.dtype}{y.shape}")
    elif x.tobytes() != y.tobytes():
      n_diff += 1
      diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
      out.append(
        f"{k}: {int((x != y).sum())} of {x.size} values differ (max |diff| {diff.max():g})"
      )
  if not fa:
    out.append("empty train state")
  return out


def check(report: Report, ref: pathlib.Path, workdir: pathlib.Path, step: int) -> Report:
  if report.final_step is not None:
    report.mismatches = compare_checkpoints(ref, workdir, step)
  return report


# ----------------------------------------------------------------------------- command line
def smoke_args(workdir, tfds_dir, total_steps: int, checkpoint_every: int = 2) -> list[str]:
  """The smoke config, shortened: a checkpoint (and evaluation) every `checkpoint_every` steps,
  everything logged at DEBUG (absl --verbosity=1)."""
  return [
    "--config=configs/convirt.py:smoke",
    f"--workdir={workdir}",
    f"--config.data.data_dir={tfds_dir}",
    f"--config.total_steps={total_steps}",
    f"--config.checkpoint_every={checkpoint_every}",
    f"--config.eval_every={checkpoint_every}",
    "--config.keep_checkpoints=2",
    "--verbosity=1",
  ]


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--kills", type=int, default=20)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--total_steps", type=int, default=0, help="default: 3 * kills, at least 30")
  ap.add_argument("--out", type=pathlib.Path, required=True, help="a new or empty directory")
  ap.add_argument("--tfds_dir", type=pathlib.Path, default=None, help="default: <out>/tfds")
  ns = ap.parse_args()
  total = ns.total_steps or max(30, 3 * ns.kills)
  out = ns.out.absolute()
  tfds = (ns.tfds_dir or out / "tfds").absolute()
  out.mkdir(parents=True, exist_ok=True)
  ref, got = out / "reference", out / f"killed_seed{ns.seed}"
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if latest_step(ref) < total:
    rc, secs, first = run_uninterrupted(ref, smoke_args(ref, tfds, total), out / "reference.log")
    if rc != 0:
      print(f"error: the uninterrupted run failed (exit {rc}); see {out / 'reference.log'}")
      return 1
    (out / "reference.json").write_text(json.dumps({"seconds": secs, "startup_s": first}))
  startup_s = json.loads((out / "reference.json").read_text())["startup_s"]
  report = run_with_kills(
    got,
    smoke_args(got, tfds, total),
    kills=ns.kills,
    seed=ns.seed,
    total_steps=total,
    startup_s=startup_s,
    logs=out / f"logs_seed{ns.seed}",
  )
  check(report, ref, got, total)
  print(json.dumps(report.summary(), indent=2))
  return 0 if report.ok else 1


if __name__ == "__main__":
  sys.exit(main())
