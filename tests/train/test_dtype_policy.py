"""The precision policy (`config.model.dtype`): bfloat16 compute, float32 master weights,
optimizer state, batch statistics, loss and softmax; a bf16 run tracks the float32 run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import read_scalars, run_main, smoke_args


def _eqns(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (jit, custom_vjp, scan, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else (p,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


def test_bf16_step_computes_in_bf16_and_keeps_float32_state_and_loss():
  from configs import convirt
  from medvl_jax import families
  from medvl_jax.parallel import sharding
  from medvl_jax.train import program

  cfg = convirt.get_config("smoke")
  cfg.model.dtype = "bfloat16"
  prog = program.build(cfg, sharding.make_mesh())
  batch = families.dummy_batch(cfg, cfg.batch_size)
  closed, (new_state, metrics) = jax.make_jaxpr(prog.jit_step(), return_shape=True)(
    prog.abstract_state, batch
  )
  # Master weights, Adam moments and BatchNorm statistics stay float32 after a bf16 step.
  floats = [
    x.dtype for x in jax.tree.leaves((new_state.params, new_state.opt_state, new_state.batch_stats))
  ]
  floats = [d for d in floats if jnp.issubdtype(d, jnp.floating)]
  assert floats and all(d == jnp.float32 for d in floats), set(floats)
  assert metrics["loss"].dtype == jnp.float32
  # The matmuls and convolutions run in bf16, except the loss's similarity matrix (float32).
  kinds = {}
  for eqn in _eqns(closed.jaxpr):
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      dtype = str(eqn.invars[0].aval.dtype)
      kinds[dtype] = kinds.get(dtype, 0) + 1
  assert kinds.get("bfloat16", 0) > 0, kinds
  assert kinds.get("float32", 0) <= 0.1 * sum(kinds.values()), kinds
  # Softmaxes take float32 logits: BERT's attention (one per layer) and InfoNCE's two
  # log-softmaxes; the only bf16 `exp` is in GELU's derivative (erf'), at most one per layer.
  exps = [str(e.invars[0].aval.dtype) for e in _eqns(closed.jaxpr) if e.primitive.name == "exp"]
  layers = cfg.model.text.num_layers
  assert exps.count("float32") >= layers + 2, exps
  assert exps.count("bfloat16") <= layers, exps


# Tolerances of the bf16 train-loss curve against the float32 one (the smoke run's 30 steps,
# same seed, batches and dropout draws). Step 1 starts from the same float32 params, so only
# the bf16 rounding of activations (8 mantissa bits, ~0.4%) differs; after that the two
# trajectories drift apart by rounding, and the per-step loss of an 8-pair batch varies by
# ~0.1 from step to step (ln 8 = 2.08 at chance). Measured on the 2-core CPU: step 1 0.004,
# max 0.132, mean 0.048, last-10 signed mean 0.013.
FIRST_STEP = 0.02
MAX_ABS_DIFF = 0.25  # any one step
MEAN_ABS_DIFF = 0.08  # over the 30 steps
LAST10_MEAN = 0.05  # |mean of bf16 - fp32| over the last 10 steps: the curves' level


@pytest.mark.slow
def test_bf16_smoke_run_tracks_float32_and_saves_float32(smoke_run, tfds_dir, tmp_path):
  from medvl_jax.ckpt import checkpoint

  fp32_dir, _ = smoke_run
  proc = run_main(*smoke_args(tmp_path, tfds_dir, "--config.model.dtype=bfloat16"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  fp32 = read_scalars(fp32_dir / "tensorboard")["train_loss"]
  bf16 = read_scalars(tmp_path / "tensorboard")["train_loss"]
  assert sorted(bf16) == sorted(fp32) == list(range(1, 31))
  signed = np.array([bf16[s] - fp32[s] for s in range(1, 31)])
  diff = np.abs(signed)
  assert diff[0] <= FIRST_STEP, signed
  assert diff.max() <= MAX_ABS_DIFF and diff.mean() <= MEAN_ABS_DIFF, signed
  assert abs(signed[-10:].mean()) <= LAST10_MEAN, signed
  # It learns as the float32 run does: the last 5 steps below the first 5.
  assert np.mean([bf16[s] for s in range(26, 31)]) < np.mean([bf16[s] for s in range(1, 6)])
  state = checkpoint.manager(tmp_path, read_only=True).restore(30)["state"]
  for part in ("params", "opt_state", "batch_stats"):
    dtypes = {np.asarray(x).dtype for x in jax.tree.leaves(state[part])}
    dtypes = {d for d in dtypes if np.issubdtype(d, np.floating)}
    assert dtypes == {np.dtype(np.float32)}, (part, dtypes)
