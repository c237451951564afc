"""The training program of a config on a mesh: model, loss, optimizer, abstract sharded state
and the jitted update step — built in one place for the trainer (`loop.py`) and the
ahead-of-time compiler (`aot.py`), so `--compile_only` measures exactly the step that trains
(the same loss layout, `config.loss.impl`, and accumulation, `config.accumulate_steps`).
"""

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from medvl_jax import families
from medvl_jax.parallel import sharding
from medvl_jax.train import accumulate as accumulate_lib
from medvl_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Program:
  family: Any
  model: Any
  loss_fn: Callable
  accumulate: Callable | None
  init_fn: Callable  # rng -> variables
  init_rng: jax.Array
  step_rng: jax.Array
  abstract_vars: Any
  mask: Any  # trainable leaves
  tx: Any
  make_state: Callable  # variables -> TrainState
  abstract_state: Any  # ShapeDtypeStructs carrying the state's shardings
  state_sharding: Any
  batch_sharding: Any

  def jit_step(self, portable_key: bool = False):
    """The update step, jitted with explicit shardings; the old state is donated.

    `portable_key`: close over the step key as raw key data (for programs compiled for other
    devices than the host's, e.g. a TPU topology: no host-backend array in the program).
    """
    rng = self.step_rng
    key_data = jax.random.key_data(rng) if portable_key else None

    def step(st, b):
      key = jax.random.wrap_key_data(jnp.asarray(key_data)) if portable_key else rng
      return step_lib.train_step(
        st,
        b,
        model=self.model,
        tx=self.tx,
        loss_fn=self.loss_fn,
        mask=self.mask,
        rng=key,
        accumulate=self.accumulate,
      )

    return jax.jit(
      step,
      in_shardings=(self.state_sharding, self.batch_sharding),
      out_shardings=(self.state_sharding, None),
      donate_argnums=0,
    )


def build(config: ml_collections.ConfigDict, mesh) -> Program:
  """Everything of the update step that follows from (config, mesh); nothing is initialised."""
  # Model & optimizer, through the model family (families/): the loss sees the whole batch.
  family = families.get(config.model.name)
  model = family.build(config.model)
  loss_fn = family.make_loss(config, mesh)  # mesh: the contrastive layout (config.loss.impl)
  accumulate = accumulate_lib.from_config(family, config, mesh)  # config.accumulate_steps
  init_rng, step_rng = step_lib.rngs(config)
  init_fn = functools.partial(families.init_variables, model, config)
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
    min_size=config.sharding.fsdp_min_size,
  )
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding
  )
  return Program(
    family=family,
    model=model,
    loss_fn=loss_fn,
    accumulate=accumulate,
    init_fn=init_fn,
    init_rng=init_rng,
    step_rng=step_rng,
    abstract_vars=abstract_vars,
    mask=mask,
    tx=tx,
    make_state=make_state,
    abstract_state=abstract_state,
    state_sharding=state_sharding,
    batch_sharding=sharding.batch_sharding(mesh),
  )
