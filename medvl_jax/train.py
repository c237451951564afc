"""The training loop, top to bottom in the order data flows.

  config check -> mesh -> input -> model & optimizer -> shardings & state -> update step
  -> checkpoint restore -> evaluation -> loop (log, eval, checkpoint, preemption)

`train_step` and `eval_step` are pure functions of (state, batch) jitted with explicit
shardings; everything else here is the plumbing around them.
"""

import functools
import json
import os
import pathlib
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
import ml_collections

from medvl_jax import checkpoint, config_check, families, input_pipeline, sharding
from medvl_jax import step as step_lib
from medvl_jax.errors import ConfigError


# ----------------------------------------------------------------------------- evaluation
def evaluate(eval_fn, state, config, tokenizer, mesh) -> dict[str, float]:
  """val_<metric>: the mean over the real (unpadded) rows of the eval split."""
  totals = {}
  for local in input_pipeline.create_eval_iterator(
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
  """Running means of the step metrics, summed on the devices (no per-step host sync)."""

  def __init__(self):
    self.sums, self.count = None, 0

  def add(self, metrics: dict) -> None:
    self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
    self.count += 1

  def pop(self) -> dict[str, float]:
    out = {k: float(v) / self.count for k, v in jax.device_get(self.sums).items()}
    self.sums, self.count = None, 0
    return out


# ----------------------------------------------------------------------------- helpers
def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  os.replace(tmp, path)


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _Preemption:
  """SIGTERM (as sent by schedulers before preemption) -> save at the next step and stop."""

  def __init__(self):
    self.requested = False
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: checkpointing at the next step, then stopping.")
    self.requested = True


# ----------------------------------------------------------------------------- main entry
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) in `workdir`; returns the last logged train and eval metrics."""
  config_check.check(config)  # every name and choice, before anything is read or written
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_chief = jax.process_index() == 0
  if is_chief:
    _write_json_atomic(workdir / "config.json", config.to_dict())

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

  # Input: the sample is prepared on first use; the tokenizer comes from the text checkpoint.
  input_pipeline.prepare(config)
  tokenizer = input_pipeline.load_tokenizer(config.model.text.tokenizer or config.model.text.init)

  # Model & optimizer, through the model family (families/): the loss sees the whole batch.
  family = families.get(config.model.name)
  model = family.build(config.model)
  loss_fn = family.make_loss(config)
  init_rng, step_rng = step_lib.rngs(config)
  init_fn = functools.partial(step_lib.init_variables, model, config)
  abstract_vars = jax.eval_shape(init_fn, init_rng)
  mask = family.trainable_mask(abstract_vars["params"], config.model)
  tx = step_lib.make_optimizer(config.optimizer, mask)

  def make_state(variables):
    return step_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(variables["params"]),
    )

  # Shardings: derived from shapes, so parameters are born sharded.
  abstract_state = jax.eval_shape(make_state, abstract_vars)
  state_sharding = sharding.tree_shardings(
    abstract_state,
    mesh,
    config.sharding.rules,
    min_size=config.sharding.get("fsdp_min_size", sharding.FSDP_MIN_SIZE),
  )
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding
  )

  # Checkpoint restore, else fresh init (+ pretrained weights where configured).
  mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
  if mngr.latest_step() is not None:
    state, data_state = checkpoint.restore(mngr, abstract_state)
    if data_state.get("seed") != config.seed:
      raise ConfigError(
        f"config.seed={config.seed} differs from the seed "
        f"{data_state.get('seed')} of the run being resumed in {workdir}"
      )
    start_step = int(data_state["batches_consumed"])
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
  batch_shard = sharding.batch_sharding(mesh)
  step_fn = jax.jit(
    lambda st, b: step_lib.train_step(
      st, b, model=model, tx=tx, loss_fn=loss_fn, mask=mask, rng=step_rng
    ),
    in_shardings=(state_sharding, batch_shard),
    out_shardings=(state_sharding, None),
    donate_argnums=0,
  )
  eval_fn = jax.jit(
    lambda st, b: step_lib.eval_step(st, b, model=model, loss_fn=loss_fn),
    in_shardings=(state_sharding, batch_shard),
  )
  # Downstream evaluators (config.evaluators), run at each evaluation; see medvl_jax/evaluate.
  evaluators = []
  if config.evaluators:
    from medvl_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top

    evaluators = evaluate_lib.build_all(model, config, tokenizer)

  train_iter = input_pipeline.create_train_iterator(
    config,
    tokenizer,
    start_step=start_step,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  writer = metric_writers.create_default_writer(
    str(workdir / "tensorboard"), just_logging=not is_chief, asynchronous=True
  )
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})

  # Compile ahead of the loop, so the first progress line already times a real step.
  t0 = time.perf_counter()
  first = sharding.to_global(next(train_iter), mesh)
  step_fn = step_fn.lower(state, first).compile()
  logging.info("compiled the train step in %.1f s", time.perf_counter() - t0)

  preemption = _Preemption()
  last_train, last_eval = {}, {}
  acc = MeanMetrics()
  t_report, step_report = time.perf_counter(), start_step
  batch = first
  for step in range(start_step + 1, config.total_steps + 1):
    if batch is None:
      batch = sharding.to_global(next(train_iter), mesh)
    state, metrics = step_fn(state, batch)
    batch = None
    acc.add(metrics)

    if step % config.log_every == 0 or step == config.total_steps or step == start_step + 1:
      last_train = {f"train_{k}": v for k, v in acc.pop().items()}
      now = time.perf_counter()
      sec_per_step = (now - t_report) / (step - step_report)
      t_report, step_report = now, step
      writer.write_scalars(step, dict(last_train, sec_per_step=sec_per_step))
      logging.info(
        "step %d/%d | loss %.4f | %.2f s/step | %.1f examples/s | ETA %s",
        step,
        config.total_steps,
        last_train["train_loss"],
        sec_per_step,
        config.batch_size / sec_per_step,
        _fmt_duration(sec_per_step * (config.total_steps - step)),
      )

    val_loss = None
    if step % config.eval_every == 0 or step == config.total_steps:
      t_eval = time.perf_counter()
      last_eval = evaluate(eval_fn, state, config, tokenizer, mesh)
      if evaluators:
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

    stop = preemption.requested or mngr.reached_preemption(step)
    if step % config.checkpoint_every == 0 or step == config.total_steps or stop:
      checkpoint.save(
        mngr, step, state, {"batches_consumed": step, "seed": config.seed}, val_loss=val_loss
      )
    if stop:
      logging.warning("stopping at step %d for preemption; rerun the command to resume", step)
      break

  mngr.wait_until_finished()
  writer.flush()
  writer.close()
  mngr.close()
  return dict(last_train, **last_eval)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
