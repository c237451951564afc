"""Training, top to bottom in the order data flows.

  SIGTERM handler -> config check -> finished run? -> workdir lease -> mesh -> model & optimizer
  -> input -> run directory -> checkpoint restore (or init) -> update and eval steps -> compile
  -> loop (lease, non-finite guard, progress line, evaluation, checkpoint, preemption)
  -> final save -> lease released

`train_step` and `eval_step` (step.py) are pure functions of (state, batch) jitted with
explicit shardings; this module is the plumbing around them. The loop's bookkeeping is in
small objects beside it, one job each: `nonfinite` (the skipped steps and when to stop),
`log_window` (running means and the progress line), `schedule` (what a step is due to do),
`save_log` (the async-save line), `preemption` (SIGTERM), `prefetch` (the next batches, made
by a background thread while a step runs), `validation` (the validation pass).

Host syncs: none per step. The host reads a step's non-finite flag once that step is done
(`is_ready`, never waiting), waits only when it is `nonfinite.MAX_AHEAD` steps ahead of the
devices, and fetches the metrics of a log window after it has dispatched the next step; it
waits for the devices only at evaluations, checkpoints, preemption and the end.
"""

import time

from absl import logging
import jax
import ml_collections

from medvl_jax import config_check, paths
from medvl_jax.ckpt import checkpoint, run_dir
from medvl_jax.ckpt import lease as lease_lib
from medvl_jax.data import sources, streams
from medvl_jax.data import tokenizer as tokenizer_lib
from medvl_jax.errors import ConfigError, NonFiniteError
from medvl_jax.interop import pretrained
from medvl_jax.parallel import sharding
from medvl_jax.train import (
  log_window,
  nonfinite,
  prefetch,
  program,
  save_log,
  summaries,
  validation,
)
from medvl_jax.train import preemption as preemption_lib
from medvl_jax.train import schedule as schedule_lib
from medvl_jax.train import step as step_lib


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  restart_from_scratch: bool = False,
  lease_ttl_s: float = lease_lib.DEFAULT_TTL_S,
) -> dict[str, float]:
  """Trains (or resumes) in `workdir`; returns the last logged train and eval metrics.

  `restart_from_scratch` sets the workdir's checkpoints and logs aside and starts afresh
  (otherwise a workdir with checkpoints is resumed, and a config that does not fit it refused).
  The run holds the workdir's lease (`medvl_jax.ckpt.lease`, renewed every `lease_ttl_s` / 3)
  from before its first write to its end: LeaseError when another live run holds it, or when
  this run loses it (then it stops without saving).
  Raises NonFiniteError when `config.nonfinite` stops the run (nothing non-finite is saved).
  """
  preemption = preemption_lib.Preemption()  # first: a SIGTERM in set-up or compile ends cleanly

  # ----------------------------------------------------------------------------------- config check
  config_check.check(config)  # every name, choice and value, before anything is read or written
  # A finished run says so without its lease: committed steps are read, never written, so a
  # live run (which holds the lease) is not disturbed, and a dead holder's lease does not delay it.
  if not restart_from_scratch and _already_complete(config, workdir):
    return {}
  workdir = config_check.check_workdir(workdir)  # preflight: creatable, writable; leaves nothing

  # ---------------------------------------------------------------------------------- workdir lease
  # One run per workdir: taken before anything is written to it; refused in one line if a live
  # run holds it.
  lease = lease_lib.hold(workdir, lease_ttl_s, should_stop=lambda: preemption.requested)
  if lease is None:
    return preemption_lib.stop_during_setup("the wait for the workdir's lease")
  with lease:
    # Again under the lease: the previous holder may have finished (or changed config.json)
    # while this run waited for it.
    if not restart_from_scratch and _already_complete(config, workdir):
      return {}
    return _train(config, workdir, restart_from_scratch, preemption, lease)


def _already_complete(config: ml_collections.ConfigDict, workdir) -> bool:
  """Whether the run in `workdir` has reached `config.total_steps` (logged); ConfigError when
  `config` cannot resume it. Reads only."""
  config_check.check_resumable(workdir, config)  # the run's identity: refused before any write
  done = checkpoint.latest_intact_step(workdir)
  if done is not None and done >= config.total_steps:  # before any data, model or compile work
    logging.info("run already complete at step %d (workdir %s); nothing to do", done, workdir)
    return True
  return False


def _train(
  config: ml_collections.ConfigDict,
  workdir,
  restart_from_scratch: bool,
  preemption: preemption_lib.Preemption,
  lease: lease_lib.Lease,
) -> dict[str, float]:
  """The run itself, once the workdir's lease is held."""
  is_chief = jax.process_index() == 0
  saves = save_log.SaveLog()

  # ------------------------------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(axes=config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  logging.info(
    "mesh: %d devices (%s) over %d processes, %s",
    mesh.devices.size,
    jax.devices()[0].platform,
    jax.process_count(),
    " ".join(f"{a}={n}" for a, n in mesh.shape.items()),
  )

  # ------------------------------------------------------------------------------ model & optimizer
  # Model, loss, optimizer, sharded abstract state and update step (program.py; the same
  # program `--compile_only` compiles).
  prog = program.build(config, mesh)
  config_check.check_disk(workdir, prog.abstract_state)  # preflight: room for two checkpoints

  # Input: prepared data, only read (a single host prepares the bundled sample on first use);
  # the tokenizer comes from the text checkpoint.
  sources.prepare(config, process_count=jax.process_count())
  if preemption.requested:
    return preemption_lib.stop_during_setup("data preparation")
  config_check.check_batch_fits(config)  # preflight: batch <= split (split sizes known now)
  tokenizer = tokenizer_lib.from_config(config)

  # ---------------------------------------------------------------------------------- run directory
  # The config is valid and fits the run: only now is <workdir>/config.json (re)written.
  if is_chief:
    if restart_from_scratch and (aside := run_dir.restart_from_scratch(workdir)):
      logging.warning("--restart_from_scratch: set the previous run aside in %s", aside)
    run_dir.write_run_config(workdir, config)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("medvl_jax: workdir ready")

  # ---------------------------------------------------------------------------------------- restore
  # The newest good checkpoint step, else fresh init (+ pretrained weights).
  mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints, on_commit=saves.finalised)
  state, start_step, skipped_before = _restore_or_init(config, prog, mngr, workdir)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_train = sum(
    x.size for x, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(prog.mask)) if m
  )
  logging.info(
    "model %s: %.1fM params, %.1fM trainable", config.model.name, n_params / 1e6, n_train / 1e6
  )

  # ------------------------------------------------------------------------------------------ steps
  # Update step: jitted with explicit shardings; the old state is donated.
  step_fn = prog.jit_step()
  eval_fn = jax.jit(
    lambda st, b: step_lib.eval_step(st, b, model=prog.model, loss_fn=prog.loss_fn),
    in_shardings=(prog.state_sharding, prog.batch_sharding),
  )
  # Downstream evaluators (config.evaluators), run at each evaluation; see medvl_jax/evaluate.
  evaluators = []
  if config.evaluators:
    from medvl_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top

    evaluators = evaluate_lib.build_all(prog.model, config, tokenizer)

  train_iter = streams.create_train_iterator(
    config,
    tokenizer,
    start_step=start_step,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  # The next global batches are read, tokenised and put on the devices by a background
  # thread while the devices run the current step (and, first, while the step compiles).
  batches = prefetch.Prefetcher(lambda: sharding.to_global(next(train_iter), mesh))
  try:
    writer = summaries.Summaries(workdir, is_chief)  # for a URL: mirrored from a local copy
    if start_step == 0:
      writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})

    # -------------------------------------------------------------------------------------- compile
    # Ahead of the loop, so the first progress line already times a real step.
    t0 = time.perf_counter()
    batch = batches.next()
    step_fn = step_fn.lower(state, batch).compile()
    logging.info("compiled the train step in %.1f s", time.perf_counter() - t0)
    if preemption.requested:
      writer.close()
      return preemption_lib.stop_during_setup("model building and compilation", mngr)

    # ----------------------------------------------------------------------------------------- loop
    guard = nonfinite.NonFiniteGuard(
      config.nonfinite, config.nonfinite_max_consecutive, skipped_before
    )
    window = log_window.LogWindow(
      writer,
      guard,
      total_steps=config.total_steps,
      batch_size=config.batch_size,
      start_step=start_step,
    )
    schedule = schedule_lib.Schedule.from_config(config, start_step)
    last_eval = {}
    step, unhealthy = start_step, None  # unhealthy: why the current state must not be saved
    try:
      for step in range(start_step + 1, config.total_steps + 1):
        if batch is None:
          batch = batches.next()
        state, metrics = step_fn(state, batch)
        batch = None
        checkpoint.check_saved(mngr, step)  # a failed async save (full disk) stops the run here
        guard.add(step, metrics)
        window.add(metrics)
        window.log_deferred()  # the previous window's figures, while the devices run this step
        guard.settle(wait=False)  # the flags of the steps already done
        guard.settle(upto=step - nonfinite.MAX_AHEAD)  # back-pressure: a bounded queue
        saves.poll(mngr)

        stop = preemption.requested or mngr.reached_preemption(step)
        due = schedule.at(step, stop)
        lease.check(step)  # LeaseError if another run took the workdir over: nothing is saved
        if due.waits_for_devices:
          guard.settle()  # every step up to this one: the state is final
        if due.log:  # deferred unless the devices are waited for anyway
          window.close(step, defer=not due.waits_for_devices)
        unhealthy = guard.unhealthy(step)

        val_loss = None
        if due.evaluate:
          t_eval = time.perf_counter()
          last_eval = validation.validation_metrics(eval_fn, state, config, tokenizer, mesh)
          if evaluators:
            last_eval.update(evaluate_lib.run_all(evaluators, state))
          window.exclude(time.perf_counter() - t_eval)  # the train rate excludes evaluation
          val_loss = last_eval["val_loss"]
          writer.write_scalars(step, last_eval)
          logging.info(
            "step %d | validation loss %.4f%s",
            step,
            val_loss,
            "".join(f" | {k} {last_eval[f'val_{k}']:.3f}" for k in prog.family.summary_metrics),
          )
          unhealthy = guard.check_validation(step, val_loss) or unhealthy

        if due.checkpoint:
          if unhealthy:  # never save a state that gives non-finite values
            logging.warning("no checkpoint at step %d: %s", step, unhealthy)
          else:
            saves.poll(mngr, wait=True)  # the previous save's line first (save() waits anyway)
            lease.check(step, saving=True)  # renewed now: a save starts only with the workdir held
            checkpoint.save(
              mngr,
              step,
              state,
              {"batches_consumed": step, "seed": config.seed, "skipped_steps": guard.total},
              val_loss=val_loss,
            )
            saves.started(step)
            if paths.is_url(workdir):
              writer.flush()  # the logs up to this checkpoint into the bucket
        if stop:
          logging.warning("stopping at step %d for preemption; rerun the command to resume", step)
          break
      guard.settle()
      window.log_deferred()  # none left: the last step always logs at once
      if unhealthy and not preemption.requested:
        raise nonfinite.Halt(f"the run ended in a non-finite state ({unhealthy})")
    except nonfinite.Halt as halt:
      saves.poll(mngr, wait=True)
      writer.write_scalars(step, {"skipped_steps": guard.total})
      writer.close()
      good = mngr.latest_step()
      mngr.close()
      raise NonFiniteError(
        f"{halt}; stopped without saving it; last good checkpoint: "
        + (f"step {good} in {mngr.directory}" if good is not None else "none yet")
      ) from None

    # ----------------------------------------------------------------------------------- final save
    saves.poll(mngr, wait=True)
    checkpoint.wait_until_saved(mngr)
    writer.flush()
    writer.close()
    mngr.close()
    return dict(window.last, **last_eval)
  finally:
    batches.close()


def _restore_or_init(config, prog: program.Program, mngr, workdir) -> tuple:
  """(state, start step, skipped steps so far): the newest good checkpoint step restored onto
  the program's shardings, else freshly initialised variables (born sharded) with the
  configured pretrained weights imported."""
  restored = checkpoint.restore_newest_good(mngr, prog.abstract_state, workdir)
  if restored is not None:
    _, state, data_state = restored
    if data_state.get("seed") != config.seed:
      raise ConfigError(
        f"config.seed={config.seed} differs from the seed "
        f"{data_state.get('seed')} of the run being resumed in {workdir}"
      )
    start_step = int(data_state["batches_consumed"])
    logging.info("resumed from checkpoint step %d in %s", start_step, mngr.directory)
    return state, start_step, int(data_state.get("skipped_steps", 0))
  var_sharding = {"params": prog.state_sharding.params}
  if "batch_stats" in prog.abstract_vars:
    var_sharding["batch_stats"] = prog.state_sharding.batch_stats
  variables = jax.jit(prog.init_fn, out_shardings=var_sharding)(prog.init_rng)  # born sharded
  if pretrained.configured(config.model):  # host round trip only when importing weights
    variables = jax.device_put(
      pretrained.init_from_pretrained(jax.device_get(variables), config.model), var_sharding
    )
  state = jax.jit(prog.make_state, out_shardings=prog.state_sharding)(variables)
  return state, 0, 0


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
