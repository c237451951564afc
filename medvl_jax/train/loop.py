"""The training loop, top to bottom in the order data flows.

  SIGTERM handler -> config check -> finished run? -> mesh -> input -> model & optimizer
  -> shardings & state -> update step -> checkpoint restore -> evaluation
  -> loop (non-finite policy, log, eval, checkpoint, preemption)

`train_step` and `eval_step` are pure functions of (state, batch) jitted with explicit
shardings; everything else here is the plumbing around them. `train_step` never applies a
non-finite update; the loop reads each step's `skipped` flag once the step is done (never
stalling the devices) and applies `config.nonfinite` (see `_NonFiniteGuard`).

Host overhead (bench/host_overhead.py): a background thread reads, tokenises and puts the next
batches on the devices while a step runs (`_Prefetcher`); the loop itself waits for the devices
only at evaluations, checkpoints, preemption and the end (see `_train_loop`).
"""

import collections
import math
import queue
import signal
import threading
import time

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np

from medvl_jax import config_check
from medvl_jax.ckpt import checkpoint, run_dir
from medvl_jax.data import sources, streams
from medvl_jax.data import tokenizer as tokenizer_lib
from medvl_jax.errors import ConfigError, NonFiniteError
from medvl_jax.parallel import sharding
from medvl_jax.train import program
from medvl_jax.train import step as step_lib


# ----------------------------------------------------------------------------- evaluation
def evaluate(eval_fn, state, config, tokenizer, mesh) -> dict[str, float]:
  """val_<metric>: the mean over the real (unpadded) rows of the eval split."""
  totals = {}
  for local in streams.create_eval_iterator(
    config,
    tokenizer,
    config.data.eval_split,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    out = jax.device_get(eval_fn(state, sharding.to_global(local, mesh)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop("count", 0.0), 1.0)
  return {f"val_{k.removesuffix('_sum')}": v / count for k, v in totals.items()}


class MeanMetrics:
  """Running means of the step metrics: the steps' device arrays are kept as they come (no
  device work and no host sync per step) and fetched in one transfer per log window.

  Steps the non-finite guard skipped (`skipped` = 1, other metrics zeroed by the step) are
  left out of the means; a window of skipped steps only gives no means at all.
  """

  def __init__(self):
    self.window = []

  def add(self, metrics: dict) -> None:
    self.window.append(metrics)

  def take(self) -> list[dict]:
    """The window so far (still on the devices); the next one starts empty."""
    window, self.window = self.window, []
    return window

  @staticmethod
  def means(window: list[dict]) -> dict[str, float]:
    """Waits for the window's steps and fetches their metrics at once."""
    if not window:
      return {}
    fetched = jax.device_get(window)
    sums = {k: float(np.sum([m[k] for m in fetched], dtype=np.float64)) for k in fetched[0]}
    n = len(window) - sums.pop("skipped", 0.0)
    return {k: v / n for k, v in sums.items()} if n > 0 else {}


# Steps the host may dispatch ahead of the last one whose non-finite flag it has read; beyond
# that it waits (back-pressure: bounded device memory for queued batches and metrics).
_MAX_AHEAD = 2


class _Prefetcher:
  """`make()` (the next global batch, on the devices) run ahead by a background thread.

  Holds at most `depth` batches; an exception in `make` is raised again by `next()` in the
  caller's thread (same type, same message). `close()` stops the thread (daemon: it never
  holds up the interpreter's exit).
  """

  def __init__(self, make, depth: int = 2):
    self._make = make
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="medvl-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    while not self._stop.is_set():
      try:
        item = (True, self._make())
      except BaseException as e:  # pylint: disable=broad-except  # handed to the consumer
        self._put((False, e))
        return
      if not self._put(item):
        return

  def next(self):
    ok, value = self._queue.get()
    if not ok:
      raise value
    return value

  def close(self) -> None:
    self._stop.set()
    while True:  # unblock a put in progress; the batches are dropped
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5.0)


# ----------------------------------------------------------------------------- helpers
def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _Preemption:
  """SIGTERM (as sent by schedulers before preemption) -> save at the next step and stop.

  Installed first thing in `train_and_evaluate`: a SIGTERM during data preparation, model
  building or compilation ends the run after that stage with one line and exit 0 (not 143).
  """

  def __init__(self):
    self.requested = False
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: checkpointing at the next step, then stopping.")
    self.requested = True


class _SaveLog:
  """'saved checkpoint N (async, x.x s)' once Orbax has finalised an async save.

  x.x runs from the `save` call (which includes the blocking device-to-host copy) to Orbax's
  post-finalisation callback (the step's files written, just before the rename into place).
  The line is logged at the first step boundary after that, or when the run waits for it.
  """

  def __init__(self):
    self.pending, self.finalised_at = None, None

  def finalised(self) -> None:  # Orbax's background thread
    self.finalised_at = time.perf_counter()

  def started(self, step: int) -> None:
    self.pending, self.finalised_at = (step, time.perf_counter()), None

  def poll(self, mngr, wait: bool = False) -> None:
    if self.pending is None:
      return
    if wait:
      checkpoint.wait_until_saved(mngr)  # CheckpointError (one line) if the save failed
    elif mngr.is_saving_in_progress():
      return
    step, t0 = self.pending
    t1 = self.finalised_at or time.perf_counter()
    logging.info("saved checkpoint %d (async, %.1f s)", step, t1 - t0)
    self.pending = None


class _Halt(Exception):
  """Internal: the non-finite policy stops the run (`reason` names the step)."""


class _NonFiniteGuard:
  """`config.nonfinite` on the host. The jitted step already refuses every non-finite update
  (the state is unchanged); this counts those skipped steps and decides when to stop:
    'halt': at the first one;
    'skip': go on, unless `config.nonfinite_max_consecutive` steps in a row were skipped.
  The loop resolves the steps in order as their flags arrive (without waiting for them, at
  most `_MAX_AHEAD` steps late) and all of them before any evaluation or checkpoint, so the
  outcome is exact: the same steps counted, the same step named, the same last good
  checkpoint; only the updates of the (at most `_MAX_AHEAD`) steps already dispatched after
  a halting one are computed, and discarded with the run's unsaved state.
  """

  def __init__(self, config: ml_collections.ConfigDict, skipped_before: int):
    self.policy = config.nonfinite
    self.limit = int(config.nonfinite_max_consecutive)
    self.total, self.streak = skipped_before, 0

  def resolve(self, step: int, skipped: bool, loss: float, grad_norm: float) -> None:
    if not skipped:
      self.streak = 0
      return
    self.total += 1
    self.streak += 1
    logging.warning(
      "step %d: non-finite loss (%s) or gradient norm (%s): update not applied "
      "(%d skipped in a row, %d in total; config.nonfinite=%r)",
      step,
      loss,
      grad_norm,
      self.streak,
      self.total,
      self.policy,
    )
    if self.policy == "halt":
      raise _Halt(f"non-finite loss/gradient at step {step} (config.nonfinite='halt')")
    if self.streak >= self.limit:
      raise _Halt(
        f"non-finite loss/gradient at steps {step - self.streak + 1}-{step} ({self.streak} in a "
        f"row = config.nonfinite_max_consecutive)"
      )


# ----------------------------------------------------------------------------- main entry
def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, restart_from_scratch: bool = False
) -> dict[str, float]:
  """Trains (or resumes) in `workdir`; returns the last logged train and eval metrics.

  `restart_from_scratch` sets the workdir's checkpoints and logs aside and starts afresh
  (otherwise a workdir with checkpoints is resumed, and a config that does not fit it refused).
  Raises NonFiniteError when `config.nonfinite` stops the run (nothing non-finite is saved).
  """
  preemption = _Preemption()  # first: a SIGTERM during set-up or compile ends the run cleanly
  config_check.check(config)  # every name, choice and value, before anything is read or written
  workdir = config_check.check_workdir(workdir)  # preflight: creatable and writable
  is_chief = jax.process_index() == 0
  saves = _SaveLog()
  if not restart_from_scratch:
    run_dir.check_resumable(workdir, config)  # the run's identity: refused before any write
    done = checkpoint.latest_intact_step(workdir)
    if done is not None and done >= config.total_steps:  # before any data, model or compile work
      logging.info("run already complete at step %d (workdir %s); nothing to do", done, workdir)
      return {}

  # Mesh.
  mesh = sharding.make_mesh(axes=config.get("mesh", sharding.DEFAULT_AXES))
  sharding.check_batch_size(config.batch_size, mesh)
  logging.info(
    "mesh: %d devices (%s) over %d processes, %s",
    mesh.devices.size,
    jax.devices()[0].platform,
    jax.process_count(),
    " ".join(f"{a}={n}" for a, n in mesh.shape.items()),
  )

  # Model, loss, optimizer, sharded abstract state and update step (program.py; the same
  # program `--compile_only` compiles).
  prog = program.build(config, mesh)
  family, model, loss_fn, mask = prog.family, prog.model, prog.loss_fn, prog.mask
  init_fn, init_rng, abstract_vars = prog.init_fn, prog.init_rng, prog.abstract_vars
  make_state, state_sharding = prog.make_state, prog.state_sharding
  abstract_state = prog.abstract_state
  config_check.check_disk(workdir, abstract_state)  # preflight: room for two checkpoints

  # Input: the sample is prepared on first use; the tokenizer comes from the text checkpoint.
  sources.prepare(config)
  if preemption.requested:
    return _stop_during_setup("data preparation")
  config_check.check_batch_fits(config)  # preflight: batch <= split (split sizes known now)
  tokenizer = tokenizer_lib.from_config(config)

  # The config is valid and fits the run: only now is <workdir>/config.json (re)written.
  if is_chief:
    if restart_from_scratch and (aside := run_dir.restart_from_scratch(workdir)):
      logging.warning("--restart_from_scratch: set the previous run aside in %s", aside)
    run_dir.write_run_config(workdir, config)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("medvl_jax: workdir ready")

  # Checkpoint restore (the newest good step), else fresh init (+ pretrained weights).
  mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints, on_commit=saves.finalised)
  skipped_before = 0
  restored = checkpoint.restore_newest_good(mngr, abstract_state, workdir)
  if restored is not None:
    _, state, data_state = restored
    if data_state.get("seed") != config.seed:
      raise ConfigError(
        f"config.seed={config.seed} differs from the seed "
        f"{data_state.get('seed')} of the run being resumed in {workdir}"
      )
    start_step = int(data_state["batches_consumed"])
    skipped_before = int(data_state.get("skipped_steps", 0))
    logging.info("resumed from checkpoint step %d in %s", start_step, mngr.directory)
  else:
    var_sharding = {"params": state_sharding.params}
    if "batch_stats" in abstract_vars:
      var_sharding["batch_stats"] = state_sharding.batch_stats
    variables = jax.jit(init_fn, out_shardings=var_sharding)(init_rng)  # born sharded
    if family.has_pretrained(config.model):  # host round trip only when importing weights
      variables = jax.device_put(
        family.init_from_pretrained(jax.device_get(variables), config.model), var_sharding
      )
    state = jax.jit(make_state, out_shardings=state_sharding)(variables)
    start_step = 0

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_train = sum(x.size for x, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask)) if m)
  logging.info(
    "model %s: %.1fM params, %.1fM trainable", config.model.name, n_params / 1e6, n_train / 1e6
  )

  # Update step: jitted with explicit shardings; the old state is donated.
  batch_shard = prog.batch_sharding
  step_fn = prog.jit_step()
  eval_fn = jax.jit(
    lambda st, b: step_lib.eval_step(st, b, model=model, loss_fn=loss_fn),
    in_shardings=(state_sharding, batch_shard),
  )
  # Downstream evaluators (config.evaluators), run at each evaluation; see medvl_jax/evaluate.
  evaluators = []
  if config.evaluators:
    from medvl_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top

    evaluators = evaluate_lib.build_all(model, config, tokenizer)

  train_iter = streams.create_train_iterator(
    config,
    tokenizer,
    start_step=start_step,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  # The next global batches are read, tokenised and put on the devices by a background
  # thread while the devices run the current step (and, first, while the step compiles).
  prefetch = _Prefetcher(lambda: sharding.to_global(next(train_iter), mesh))
  try:
    return _train_loop(
      config,
      workdir=workdir,
      mesh=mesh,
      family=family,
      state=state,
      start_step=start_step,
      skipped_before=skipped_before,
      step_fn=step_fn,
      eval_fn=eval_fn,
      evaluators=evaluators,
      tokenizer=tokenizer,
      prefetch=prefetch,
      mngr=mngr,
      saves=saves,
      preemption=preemption,
      is_chief=is_chief,
    )
  finally:
    prefetch.close()


def _train_loop(
  config,
  *,
  workdir,
  mesh,
  family,
  state,
  start_step,
  skipped_before,
  step_fn,
  eval_fn,
  evaluators,
  tokenizer,
  prefetch,
  mngr,
  saves,
  preemption,
  is_chief,
) -> dict[str, float]:
  """Compile, then the steps: non-finite policy, logging, evaluation, checkpoints, preemption.

  Host syncs: none per step. The host reads a step's non-finite flag once that step is done
  (`is_ready`, never waiting), waits only when it is `_MAX_AHEAD` steps ahead of the devices,
  and fetches the metrics of a log window after it has dispatched the next step; it waits for
  the devices only at evaluations, checkpoints, preemption and the end.
  """
  writer = metric_writers.create_default_writer(
    str(workdir / "tensorboard"), just_logging=not is_chief, asynchronous=True
  )
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})

  # Compile ahead of the loop, so the first progress line already times a real step.
  t0 = time.perf_counter()
  first = prefetch.next()
  step_fn = step_fn.lower(state, first).compile()
  logging.info("compiled the train step in %.1f s", time.perf_counter() - t0)
  if preemption.requested:
    writer.close()
    return _stop_during_setup("model building and compilation", mngr)

  guard = _NonFiniteGuard(config, skipped_before)
  last_train, last_eval = {}, {}
  acc = MeanMetrics()
  t_report, step_report = time.perf_counter(), start_step
  batch = first
  pending = collections.deque()  # (step, metrics) whose `skipped` flag the host has not read
  deferred = None  # (step, metrics of the log window): logged once the next step is dispatched

  def settle(upto: int | None = None, wait: bool = True):
    """Reads the non-finite flags of the pending steps in order (of those up to `upto`; with
    `wait`=False only of those already done); may raise _Halt."""
    while pending and (upto is None or pending[0][0] <= upto):
      s, m = pending[0]
      if not wait and not m["skipped"].is_ready():
        return
      pending.popleft()
      skipped, loss, grad_norm = jax.device_get((m["skipped"], m["raw_loss"], m["raw_grad_norm"]))
      guard.resolve(s, bool(skipped), float(loss), float(grad_norm))

  def log_train(s: int, window: list) -> None:
    nonlocal last_train, t_report, step_report
    settle(upto=s)  # the window's skipped steps are counted in the line
    last_train = {f"train_{k}": v for k, v in MeanMetrics.means(window).items()}
    now = time.perf_counter()
    sec_per_step = (now - t_report) / (s - step_report)
    t_report, step_report = now, s
    writer.write_scalars(s, dict(last_train, sec_per_step=sec_per_step, skipped_steps=guard.total))
    loss = last_train.get("train_loss")
    logging.info(
      "step %d/%d | loss %s | %.2f s/step | %.1f examples/s | ETA %s%s",
      s,
      config.total_steps,
      "n/a (skipped)" if loss is None else f"{loss:.4f}",
      sec_per_step,
      config.batch_size / sec_per_step,
      _fmt_duration(sec_per_step * (config.total_steps - s)),
      f" | {guard.total} skipped (non-finite)" if guard.total else "",
    )

  step, unhealthy = start_step, None
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      if batch is None:
        batch = prefetch.next()
      state, metrics = step_fn(state, batch)
      batch = None
      checkpoint.check_saved(mngr, step)  # a failed async save (full disk) stops the run here
      pending.append((step, metrics))
      acc.add({k: v for k, v in metrics.items() if not k.startswith("raw_")})
      if deferred is not None:  # the previous window's figures: the devices run this step
        log_train(*deferred)
        deferred = None
      settle(wait=False)  # the flags of the steps already done
      settle(upto=step - _MAX_AHEAD)  # back-pressure: at most _MAX_AHEAD steps in flight
      saves.poll(mngr)

      stop = preemption.requested or mngr.reached_preemption(step)
      log_now = step % config.log_every == 0 or step == config.total_steps or step == start_step + 1
      eval_now = step % config.eval_every == 0 or step == config.total_steps
      ckpt_now = step % config.checkpoint_every == 0 or step == config.total_steps or stop
      if eval_now or ckpt_now:
        settle()  # every step up to this one: the state is final
      if log_now:
        if eval_now or ckpt_now:
          log_train(step, acc.take())
        else:
          deferred = (step, acc.take())
      unhealthy = f"step {step} was skipped (non-finite)" if guard.streak else None

      val_loss = None
      if eval_now:
        t_eval = time.perf_counter()
        last_eval = evaluate(eval_fn, state, config, tokenizer, mesh)
        if evaluators:
          from medvl_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top

          last_eval.update(evaluate_lib.run_all(evaluators, state))
        t_report += time.perf_counter() - t_eval  # the train rate excludes evaluation time
        val_loss = last_eval["val_loss"]
        writer.write_scalars(step, last_eval)
        logging.info(
          "step %d | validation loss %.4f%s",
          step,
          val_loss,
          "".join(f" | {k} {last_eval[f'val_{k}']:.3f}" for k in family.summary_metrics),
        )
        if not math.isfinite(val_loss):
          unhealthy = f"validation loss {val_loss} at step {step}"
          if config.nonfinite == "halt":
            raise _Halt(f"non-finite validation loss at step {step} (config.nonfinite='halt')")

      if ckpt_now:
        if unhealthy:  # never save a state that gives non-finite values
          logging.warning("no checkpoint at step %d: %s", step, unhealthy)
        else:
          saves.poll(mngr, wait=True)  # the previous save's line first (save() waits anyway)
          checkpoint.save(
            mngr,
            step,
            state,
            {"batches_consumed": step, "seed": config.seed, "skipped_steps": guard.total},
            val_loss=val_loss,
          )
          saves.started(step)
      if stop:
        logging.warning("stopping at step %d for preemption; rerun the command to resume", step)
        break
    settle()
    if deferred is not None:  # not reached: the last step always logs at once
      log_train(*deferred)
    if unhealthy and not preemption.requested:
      raise _Halt(f"the run ended in a non-finite state ({unhealthy})")
  except _Halt as halt:
    saves.poll(mngr, wait=True)
    writer.write_scalars(step, {"skipped_steps": guard.total})
    writer.close()
    good = mngr.latest_step()
    mngr.close()
    raise NonFiniteError(
      f"{halt}; stopped without saving it; last good checkpoint: "
      + (f"step {good} in {mngr.directory}" if good is not None else "none yet")
    ) from None

  saves.poll(mngr, wait=True)
  checkpoint.wait_until_saved(mngr)
  writer.flush()
  writer.close()
  mngr.close()
  return dict(last_train, **last_eval)


def _stop_during_setup(stage: str, mngr=None) -> dict:
  logging.warning(
    "SIGTERM received during %s: stopped before training; nothing new to save "
    "(rerun the command to resume)",
    stage,
  )
  if mngr is not None:
    mngr.close()
  return {}


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
